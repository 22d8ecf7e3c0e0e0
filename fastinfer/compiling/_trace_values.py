"""Data-dependent control flow seen while torch's TorchScript exporter traces a model.

The TorchScript exporter runs the model once and records the ops it calls. Where the Python code
turns a tensor into a Python value (``if x.sum() > 0:``, ``int(mask.sum())``, ``.item()``), the
trace keeps only the value the example gave: the graph always takes the example's branch, and an
input that would take the other one gets a silently wrong answer (the trace only warns, with a
``TracerWarning``).

Not every such conversion is a problem: under tracing a tensor's *size* is a tensor too, so Hugging
Face models convert sizes all the time (``if seq_len > max_positions:``); those are shape checks,
and a graph that baked in a size is caught by verifying at another length. So :func:`watch_values`
follows the inputs' *values* through the model (a torch function mode: a tensor computed from an
input tensor is marked, one computed only from sizes, the weights or constants is not) and records
a conversion only of a marked tensor.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fastinfer import _torch_compat

__all__ = ["mark_inputs", "watch_values"]

_T = torch.Tensor
# Python conversions of a tensor (each a TracerWarning under tracing).
_CONVERSIONS: dict[Callable[..., Any], str] = {
    _T.__bool__: "bool",
    _T.__int__: "int",
    _T.__float__: "float",
    _T.__index__: "index",
    _T.item: ".item()",
    _T.tolist: ".tolist()",
}
# Functions whose result depends on their input's shape (device, dtype), never on its values.
_SHAPE_ONLY: frozenset[Callable[..., Any]] = frozenset(
    {
        _T.size,
        _T.dim,
        _T.numel,
        _T.stride,
        _T.__len__,
        _T.shape.__get__,  # type: ignore[attr-defined]
        _T.ndim.__get__,  # type: ignore[attr-defined]
        _T.new_ones,
        _T.new_zeros,
        _T.new_empty,
        _T.new_full,
        torch.ones_like,
        torch.zeros_like,
        torch.empty_like,
        torch.full_like,
    }
)
_TORCH_DIR = os.path.dirname(torch.__file__)
_local = threading.local()


class _Watch(TorchFunctionMode):
    """Marks every tensor computed from a marked one; records conversions of marked tensors."""

    def __init__(self) -> None:
        super().__init__()
        self._marked: dict[int, weakref.ref[torch.Tensor]] = {}
        self.found: list[str] = []

    def mark(self, tensors: Sequence[Any]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._marked[id(t)] = weakref.ref(t)

    def _is_marked(self, x: Any) -> bool:
        ref = self._marked.get(id(x))
        return ref is not None and ref() is x  # an id a freed tensor left is not enough

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CONVERSIONS and args and self._is_marked(args[0]) and torch.jit.is_tracing():
            self.found.append(_where(_CONVERSIONS[func]))
        out = func(*args, **kwargs)
        if self._marked and func not in _SHAPE_ONLY and func not in _CONVERSIONS:
            leaves = _torch_compat.tree_leaves((args, kwargs))
            if any(self._is_marked(x) for x in leaves if isinstance(x, torch.Tensor)):
                self.mark(_torch_compat.tree_leaves(out))
        return out


def _where(kind: str) -> str:
    """``file:line (kind: `code`)`` of the model code converting the tensor."""
    frame = sys._getframe(2)
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    return f"{where} ({kind}: `{line}`)" if line else f"{where} ({kind})"


def mark_inputs(tensors: Sequence[torch.Tensor]) -> None:
    """Called with the traced model's input tensors as it starts (a no-op unless watched)."""
    watch = getattr(_local, "watch", None)
    if watch is not None and torch.jit.is_tracing():
        watch.mark(tensors)


@contextlib.contextmanager
def watch_values() -> Iterator[list[str]]:
    """Record, while this thread traces, where the model turns a tensor computed from its
    inputs' values (:func:`mark_inputs`) into a Python value. Yields the list of places
    (``file:line (bool: `code`)``), filled as the trace runs."""
    watch = _Watch()
    previous = getattr(_local, "watch", None)
    _local.watch = watch
    try:
        with watch:
            yield watch.found
    finally:
        _local.watch = previous

"""``empty_init``: build modules with parameters on meta (no storage, no init), buffers for real.

Private helper of :mod:`fastinfer.loading` (which re-exports :func:`empty_init`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["empty_init"]

_tls = threading.local()  # .depth: how many empty_init blocks this thread is inside
_patch_lock = threading.Lock()
_patch_users = 0
_original_register_parameter: Callable[..., None] | None = None

# In-place methods that change a tensor's metadata (not just its values): they must really run.
_METADATA_INPLACE = frozenset(
    {
        "requires_grad_",
        "retain_grad",
        "share_memory_",
        "resize_",
        "resize_as_",
        "set_",
        "as_strided_",
        "t_",
        "transpose_",
        "squeeze_",
        "unsqueeze_",
        "swapdims_",
        "swapaxes_",
        "detach_",
        "rename_",
        "refine_names",
        "names",
    }
)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _in_empty_init() -> bool:
    return getattr(_tls, "depth", 0) > 0


def _to_meta(param: nn.Parameter) -> nn.Parameter:
    meta = torch.empty_like(param, device="meta")  # a C++ factory: no meta-kernel import cost
    cls: Any = type(param)
    if cls is nn.Parameter:
        new = nn.Parameter(meta, requires_grad=param.requires_grad)
        # transformers' init helpers skip tensors marked initialised: no meta ops run at all.
        new._is_hf_initialized = True  # type: ignore[attr-defined]
        return new
    try:  # a Parameter subclass: keep its type and attributes
        new = cls(meta, requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)
        return new
    except Exception:
        return nn.Parameter(meta, requires_grad=param.requires_grad)


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    assert _original_register_parameter is not None
    _original_register_parameter(self, name, param)
    if param is None or not _in_empty_init():
        return
    current = self._parameters.get(name)
    if (
        current is None
        or current.is_meta
        or isinstance(current, nn.parameter.UninitializedParameter)
    ):
        return  # already meta (e.g. a tie to another meta parameter): keep the same object
    self._parameters[name] = _to_meta(current)


class _SkipMetaInit(TorchFunctionMode):
    """Thread-local (torch function modes are per thread): skip value-writing in-place ops on meta.

    Initialisers (``nn.init.*_``, ``Tensor.normal_``, ``zero_``, ``copy_``...) applied to meta
    parameters are no-ops, so construction runs no init and never triggers the ~0.5 s import of
    torch's Python meta kernels; everything else (buffers on CPU) runs normally.
    """

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # The tensor written to: ``self`` of a method, or the first tensor argument of a function,
        # which ``torch.nn.init`` passes by keyword (``normal_(tensor=...)``).
        target = args[0] if args else next((v for v in kwargs.values() if _is_tensor(v)), None)
        if isinstance(target, torch.Tensor) and target.is_meta:
            if name == "__setitem__":
                return None
            if name.endswith("_") and not name.endswith("__") and name not in _METADATA_INPLACE:
                return target
        return func(*args, **kwargs)


@contextmanager
def empty_init() -> Iterator[None]:
    """Build modules with parameters on the meta device (no storage, no init); buffers for real.

    Only the calling thread is affected: a module built at the same time by another thread is
    built normally. The patch of ``nn.Module.register_parameter`` is installed on entry and removed
    in ``finally`` when the last ``empty_init`` block (in any thread) exits.

        with fastinfer.empty_init():
            model = MyModel()
        fastinfer.load_weights_(model, "model.safetensors")
    """
    global _patch_users, _original_register_parameter
    with _patch_lock:
        if _patch_users == 0 and nn.Module.register_parameter is not _register_parameter:
            _original_register_parameter = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _patch_users += 1
    _tls.depth = getattr(_tls, "depth", 0) + 1
    mode = _SkipMetaInit()
    try:
        with mode:
            yield
    finally:
        _tls.depth -= 1
        with _patch_lock:
            _patch_users -= 1
            # _original_register_parameter is kept after the restore: another thread may still be
            # inside a call to the patched method it looked up just before.
            if _patch_users == 0 and nn.Module.register_parameter is _register_parameter:
                nn.Module.register_parameter = _original_register_parameter  # type: ignore[method-assign,assignment]

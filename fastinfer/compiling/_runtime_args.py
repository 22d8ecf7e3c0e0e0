"""What a runtime model's graph fixed at export, checked on every call (:class:`RuntimeModel`).

An exported graph takes only the example's tensors. Everything else the example passed (a Python
scalar, ``return_dict=False``, ``output_hidden_states=True``, a KV cache, None) was baked into the
graph, and every argument it left out took ``forward``'s default. A call that passes something
else would be answered as the example was, silently: :class:`BakedArguments` refuses it instead,
as it refuses leaving out an argument whose concrete default differs from the example's value.
A tensor of another dtype than the example's is converted when nothing is lost (``int32`` token
ids, a ``bool`` mask to ``int64``) and refused otherwise (:func:`as_graph_dtype`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastinfer.errors import CompileError

__all__ = ["BakedArguments", "as_graph_dtype"]

_FIX = (
    "Fix: call it with the values the example had, build the candidate (select_backend / "
    "build_backend) with example_inputs that carry the values you serve, or serve such calls "
    "eagerly or with another candidate (inductor)"
)


def _same(a: Any, b: Any) -> bool:
    """Whether ``a`` would make the model compute what ``b`` did (for baked arguments)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
            and bool(torch.equal(a, b))
        )
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and type(a) is type(b):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)  # strings, dtypes, enums; objects: identity
    except Exception:
        return False


def _show(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor {tuple(v.shape)} {v.dtype}"
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(v, (tuple, list, dict)) and len(repr(v)) <= 60:
        return repr(v)
    return f"a {type(v).__name__}"


@dataclass(frozen=True)
class BakedArguments:
    """The non-tensor arguments an export fixed: the example's (``constants``) and, for what it
    left out, ``forward``'s defaults (None where there is none: a ``**kwargs`` argument)."""

    constants: Mapping[str, Any]
    defaults: Mapping[str, Any]

    @classmethod
    def of(
        cls, model: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], arg_names: list[str]
    ) -> BakedArguments:
        constants = {n: a for n, a in zip(arg_names, args) if not isinstance(a, torch.Tensor)}
        constants.update((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))
        try:
            params = inspect.signature(getattr(model, "forward", model)).parameters
            defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
        except (TypeError, ValueError):
            defaults = {}
        return cls(constants, defaults)

    def _fixed(self, name: str) -> tuple[Any, str]:
        if name in self.constants:
            return self.constants[name], "the example's value"
        return self.defaults.get(name), "the example left it out"

    def check(self, named: Mapping[str, Any], tensors: set[str]) -> None:
        """Raise :class:`CompileError` naming every argument of the call ``named`` (tensors
        excepted) whose value differs from the one baked into the graph."""
        wrong = []
        for name, value in named.items():
            if name in tensors or isinstance(value, torch.Tensor):
                continue  # graph inputs; a tensor the graph lacks is refused by the caller
            fixed, why = self._fixed(name)
            if not _same(value, fixed):
                wrong.append(f"{name}={_show(value)} (the graph has {_show(fixed)}: {why})")
        for name, fixed in self.constants.items():
            # Left out: forward's default, when it has a concrete one (None usually means "from
            # the config", which cannot be known here: the example's value is taken as meant).
            default = self.defaults.get(name)
            if name not in named and default is not None and not _same(default, fixed):
                wrong.append(
                    f"{name} left out, so eager would use forward's default "
                    f"{_show(default)} (the graph has the example's {_show(fixed)})"
                )
        if wrong:
            raise CompileError(
                "the exported model has the example's non-tensor arguments baked into its graph, "
                f"and this call differs: {'; '.join(wrong)}. The graph would ignore the "
                f"difference and answer as for the example, which eager would not. {_FIX}"
            )


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """An integer (or bool) tensor converted to the integer ``dst`` without loss."""
    integral = not src.is_floating_point and not src.is_complex
    target = not dst.is_floating_point and not dst.is_complex and dst != torch.bool
    return integral and target and torch.promote_types(src, dst) == dst


def as_graph_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in the dtype the graph was exported with: converted when nothing is lost (int32
    ids, a bool mask to int64, as eager accepts them), else :class:`CompileError`."""
    if dtype is None or t.dtype == dtype:
        return t
    if _widens(t.dtype, dtype):
        return t.to(dtype)
    raise CompileError(
        f"the exported model takes {name!r} as {dtype} (the example's dtype); this call passes "
        f"{t.dtype}, which cannot be converted to it without loss. Fix: pass {name!r} as {dtype}, "
        "or build the candidate (select_backend / build_backend) with example_inputs of the "
        "dtype you serve"
    )

"""Why PyTorch's native fastpath is (not) taken, per native attention module."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastinfer.attention import _why
from fastinfer.attention._outputs import call

__all__ = ["diagnose", "diagnose_call", "native_modules"]


def native_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)
    return [(n or type(m).__name__, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def diagnose(model: nn.Module, inputs: Any) -> tuple[tuple[str, str], ...]:
    """Run ``inputs`` once and record, per native module, the reason its fastpath is skipped."""
    if inputs is None or not native_modules(model):
        return diagnose_static(model)
    try:
        return diagnose_call(model, inputs)[0]
    except Exception:
        return ()  # the caller reports the bad inputs with a clear message


def diagnose_static(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """The reasons that do not need a call (inputs that are not known)."""
    found = native_modules(model)
    return _diagnose_static(found) if found else ()


def diagnose_call(
    model: nn.Module, inputs: Any, grad: bool | None = None
) -> tuple[tuple[tuple[str, str], ...], Any]:
    """Call the model once on ``inputs`` with the diagnosis hooks on: ``(reasons, output)``.

    The call doubles as the reference call of a measurement; exceptions propagate. ``grad``: the
    grad mode the reasons are for, when the call runs in another (the reference call runs
    without grad, as the model is served, and reports what a caller in grad mode gets). The
    modules' own parameters are read as they are; an input that would require grad in that
    mode only through a trainable module upstream reads as not requiring it.
    """
    found = native_modules(model)
    if not found:
        return (), call(model, inputs)
    results: dict[str, str] = {}
    handles = []
    mode = torch.is_grad_enabled() if grad is None else grad

    def make_hook(name: str, mod: nn.Module) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            with torch.set_grad_enabled(mode):
                reason(m, args, kwargs)

        def reason(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            bound = inspect.signature(m.forward).bind(*args, **kwargs).arguments
            if isinstance(m, nn.TransformerEncoder):
                why = _why.encoder_nested_reason(
                    m, bound["src"], bound.get("mask"), bound.get("src_key_padding_mask")
                )
                results.setdefault(f"{name} (nested tensors)", why)
            elif isinstance(m, nn.TransformerEncoderLayer):
                why = _why.layer_fastpath_reason(
                    m, bound["src"], bound.get("src_mask"), bound.get("src_key_padding_mask")
                )
                results.setdefault(name, why)
            else:
                assert isinstance(m, nn.MultiheadAttention)
                why = _why.mha_fastpath_reason(
                    m,
                    bound["query"],
                    bound["key"],
                    bound["value"],
                    bound.get("key_padding_mask"),
                    bound.get("attn_mask"),
                )
                results.setdefault(name, why)

        hook._fastinfer_diag = True  # type: ignore[attr-defined]
        return hook

    inner = {id(m.self_attn) for _, m in found if isinstance(m, nn.TransformerEncoderLayer)}
    for name, mod in found:
        if id(mod) in inner:
            continue  # a layer's own attention: the layer's fused kernel replaces it
        handles.append(mod.register_forward_pre_hook(make_hook(name, mod), with_kwargs=True))
    try:
        out = call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return tuple(results.items()), out


def _diagnose_static(found: list[tuple[str, nn.Module]]) -> tuple[tuple[str, str], ...]:
    out = []
    for name, mod in found:
        if isinstance(mod, nn.TransformerEncoder):
            init = _why.encoder_nested_init_reason(mod)
            out.append((f"{name} (nested tensors)", init and f"{init} (set in __init__)"))
        elif isinstance(mod, nn.TransformerEncoderLayer):
            d = mod.self_attn.embed_dim
            src = torch.zeros(1, 1, d, dtype=mod.linear1.weight.dtype)
            with torch.no_grad():
                out.append((name, _why.layer_fastpath_reason(mod, src)))
        elif isinstance(mod, nn.MultiheadAttention):
            x = torch.zeros(1, 1, mod.embed_dim, dtype=mod.out_proj.weight.dtype)
            with torch.no_grad():
                out.append((name, _why.mha_fastpath_reason(mod, x, x, x)))
    return tuple(out)

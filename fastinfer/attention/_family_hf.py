"""Candidate paths for Hugging Face models: attention implementations and packed/fused encoders."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from fastinfer.attention import _kernels_hf as _k
from fastinfer.attention._candidate import OPAQUE, PACKED, PLAIN, Candidate, Once
from fastinfer.attention._guard import tracing
from fastinfer.attention._undo import Call, Undo, find_parent
from fastinfer.errors import AttentionSwapError

__all__ = ["HF_IMPLEMENTATIONS", "hf_candidates", "is_hf", "optimum_status"]

HF_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "set_attn_implementation")


def _hf_encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding a ``layer`` ModuleList of supported BERT-family layers."""
    found = []
    for name, mod in model.named_modules():
        layers = mod._modules.get("layer")
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers)
            and all(type(lyr).__name__ in _k.HF_LAYER_PARTS for lyr in layers)
        ):
            found.append((name, mod))
    return found


def _hf_output_cls(encoder: nn.Module) -> Any:
    from transformers import modeling_outputs as mo

    if type(encoder).__name__ == "Transformer":  # DistilBERT
        return mo.BaseModelOutput
    return mo.BaseModelOutputWithPastAndCrossAttentions


def _set_attn(model: Any, impl: str, undo: Undo) -> None:
    old = model.config._attn_implementation
    if old == impl:
        return
    model.set_attn_implementation(impl)  # type: ignore[operator]
    if model.config._attn_implementation != impl:
        got = model.config._attn_implementation
        model.set_attn_implementation(old)  # type: ignore[operator]
        raise AttentionSwapError(f"set_attn_implementation({impl!r}) gave {got!r}")
    undo.push(Call(model.set_attn_implementation, old))


def _zero_padded_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> Any:
    """Normalise HF attention-implementation paths: padded positions become exact zeros (not
    while tracing or exporting: the original graph, without data-dependent checks)."""
    if tracing(compiling=False):
        return out
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    hidden = getattr(out, "last_hidden_state", None)
    if mask is None or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return out
    valid = _k.valid_from_hf_mask(mask, hidden.shape[0], hidden.shape[1])
    if valid is None:
        return out
    out.last_hidden_state = hidden.masked_fill(~valid.to(hidden.device)[..., None], 0.0)
    return out


def _flex_unavailable(model: nn.Module) -> str:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no flex_attention"
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cuda":
        return (
            "flex_attention outside torch.compile runs unfused on CPU (it materialises the score "
            "matrix, slower than sdpa); compile the model with attn_implementation='flex_attention'"
            " if you want it"
        )
    return ""


def _flash_unavailable(model: nn.Module) -> str:
    try:
        p = next(model.parameters())
    except StopIteration:
        return "the model has no parameters"
    if p.device.type != "cuda":
        return f"flash attention needs a CUDA GPU; the model is on {p.device.type}"
    if p.dtype not in (torch.float16, torch.bfloat16):
        return f"flash attention needs fp16 or bf16 weights; the model is {p.dtype}"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "the flash-attn package (>= 2.3.3) is not installed"
    return ""


def optimum_status(model: nn.Module | None = None) -> tuple[bool, str]:
    """Whether optimum's legacy BetterTransformer can be used here, and the message if not."""
    successor = (
        "transformers' sdpa attention (attn_implementation='sdpa', the default) is its native "
        "successor, and fastinfer's hf:packed / hf:fused paths do what it did for encoders"
    )
    if importlib.util.find_spec("optimum") is None:
        return False, f"optimum is not installed; {successor}"
    import optimum.version as ov

    version = getattr(ov, "__version__", "?")
    if importlib.util.find_spec("optimum.bettertransformer") is None:
        return False, (
            f"optimum {version} does not ship BetterTransformer (deprecated in 1.23, removed in "
            f"2.0); {successor}"
        )
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.49"):
        return False, (
            f"optimum {version}'s BetterTransformer refuses transformers "
            f"{transformers.__version__} (needs < 4.49); {successor}"
        )
    from optimum.bettertransformer import BetterTransformerManager

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model is not None and model_type not in BetterTransformerManager.MODEL_MAPPING:
        return False, f"optimum's BetterTransformer does not support model_type {model_type!r}"
    return True, ""


class _RestoreModules:
    """Put back every module's children as they were (optimum rebuilt the tree)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.snapshot = [(m, dict(m._modules)) for m in model.modules()]

    def __call__(self) -> None:
        for m, children in self.snapshot:
            m._modules.clear()
            m._modules.update(children)
        if hasattr(self.model, "use_bettertransformer"):
            self.model.use_bettertransformer = False


def _optimum_apply(model: Any, undo: Undo) -> None:
    from optimum.bettertransformer import BetterTransformer

    undo.freeze(model)
    undo.push(_RestoreModules(model))
    result = BetterTransformer.transform(model, keep_original_model=False)
    if result is not model:
        raise AttentionSwapError("BetterTransformer.transform did not change the model in place")


def hf_candidates(model: Any, once: Once) -> tuple[str, list[Candidate], list[str]]:
    """The paths of a Hugging Face model: its attention implementations, and for BERT-family
    encoders the packed and fused replacement encoders."""
    cands: list[Candidate] = []
    notes: list[str] = []
    kind = "hf"
    cls = type(model)
    supports = {
        "eager": True,
        "sdpa": getattr(cls, "_supports_sdpa", False),
        "flex_attention": getattr(cls, "_supports_flex_attn", False),
        "flash_attention_2": getattr(cls, "_supports_flash_attn", False),
    }
    encoders = _hf_encoders(model)
    if encoders:
        kind = "hf-encoder"
    for impl in HF_IMPLEMENTATIONS:
        why = "" if supports[impl] else f"{cls.__name__} does not support {impl}"
        if not why and impl == "flash_attention_2":
            why = _flash_unavailable(model)
        if not why and impl == "flex_attention":
            why = _flex_unavailable(model)

        def apply_impl(undo: Undo, impl: str = impl) -> None:
            _set_attn(model, impl, undo)
            undo.freeze(model)
            for _, enc in encoders:
                h = enc.register_forward_hook(_zero_padded_hook, with_kwargs=True)
                undo.push(Call(h.remove))

        cands.append(Candidate(f"hf:{impl}", apply_impl, True, PLAIN, why))
    if encoders:
        layer_why = ""
        fused_why = ""
        for _, enc in encoders:
            for lyr in enc.layer:  # type: ignore[union-attr]
                layer_why = layer_why or _k.hf_layer_unsupported(lyr)
                if not layer_why:
                    parts = _k.HF_LAYER_PARTS[type(lyr).__name__](lyr)
                    fused_why = fused_why or _k.hf_layer_fused_unsupported(parts)
        for mode in ("packed", "fused"):

            def apply_enc(undo: Undo, mode: str = mode) -> None:
                # sdpa's masks arrive as bool (or None when unpadded); eager's additive ones are
                # read as well, and an eager model stays eager: the calls that fall back to its
                # original layers (output_attentions=True) still get the attention maps
                if model.config._attn_implementation != "eager":
                    _set_attn(model, "sdpa", undo)
                undo.freeze(model)
                for _, enc in encoders:
                    where = find_parent(model, enc)
                    assert where is not None
                    new = once(
                        mode,
                        enc,
                        lambda enc=enc, mode=mode: _k.FastHFEncoder(  # type: ignore[misc]
                            enc, mode, _hf_output_cls(enc)
                        ),
                    )
                    undo.set_child(*where, new)

            useful, reason = (False, PACKED) if mode == "packed" else (False, OPAQUE)
            why = layer_why or (fused_why if mode == "fused" else "")
            if not why and not supports["sdpa"]:
                why = f"{cls.__name__} does not support sdpa masks"
            cands.append(Candidate(f"hf:{mode}", apply_enc, useful, reason, why))
    ok, message = optimum_status(model)
    if ok:
        cands.append(
            Candidate(
                "optimum:bettertransformer",
                lambda undo: _optimum_apply(model, undo),
                False,
                OPAQUE,
            )
        )
    else:
        notes.append(f"legacy BetterTransformer: {message}")
    return kind, cands, notes

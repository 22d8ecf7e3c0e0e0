"""Implementation of :mod:`fastinfer.attention` (imported on first use: it needs torch)."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import statistics as _stats
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastinfer import _attention_kernels as _k
from fastinfer import _attention_why as _why
from fastinfer.attention import _REGISTRY, ORIGINAL, AttentionReport, PathResult
from fastinfer.errors import AttentionSwapError, ConfigError

logger = logging.getLogger("fastinfer.attention")

HF_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")

# Per-dtype tolerances for comparing a path's outputs with the original's (valid positions only).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-3),  # (atol, rtol)
    torch.float64: (1e-7, 1e-6),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

_OPAQUE = (
    "the swapped model runs PyTorch's opaque fused encoder-layer kernel on nested tensors; "
    "torch.compile cannot see inside it and graph-breaks on nested tensors, so compiling adds "
    "compile time for no gain"
)
_PACKED = (
    "the packed path gathers the valid tokens with a data-dependent index (nonzero), so the "
    "compiled graph would break or recompile per token count; it is already a few large matmuls"
)
_PLAIN = (
    "plain PyTorch ops around the attention call: Inductor can fuse the projections' epilogues, "
    "GELU and layer norms, so compiling can pay (measure it with the compile selector)"
)


# --------------------------------------------------------------------------------------------
# Undo bookkeeping
# --------------------------------------------------------------------------------------------


class _Undo:
    """A stack of restore actions, run in reverse."""

    def __init__(self) -> None:
        self.actions: list[Callable[[], None]] = []

    def push(self, fn: Callable[[], None]) -> None:
        self.actions.append(fn)

    def __call__(self) -> None:
        while self.actions:
            self.actions.pop()()

    def set_child(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        old = parent._modules[name]
        parent._modules[name] = new
        self.push(lambda: parent._modules.__setitem__(name, old))

    def freeze(self, model: nn.Module) -> None:
        """eval() and requires_grad_(False) everywhere (inference preparation), restorable."""
        modes = [(m, m.training) for m in model.modules()]
        grads = [(p, p.requires_grad) for p in model.parameters()]
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)

        def restore() -> None:
            for m, t in modes:
                m.training = t
            for p, g in grads:
                p.requires_grad_(g)

        self.push(restore)


_SWAPPED: weakref.WeakKeyDictionary[nn.Module, tuple[_Undo, AttentionReport]] = (
    weakref.WeakKeyDictionary()
)


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    name: str
    apply: Callable[[_Undo], None]
    compile_useful: bool
    compile_reason: str
    unavailable: str = ""
    skips_padding_only: bool = False  # its only gain is skipping padding (nested tensors)


def _find_parent(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str] | None:
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is target:
                return parent, name
    return None


def _is_hf(model: nn.Module) -> bool:
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


def _set_attn(model: Any, impl: str, undo: _Undo) -> None:
    old = model.config._attn_implementation
    if old == impl:
        return
    model.set_attn_implementation(impl)  # type: ignore[operator]
    if model.config._attn_implementation != impl:
        got = model.config._attn_implementation
        model.set_attn_implementation(old)  # type: ignore[operator]
        raise AttentionSwapError(f"set_attn_implementation({impl!r}) gave {got!r}")
    undo.push(lambda: model.set_attn_implementation(old))  # type: ignore[operator]


def _zero_padded_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> Any:
    """Normalise HF attention-implementation paths: padded positions become exact zeros."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    hidden = getattr(out, "last_hidden_state", None)
    if mask is None or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return out
    valid = _k.valid_from_hf_mask(mask, hidden.shape[0], hidden.shape[1])
    if valid is None:
        return out
    out.last_hidden_state = hidden.masked_fill(~valid.to(hidden.device)[..., None], 0.0)
    return out


def _install_capture_hooks(model: nn.Module) -> None:
    """Install transformers' output-capture hooks on the original layers before they are swapped.

    transformers installs them lazily, once, on the modules it finds; installing them now means
    ``output_hidden_states=True`` keeps working (the swapped encoder then runs the original layers)
    during the swap and after undo.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # pragma: no cover - other transformers versions
        return
    for m in model.modules():
        if getattr(m, "_can_record_outputs", None) and hasattr(m, "config"):
            maybe_install_capturing_hooks(m)  # type: ignore[arg-type]


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


def _optimum_apply(model: Any, undo: _Undo) -> None:
    from optimum.bettertransformer import BetterTransformer

    undo.freeze(model)
    snapshot = [(m, dict(m._modules)) for m in model.modules()]

    def restore() -> None:
        for m, children in snapshot:
            m._modules.clear()
            m._modules.update(children)
        if hasattr(model, "use_bettertransformer"):
            model.use_bettertransformer = False

    undo.push(restore)
    result = BetterTransformer.transform(model, keep_original_model=False)
    if result is not model:
        raise AttentionSwapError("BetterTransformer.transform did not change the model in place")


def _native_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)
    return [(n or type(m).__name__, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _candidates(model: Any) -> tuple[str, list[_Candidate], list[str]]:
    cands: list[_Candidate] = []
    notes: list[str] = []
    kind = "none"
    # Replacement modules are built once per candidate and re-installed on every apply, so what
    # they cache (concatenated and reordered weights) is built once, not in every timed call.
    made: dict[tuple[str, int], nn.Module] = {}

    def once(key: str, original: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
        new = made.get((key, id(original)))
        if new is None:
            new = made[(key, id(original))] = build()
        return new

    registered = [
        (cls, fn)
        for cls, fn in _REGISTRY.items()
        if any(isinstance(m, cls) for m in model.modules())
    ]
    if registered:
        kind = "registered"

        def apply_registered(undo: _Undo) -> None:
            for parent in list(model.modules()):
                for name, child in list(parent._modules.items()):
                    for cls, fn in registered:
                        if isinstance(child, cls):
                            undo.set_child(parent, name, fn(child))
                            break
            undo.freeze(model)

        cands.append(_Candidate("registered", apply_registered, True, _PLAIN))

    if _is_hf(model):
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

            def apply_impl(undo: _Undo, impl: str = impl) -> None:
                _set_attn(model, impl, undo)
                undo.freeze(model)
                for _, enc in encoders:
                    h = enc.register_forward_hook(_zero_padded_hook, with_kwargs=True)
                    undo.push(h.remove)

            cands.append(_Candidate(f"hf:{impl}", apply_impl, True, _PLAIN, why))
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

                def apply_enc(undo: _Undo, mode: str = mode) -> None:
                    _install_capture_hooks(model)
                    _set_attn(model, "sdpa", undo)  # masks arrive as bool (or None when unpadded)
                    undo.freeze(model)
                    for _, enc in encoders:
                        where = _find_parent(model, enc)
                        assert where is not None
                        new = once(
                            mode,
                            enc,
                            lambda enc=enc, mode=mode: _k.FastHFEncoder(  # type: ignore[misc]
                                enc, mode, _hf_output_cls(enc)
                            ),
                        )
                        undo.set_child(*where, new)

                useful, reason = (False, _PACKED) if mode == "packed" else (False, _OPAQUE)
                why = layer_why or (fused_why if mode == "fused" else "")
                if not why and not supports["sdpa"]:
                    why = f"{cls.__name__} does not support sdpa masks"
                cands.append(_Candidate(f"hf:{mode}", apply_enc, useful, reason, why))
        ok, message = optimum_status(model)
        if ok:
            cands.append(
                _Candidate(
                    "optimum:bettertransformer",
                    lambda undo: _optimum_apply(model, undo),
                    False,
                    _OPAQUE,
                )
            )
        else:
            notes.append(f"legacy BetterTransformer: {message}")

    natives = _native_modules(model)
    if natives and not _is_hf(model):
        kind = "torch" if kind == "none" else kind
        tencoders = [m for _, m in natives if isinstance(m, nn.TransformerEncoder)]

        def apply_fastpath(undo: _Undo, nested: bool = False) -> None:
            undo.freeze(model)
            for enc in tencoders:
                old = enc.use_nested_tensor
                enc.use_nested_tensor = nested and not _why.encoder_nested_init_reason(enc)
                undo.push(lambda enc=enc, old=old: setattr(enc, "use_nested_tensor", old))  # type: ignore[misc]

        cands.append(_Candidate("torch:fastpath", apply_fastpath, False, _OPAQUE))
        if tencoders:
            init_why = next((r for r in map(_why.encoder_nested_init_reason, tencoders) if r), "")
            cands.append(
                _Candidate(
                    "torch:fastpath-nested",
                    lambda undo: apply_fastpath(undo, nested=True),
                    False,
                    _OPAQUE,
                    f"nested tensors are off because {init_why}" if init_why else "",
                    skips_padding_only=True,
                )
            )
            packed_why = next(
                (
                    r
                    for e in tencoders
                    for lyr in e.layers
                    if (r := _k.torch_layer_unsupported(lyr))
                ),
                "",
            )

            def apply_packed(undo: _Undo) -> None:
                undo.freeze(model)
                for enc in tencoders:
                    where = _find_parent(model, enc)
                    if where is None:
                        raise AttentionSwapError(
                            "the model itself is an nn.TransformerEncoder: wrap it in a module "
                            "(torch:packed replaces the encoder inside its parent)"
                        )
                    new = once("packed", enc, lambda enc=enc: _k.PackedTorchEncoder(enc))  # type: ignore[misc]
                    undo.set_child(*where, new)

            if not packed_why and any(_find_parent(model, e) is None for e in tencoders):
                packed_why = "the model is a bare nn.TransformerEncoder (no parent to swap it in)"
            cands.append(_Candidate("torch:packed", apply_packed, False, _PACKED, packed_why))
    return kind, cands, notes


# --------------------------------------------------------------------------------------------
# Running, comparing, timing
# --------------------------------------------------------------------------------------------


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def _valid_mask(model: nn.Module, inputs: Any) -> torch.Tensor | None:
    """The ``(B, T)`` bool validity of the example batch, from its padding/attention mask."""
    if isinstance(inputs, Mapping):
        named = dict(inputs)
    else:
        args = inputs if isinstance(inputs, tuple | list) else (inputs,)
        try:
            named = dict(inspect.signature(model.forward).bind_partial(*args).arguments)
        except (TypeError, ValueError):
            return None
    mask = named.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    for key in ("src_key_padding_mask", "key_padding_mask", "padding_mask"):
        mask = named.get(key)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return ~mask if mask.dtype == torch.bool else mask == 0
    return None


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.to_padded_tensor(0.0) if out.is_nested else out]
    if hasattr(out, "to_tuple"):
        return _tensors(out.to_tuple())
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in _tensors(v)]
    return []


def _normalised(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Padded positions set to zero, so paths with different padded semantics compare equal."""
    if valid is None or t.dim() < 2:
        return t
    v = valid.to(t.device)
    if tuple(t.shape[:2]) == tuple(v.shape):
        return t.masked_fill(~v.view(*v.shape, *([1] * (t.dim() - 2))), 0)
    if tuple(t.shape[:2]) == tuple(v.shape[::-1]):  # (T, B, ...) sequence-first outputs
        vt = v.t()
        return t.masked_fill(~vt.reshape(*vt.shape, *([1] * (t.dim() - 2))), 0)
    return t


def _compare(
    ref: list[torch.Tensor],
    out: list[torch.Tensor],
    valid: torch.Tensor | None,
    tolerance: tuple[float, float] | None,
) -> tuple[float, str]:
    """Max abs error on valid positions and a mismatch message ("" if within tolerance)."""
    if len(ref) != len(out):
        return float("inf"), f"returned {len(out)} tensors, the original {len(ref)}"
    worst = 0.0
    problem = ""
    for i, (r, o) in enumerate(zip(ref, out)):
        if r.shape != o.shape:
            return float(
                "inf"
            ), f"output {i} has shape {tuple(o.shape)}, the original {tuple(r.shape)}"
        if not r.is_floating_point():
            if not torch.equal(r, o):
                return float("inf"), f"output {i} ({r.dtype}) differs"
            continue
        rn, on = _normalised(r, valid).float(), _normalised(o, valid).float()
        both_nan = rn.isnan() & on.isnan()
        diff = (rn - on).abs().masked_fill(both_nan, 0)
        err = float(diff.max()) if diff.numel() else 0.0
        if err != err:  # NaN where the original has a number
            err = float("inf")
        worst = max(worst, err)
        atol, rtol = tolerance or TOLERANCES.get(r.dtype, (1e-4, 1e-3))
        bad = diff > atol + rtol * rn.abs().masked_fill(both_nan, 0)
        if bool(bad.any()) and not problem:
            problem = (
                f"output {i} differs from the original on {int(bad.sum())} valid elements "
                f"(max abs error {err:.3g}, tolerance atol={atol:g} rtol={rtol:g} for {r.dtype})"
            )
    return worst, problem


def _sync(model: nn.Module) -> None:
    try:
        p = next(model.parameters())
    except StopIteration:
        return
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


# --------------------------------------------------------------------------------------------
# Fastpath diagnosis
# --------------------------------------------------------------------------------------------


def _diagnose(model: nn.Module, inputs: Any) -> tuple[tuple[str, str], ...]:
    """Run ``inputs`` once and record, per native module, the reason its fastpath is skipped."""
    found = _native_modules(model)
    if not found:
        return ()
    if inputs is None:
        return _diagnose_static(found)
    results: dict[str, str] = {}
    handles = []

    def make_hook(name: str, mod: nn.Module) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
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
        _call(model, inputs)
    except Exception:
        return ()  # _measure reports the bad inputs with a clear message
    finally:
        for h in handles:
            h.remove()
    return tuple(results.items())


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


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PaddingProfile:
    batch_size: int
    seq_len: int
    padding: float

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1 or not 0.0 <= self.padding < 1.0:
            raise ConfigError(
                "padding_profile must be (batch_size >= 1, seq_len >= 1, padding in [0, 1)), "
                f"got {(self.batch_size, self.seq_len, self.padding)!r}"
            )


def _profile_inputs(model: nn.Module, profile: _PaddingProfile) -> Any:
    from fastinfer.testing import text_batch

    p = next(model.parameters())
    if _is_hf(model):
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids, mask = text_batch(
            profile.batch_size, profile.seq_len, padding=profile.padding, vocab_size=vocab
        )
        return {"input_ids": ids.to(p.device), "attention_mask": mask.to(p.device)}
    if isinstance(model, nn.TransformerEncoder | nn.TransformerEncoderLayer):
        first = model.layers[0] if isinstance(model, nn.TransformerEncoder) else model
        d = first.self_attn.embed_dim
        _, mask = text_batch(profile.batch_size, profile.seq_len, padding=profile.padding)
        gen = torch.Generator().manual_seed(0)
        src = torch.randn(profile.batch_size, profile.seq_len, d, generator=gen).to(p)
        pad = (mask == 0).to(p.device)
        if not first.self_attn.batch_first:
            src = src.transpose(0, 1)
        return {"src": src, "src_key_padding_mask": pad}
    raise ConfigError(
        f"padding_profile can only build inputs for Hugging Face models and nn.TransformerEncoder"
        f"(Layer); for {type(model).__name__} pass example_inputs instead"
    )


def swap(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    prefer: str | Sequence[str] | None = None,
    verify: bool = True,
    padding_profile: tuple[int, int, float] | None = None,
    repeat: int = 5,
    warmup: int = 1,
    tolerance: tuple[float, float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> AttentionReport:
    """See :func:`fastinfer.swap_attention_` (the public wrapper holds the docstring)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"swap_attention_ needs an nn.Module, got {type(model).__name__}")
    if model in _SWAPPED and _SWAPPED[model][1].chosen != ORIGINAL:
        raise AttentionSwapError(
            f"{type(model).__name__} is already swapped (to {_SWAPPED[model][1].chosen}); "
            "call fastinfer.undo_attention_swap_(model) first"
        )
    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}")
    if padding_profile is not None:
        if example_inputs is not None:
            raise ConfigError("pass example_inputs or padding_profile, not both")
        example_inputs = _profile_inputs(model, _PaddingProfile(*padding_profile))

    kind, cands, notes = _candidates(model)
    wanted = [prefer] if isinstance(prefer, str) else list(prefer or [])
    names = [c.name for c in cands]
    for w in wanted:
        if w not in names:
            raise AttentionSwapError(
                f"path {w!r} does not exist for {type(model).__name__}; its paths are {names}"
            )

    results: dict[str, PathResult] = {}
    usable = []
    for c in cands:
        if c.unavailable:
            results[c.name] = PathResult(
                c.name, False, c.unavailable, compile_useful=c.compile_useful
            )
        elif wanted and c.name not in wanted:
            results[c.name] = PathResult(
                c.name, False, "not in prefer", compile_useful=c.compile_useful
            )
        else:
            usable.append(c)
    if wanted and not usable:
        raise AttentionSwapError(
            f"preferred path(s) {wanted} cannot run here: "
            + "; ".join(f"{n}: {results[n].reason}" for n in wanted)
        )

    fast_before = _diagnose(model, example_inputs)
    if example_inputs is not None:
        chosen, results = _measure(
            model,
            example_inputs,
            usable,
            results,
            verify,
            repeat,
            warmup,
            tolerance,
            clock,
            must_beat_original=not wanted,
        )
        measured = True
    else:
        chosen = _rule_choice(kind, usable)
        measured = False
        for c in usable:
            results[c.name] = PathResult(c.name, True, compile_useful=c.compile_useful)
        if verify and chosen != ORIGINAL:
            notes.append("not verified: pass example_inputs (or padding_profile) to verify")

    undo = _Undo()
    verified: bool | None = None
    reverted = False
    by_name = {c.name: c for c in cands}
    if chosen != ORIGINAL:
        try:
            by_name[chosen].apply(undo)
        except Exception:
            undo()
            raise
        if measured and verify:
            verified = bool(results[chosen].verified)
    elif measured and verify:
        rejected = [r.name for r in results.values() if r.verified is False]
        if rejected:
            reverted = True
            verified = False
            notes.append(
                "every candidate that ran was rejected by verification ("
                + ", ".join(rejected)
                + "); the model is left unchanged"
            )
    fast_after = _diagnose(model, example_inputs) if chosen != ORIGINAL else fast_before

    kept = by_name.get(chosen)
    compile_useful, compile_reason = (
        (kept.compile_useful, kept.compile_reason) if kept else (True, "the model is unchanged")
    )
    report = AttentionReport(
        model=type(model).__name__,
        kind=kind,
        chosen=chosen,
        paths=tuple(results[n] for n in [ORIGINAL, *names] if n in results),
        verified=verified,
        reverted=reverted,
        compile_useful=compile_useful,
        compile_reason=compile_reason,
        fastpath_before=fast_before,
        fastpath_after=fast_after,
        notes=tuple(notes),
        measured=measured,
    )
    if chosen != ORIGINAL:
        # Read by compile selectors (primitives do not import each other): compile or not.
        info = {"path": chosen, "compile_useful": compile_useful, "compile_reason": compile_reason}
        model.__dict__["_fastinfer_attention"] = info
        undo.push(lambda: model.__dict__.pop("_fastinfer_attention", None))
    _SWAPPED[model] = (undo, report)  # undo is a no-op when the original was kept
    logger.info("attention swap for %s: %s", type(model).__name__, chosen)
    return report


def _rule_choice(kind: str, usable: list[_Candidate]) -> str:
    names = [c.name for c in usable]
    order = [
        "registered",
        "hf:flash_attention_2",
        "hf:packed",
        "torch:fastpath-nested",
        "torch:fastpath",
        "hf:sdpa",
    ]
    for n in order:
        if n in names:
            return n
    return names[0] if names else ORIGINAL


def _measure(
    model: nn.Module,
    inputs: Any,
    usable: list[_Candidate],
    results: dict[str, PathResult],
    verify: bool,
    repeat: int,
    warmup: int,
    tolerance: tuple[float, float] | None,
    clock: Callable[[], float],
    *,
    must_beat_original: bool = True,
) -> tuple[str, dict[str, PathResult]]:
    valid = _valid_mask(model, inputs)
    try:
        ref = [t.detach().clone() for t in _tensors(_call(model, inputs))]
    except Exception as exc:
        raise ConfigError(
            f"calling {type(model).__name__} with example_inputs failed ({type(exc).__name__}: "
            f"{exc}); pass what the model takes: a dict of keyword arguments, a tuple of "
            "positional arguments, or one tensor"
        ) from exc
    runners: dict[str, _Candidate | None] = {ORIGINAL: None}
    errors: dict[str, tuple[float, str]] = {ORIGINAL: (0.0, "")}
    failed: dict[str, str] = {}
    results = dict(results)
    if must_beat_original and valid is not None and bool(valid.all()):
        # Without padding a nested-tensor path is its dense twin plus a conversion: not timed, so
        # that noise on a busy machine cannot pick it.
        for cand in [c for c in usable if c.skips_padding_only]:
            results[cand.name] = PathResult(
                cand.name,
                False,
                "the example inputs have no padding: nested tensors would only add a conversion",
                compile_useful=cand.compile_useful,
            )
        usable = [c for c in usable if not c.skips_padding_only]
    for cand in usable:
        undo = _Undo()
        try:
            cand.apply(undo)
            got = _tensors(_call(model, inputs))
            errors[cand.name] = _compare(ref, got, valid, tolerance)
            for _ in range(max(warmup - 1, 0)):
                _call(model, inputs)
            runners[cand.name] = cand
        except Exception as exc:  # a candidate that cannot run is reported, not fatal
            failed[cand.name] = f"{type(exc).__name__}: {exc}"
        finally:
            undo()
    for _ in range(warmup):
        _call(model, inputs)
    samples: dict[str, list[float]] = {n: [] for n in runners}

    def timed_round(names: list[str]) -> None:
        for name in names:
            runner = runners[name]
            undo = _Undo()
            try:
                if runner is not None:
                    runner.apply(undo)
                _sync(model)
                t0 = clock()
                _call(model, inputs)
                _sync(model)
                samples[name].append(clock() - t0)
            finally:
                undo()

    for _ in range(repeat):
        timed_round(list(runners))
    # Second look at the contenders only: the two fastest correct paths and the original get
    # `repeat` more interleaved samples, so a noisy machine does not decide between close paths.
    correct = [n for n in runners if not (verify and errors[n][1])]
    contenders = sorted(correct, key=lambda n: _stats.median(samples[n]))[:2]
    second = list(dict.fromkeys([ORIGINAL, *contenders]))
    if len(second) > 1 and len(runners) > 2:
        for _ in range(repeat):
            timed_round(second)
    out: dict[str, PathResult] = dict(results)
    for name, ts in samples.items():
        med = _stats.median(ts)
        err, problem = errors[name]
        ok = None if not verify else not problem
        runner = runners[name]
        out[name] = PathResult(
            name,
            True,
            problem,
            med,
            (max(ts) - min(ts)) / med if med else None,
            err,
            ok,
            None if runner is None else runner.compile_useful,
        )
    for name, why in failed.items():
        cu = next(x.compile_useful for x in usable if x.name == name)
        out[name] = PathResult(name, False, f"failed: {why}", compile_useful=cu)
    eligible = [n for n in samples if n != ORIGINAL and (not verify or out[n].verified)]
    rejected = [n for n in samples if verify and out[n].verified is False]
    for n in rejected:
        logger.warning("attention path %s rejected: %s", n, out[n].reason)
    if not eligible:
        return ORIGINAL, out
    best = min(eligible, key=lambda n: out[n].latency_s or float("inf"))
    base = out[ORIGINAL].latency_s or float("inf")
    # Keep the original when nothing beats it (unless the caller asked for a path with prefer=).
    if must_beat_original and (out[best].latency_s or float("inf")) >= base:
        return ORIGINAL, out
    return best, out


def undo(model: nn.Module) -> AttentionReport:
    """Restore the model exactly as it was before :func:`swap_attention_`; returns that report.

    Raises:
        AttentionSwapError: the model is not swapped.
    """
    entry = _SWAPPED.pop(model, None)
    if entry is None:
        raise AttentionSwapError(
            f"{type(model).__name__} has no attention swap to undo: swap_attention_ was not "
            "called on it, or it was already undone"
        )
    undo, report = entry
    undo()
    return report


def swapped_path(model: nn.Module) -> str | None:
    """The path a model is swapped to, or None (what compile selectors may consult)."""
    entry = _SWAPPED.get(model)
    return entry[1].chosen if entry and entry[1].chosen != ORIGINAL else None

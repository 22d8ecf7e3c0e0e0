"""Fused attention kernels, nested tensors and fastpath internals (used by fastinfer.attention)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from fastinfer._torch_compat._registry import entry

# --------------------------------------------------------------------------------------------
# Fused attention kernels (attention)
# --------------------------------------------------------------------------------------------


def mkldnn_reorder_linear_weight(weight: torch.Tensor) -> Any:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def mkldnn_linear_pointwise(
    x: torch.Tensor, packed: Any, bias: torch.Tensor, act: str
) -> torch.Tensor:
    """``act(x @ packed.T + bias)`` on a reordered weight; ``act`` "", "relu" or "gelu" (exact)."""
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
        x, packed, bias, act or "none", [], algorithm
    )


@entry(
    "mkldnn_linear",
    "torch.ops.mkldnn._reorder_linear_weight(w, batch_size) + "
    "torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algorithm)",
    "attention: the packed path's dense layers on CPU float32 (falls back to F.linear)",
    "2.1 - 2.13",
)
def _probe_mkldnn_linear() -> str:
    if not torch.backends.mkldnn.is_available():
        return "oneDNN is not available in this torch build"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return "torch.ops.mkldnn has no _reorder_linear_weight/_linear_pointwise"
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen) for s in ((4, 16), (8, 16), (8,)))
    packed = mkldnn_reorder_linear_weight(w)
    for act, ref in (
        ("", torch.nn.functional.linear(x, w, b)),
        ("relu", torch.relu(torch.nn.functional.linear(x, w, b))),
        ("gelu", torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))),
    ):
        got = mkldnn_linear_pointwise(x, packed, b, act)
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
            return f"_linear_pointwise with {act or 'no'} activation disagrees with F.linear"
    return ""


def transformer_encoder_layer_fwd(
    x: torch.Tensor,
    *,
    embed_dim: int,
    heads: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    gelu: bool,
    norm_first: bool,
    eps: float,
    norm1_weight: torch.Tensor,
    norm1_bias: torch.Tensor,
    norm2_weight: torch.Tensor,
    norm2_bias: torch.Tensor,
    ffn_in_weight: torch.Tensor,
    ffn_in_bias: torch.Tensor,
    ffn_out_weight: torch.Tensor,
    ffn_out_bias: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """``torch._transformer_encoder_layer_fwd`` with its 20 positional arguments named."""
    return torch._transformer_encoder_layer_fwd(
        x,
        embed_dim,
        heads,
        qkv_weight,
        qkv_bias,
        out_weight,
        out_bias,
        gelu,
        norm_first,
        eps,
        norm1_weight,
        norm1_bias,
        norm2_weight,
        norm2_bias,
        ffn_in_weight,
        ffn_in_bias,
        ffn_out_weight,
        ffn_out_bias,
        mask,
        None if mask is None else 1,
    )


@entry(
    "transformer_encoder_layer_fwd",
    "torch._transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, "
    "proj_b, use_gelu, norm_first, eps, n1_w, n1_b, n2_w, n2_b, ffn1_w, ffn1_b, ffn2_w, ffn2_b, "
    "mask, mask_type)",
    "attention: the hf:fused path (PyTorch's fused encoder-layer kernel)",
    "2.0 - 2.13",
)
def _probe_encoder_layer_fwd() -> str:
    """Run the op on a real ``nn.TransformerEncoderLayer``'s weights; it must match the layer."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with torch.inference_mode():
        ref = layer._sa_block(x, None, None, is_causal=False)  # post-norm, as BERT
        ref = layer.norm1(x + ref)
        ref = layer.norm2(ref + layer._ff_block(ref))
        got = transformer_encoder_layer_fwd(
            x,
            embed_dim=8,
            heads=2,
            qkv_weight=layer.self_attn.in_proj_weight,
            qkv_bias=layer.self_attn.in_proj_bias,
            out_weight=layer.self_attn.out_proj.weight,
            out_bias=layer.self_attn.out_proj.bias,
            gelu=False,
            norm_first=False,
            eps=layer.norm1.eps,
            norm1_weight=layer.norm1.weight,
            norm1_bias=layer.norm1.bias,
            norm2_weight=layer.norm2.weight,
            norm2_bias=layer.norm2.bias,
            ffn_in_weight=layer.linear1.weight,
            ffn_in_bias=layer.linear1.bias,
            ffn_out_weight=layer.linear2.weight,
            ffn_out_bias=layer.linear2.bias,
            mask=None,
        )
    return (
        "" if torch.allclose(got, ref, atol=1e-5) else "the fused layer disagrees with the module"
    )


def nested_mask_left_aligned(x: torch.Tensor, valid: torch.Tensor) -> bool:
    return bool(torch._nested_tensor_from_mask_left_aligned(x, valid))


def nested_from_mask(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch warns on every first use that nested tensors are a prototype: nothing a user of
        # fastinfer can act on (the padding-free paths are verified against the original).
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage")
        return torch._nested_tensor_from_mask(x, valid, mask_check=False)


_nested_warning_spent = False


def spend_nested_prototype_warning() -> None:
    """Let torch's "nested tensors are in prototype stage" warning fire once here, silenced.

    torch emits it once per process (a ``TORCH_WARN_ONCE`` in the nested tensor's constructor),
    on the first nested tensor made anywhere, ``nn.TransformerEncoder``'s own fastpath included.
    Code that runs such a model on purpose (the attention swap timing the model as built and its
    nested candidates) calls this first, so the warning never reaches the user's console.
    """
    global _nested_warning_spent
    if not _nested_warning_spent:
        nested_from_mask(torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))
        _nested_warning_spent = True


@entry(
    "nested_from_mask",
    "torch._nested_tensor_from_mask(x, mask, mask_check=) + "
    "torch._nested_tensor_from_mask_left_aligned(x, mask)",
    "attention: fused and fastpath-nested paths skip padding with nested tensors",
    "2.0 - 2.13",
)
def _probe_nested() -> str:
    x = torch.randn(2, 3, 4)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    if not nested_mask_left_aligned(x, valid):
        return "a right-padded mask is not reported left-aligned"
    if nested_mask_left_aligned(x, valid.flip(1)):
        return "a left-padded mask is reported left-aligned"
    nt = nested_from_mask(x, valid)
    rows = nt.unbind()
    return "" if [r.shape[0] for r in rows] == [3, 1] else f"nested rows {[r.shape for r in rows]}"


def mha_fastpath_enabled() -> bool:
    return bool(torch.backends.mha.get_fastpath_enabled())


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` on their plain path while inside
    (process-wide: other threads lose the fastpath meanwhile, not correctness). The ONNX exporters
    cannot export the fused ops the fastpath calls."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def canonical_masks(
    padding: torch.Tensor | None,
    padding_name: str,
    other: torch.Tensor | None,
    other_name: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A key-padding mask and an attention mask made canonical (float, additive) exactly as
    ``MultiheadAttention`` / ``TransformerEncoderLayer.forward`` do before their fastpath checks
    (``torch.nn.functional._canonical_mask``)."""
    import torch.nn.functional as F

    padding = F._canonical_mask(
        mask=padding,
        mask_name=padding_name,
        other_type=F._none_or_dtype(other),
        other_name=other_name,
        target_type=dtype,
    )
    other = F._canonical_mask(
        mask=other,
        mask_name=other_name,
        other_type=None,
        other_name="",
        target_type=dtype,
        check_other=False,
    )
    return padding, other


@entry(
    "mha_fastpath",
    "torch.backends.mha.get_fastpath_enabled(), torch.nn.functional._canonical_mask, "
    "MultiheadAttention._qkv_same_embed_dim and the fastpath conditions of "
    "TransformerEncoder/TransformerEncoderLayer/MultiheadAttention.forward",
    "attention: explains why PyTorch's fastpath is not taken",
    "2.1 - 2.13",
)
def _probe_mha_fastpath() -> str:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not callable(getattr(mha, "get_fastpath_enabled", None)):
        return "torch.backends.mha.get_fastpath_enabled is gone"
    # The reasons fastinfer gives mirror the checks in these forwards; they must still exist.
    src = inspect.getsource(torch.nn.TransformerEncoderLayer.forward)
    for needle in (
        "why_not_sparsity_fast_path",
        "_transformer_encoder_layer_fwd",
        "_canonical_mask",
    ):
        if needle not in src:
            return f"TransformerEncoderLayer.forward no longer mentions {needle}"
    if not hasattr(torch.nn.MultiheadAttention(4, 2), "_qkv_same_embed_dim"):
        return "MultiheadAttention has no _qkv_same_embed_dim"
    pad = torch.tensor([[False, True]])
    got, none = canonical_masks(pad, "key_padding_mask", None, "attn_mask", torch.float32)
    if none is not None or got is None or got.dtype != torch.float32 or not bool(got[0, 1] < 0):
        return f"_canonical_mask made {got!r} of a bool padding mask"
    return ""

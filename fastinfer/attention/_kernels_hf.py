"""Replacement encoders for Hugging Face BERT-family models: packed valid tokens and PyTorch's fused layer kernel.

Two ways to skip padding, both on the model's own weights (state-dict keys do not change):

* **packed**: gather the valid tokens once, ``(B, T, D) -> (N, D)``, run every dense op (QKV
  projection, output projection, feed-forward, layer norms) on the ``N`` valid rows only, and give
  attention each sequence's structure back by scattering Q/K/V into a zeroed ``(B, T_max, 3D)``
  buffer for one masked SDPA call. Scatter the result back (padded rows = exact zeros) at the end.
  On CPU in float32 the dense ops run through oneDNN on weights reordered once into its blocked
  layout (the activation fused into the first feed-forward matmul): 1.10-1.28x ``F.linear`` on
  BERT's shapes (``benchmarks/bench_dense.py``), for a second copy of the dense weights in memory.
* **fused**: what optimum's BetterTransformer did: every layer runs
  ``torch._transformer_encoder_layer_fwd`` (the op behind ``nn.TransformerEncoderLayer``'s
  fastpath), on a nested tensor when the batch is padded.

The encoders fall back to the original modules whenever an input is outside what they handle
(training, autograd, cross-attention, caches, non-padding masks, output capture); the fallback is
exact because it *is* the original code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer import _torch_compat
from fastinfer.attention._guard import GuardedEncoder, tracing
from fastinfer.attention._packing import (
    Packing,
    autocast_enabled,
    cached_cat,
    dense,
    drop_cache,
    prepack,
)

__all__ = [
    "HF_LAYER_PARTS",
    "FastHFEncoder",
    "FastHFLayer",
    "LayerParts",
    "hf_layer_fused_unsupported",
    "hf_layer_unsupported",
    "run_fused_layers",
    "valid_from_hf_mask",
]


@dataclass(frozen=True)
class LayerParts:
    """The pieces of a post-norm encoder layer, named the same way for every model family."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    norm1: nn.LayerNorm
    ffn_in: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    ffn_out: nn.Linear
    norm2: nn.LayerNorm
    heads: int
    act_name: str


def act_name(act: Any) -> str:
    name = type(act).__name__
    if name == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return "gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if isinstance(act, nn.ReLU) or act is F.relu:
        return "relu"
    if act is F.gelu:
        return "gelu"
    return name


def bert_parts(layer: Any) -> LayerParts:
    """BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA (``attention.self`` / ``attention.output``)."""
    att = layer.attention
    act = layer.intermediate.intermediate_act_fn
    return LayerParts(
        q=att.self.query,
        k=att.self.key,
        v=att.self.value,
        out=att.output.dense,
        norm1=att.output.LayerNorm,
        ffn_in=layer.intermediate.dense,
        act=act,
        ffn_out=layer.output.dense,
        norm2=layer.output.LayerNorm,
        heads=att.self.num_attention_heads,
        act_name=act_name(act),
    )


def distilbert_parts(layer: Any) -> LayerParts:
    """DistilBERT's ``TransformerBlock``."""
    att = layer.attention
    return LayerParts(
        q=att.q_lin,
        k=att.k_lin,
        v=att.v_lin,
        out=att.out_lin,
        norm1=layer.sa_layer_norm,
        ffn_in=layer.ffn.lin1,
        act=layer.ffn.activation,
        ffn_out=layer.ffn.lin2,
        norm2=layer.output_layer_norm,
        heads=att.n_heads,
        act_name=act_name(layer.ffn.activation),
    )


# layer class name -> how to read its parts
HF_LAYER_PARTS: dict[str, Callable[[Any], LayerParts]] = {
    "BertLayer": bert_parts,
    "RobertaLayer": bert_parts,
    "XLMRobertaLayer": bert_parts,
    "CamembertLayer": bert_parts,
    "ElectraLayer": bert_parts,
    "TransformerBlock": distilbert_parts,
}

_PLAIN = (nn.Linear, nn.LayerNorm)
_TENSORS = (nn.Parameter, torch.Tensor)


def hf_layer_unsupported(layer: nn.Module) -> str:
    """Why an HF layer cannot be run by the packed path ("" when it can)."""
    name = type(layer).__name__
    if name not in HF_LAYER_PARTS:
        return f"{name} is not a supported encoder layer ({', '.join(sorted(HF_LAYER_PARTS))})"
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        return f"{name} is a decoder layer (causal or cross-attention)"
    if getattr(layer, "chunk_size_feed_forward", 0):
        return f"{name} chunks its feed-forward (chunk_size_feed_forward != 0)"
    p = HF_LAYER_PARTS[name](layer)
    lins = (p.q, p.k, p.v, p.out, p.ffn_in, p.ffn_out)
    odd = [type(m).__name__ for m in (*lins, p.norm1, p.norm2) if type(m) not in _PLAIN]
    if odd:  # the fast paths read .weight/.bias and run them their own way
        return f"{name} has a {odd[0]} where the fast paths need a plain nn.Linear / nn.LayerNorm"
    if any(type(t) not in _TENSORS for m in lins for t in (m.weight, m.bias) if t is not None):
        return f"{name} has weights of a tensor subclass (quantized?) the fast paths cannot run"
    d = p.q.in_features
    if any(lin.bias is None for lin in (p.q, p.k, p.v, p.out, p.ffn_in, p.ffn_out)):
        return f"{name} has a Linear without bias"
    if p.q.out_features != d or d % p.heads:
        return f"{name} has a head layout the packed path does not handle"
    return ""


def hf_layer_fused_unsupported(parts: LayerParts) -> str:
    """Why torch._transformer_encoder_layer_fwd cannot run this layer ("" when it can)."""
    if parts.act_name not in ("gelu", "relu"):
        return f"activation {parts.act_name!r} is not exact gelu or relu (the fused kernel has only those)"
    if parts.norm1.eps != parts.norm2.eps:
        return "the two LayerNorms have different eps"
    if parts.heads % 2:
        return "num_heads is odd"
    return ""


class FastHFLayer:
    """The fast paths of one HF encoder layer, on that layer's own weights.

    A plain object, not a module: the original layer stays in the model (so the state dict, the
    module tree and transformers' output-capture hooks, installed lazily on the layer classes it
    knows, are unchanged). :meth:`packed` and :meth:`fused` are called by :class:`FastHFEncoder`,
    which holds what they cache (concatenated and reordered weights, under ``"<index>.<name>"``)
    and drops it when pickled or copied.
    """

    def __init__(self, layer: Any, owner: nn.Module, index: int):
        self.parts = HF_LAYER_PARTS[type(layer).__name__](layer)
        self.owner = owner
        self.prefix = f"{index}."

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        p, o, i = self.parts, self.owner, self.prefix
        w = cached_cat(o, f"{i}w", [p.q.weight, p.k.weight, p.v.weight])
        b = cached_cat(o, f"{i}b", [p.q.bias, p.k.bias, p.v.bias])  # type: ignore[list-item]
        return w, b

    def prepack(self) -> None:
        """Build the cached weights of the packed path now (at swap time, not in a request)."""
        p, o, i = self.parts, self.owner, self.prefix
        w, b = self._qkv()
        prepack(o, f"{i}qkv", w, b, sources=[p.q.weight, p.k.weight, p.v.weight])
        for name, lin in (("out", p.out), ("ffn_in", p.ffn_in), ("ffn_out", p.ffn_out)):
            prepack(o, f"{i}{name}", lin.weight, lin.bias)

    def packed(self, h: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``(N, D)`` valid tokens in, ``(N, D)`` out."""
        p, o, i = self.parts, self.owner, self.prefix
        w, b = self._qkv()
        qkv = dense(o, f"{i}qkv", h, w, b, sources=[p.q.weight, p.k.weight, p.v.weight])
        a = packing.attention(qkv, p.heads)  # (N, D)
        a = p.norm1(dense(o, f"{i}out", a, p.out.weight, p.out.bias) + h)
        if p.act_name in ("gelu", "relu"):
            f = dense(o, f"{i}ffn_in", a, p.ffn_in.weight, p.ffn_in.bias, p.act_name)
        else:
            f = p.act(dense(o, f"{i}ffn_in", a, p.ffn_in.weight, p.ffn_in.bias))
        return p.norm2(dense(o, f"{i}ffn_out", f, p.ffn_out.weight, p.ffn_out.bias) + a)

    def fused(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Dense ``(B, T, D)`` or nested input through PyTorch's fused encoder-layer kernel."""
        p = self.parts
        w, b = self._qkv()
        return _torch_compat.transformer_encoder_layer_fwd(
            x,
            embed_dim=p.q.in_features,
            heads=p.heads,
            qkv_weight=w,
            qkv_bias=b,
            out_weight=p.out.weight,
            out_bias=p.out.bias,
            gelu=p.act_name == "gelu",
            norm_first=False,  # BERT is post-norm
            eps=p.norm1.eps,
            norm1_weight=p.norm1.weight,
            norm1_bias=p.norm1.bias,
            norm2_weight=p.norm2.weight,
            norm2_bias=p.norm2.bias,
            ffn_in_weight=p.ffn_in.weight,
            ffn_in_bias=p.ffn_in.bias,
            ffn_out_weight=p.ffn_out.weight,
            ffn_out_bias=p.ffn_out.bias,
            mask=mask,
        )


def _capturing_outputs() -> bool:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return False
    try:
        collector = _active_collector.get()
    except LookupError:
        return False
    return bool(collector)


def valid_from_hf_mask(mask: Any, batch: int, seq: int) -> torch.Tensor | None:
    """The ``(B, T)`` key-validity of an HF 4-D encoder mask, or None if it is not a padding mask.

    Returns an all-True tensor for ``mask=None`` (sdpa drops the mask when nothing is padded).
    """
    if mask is None:
        return torch.ones(batch, seq, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0  # eager: 0 = attend, min = masked
    if allowed.shape[-1] != seq or allowed.shape[0] != batch:
        return None
    # An additive float mask is a padding mask only if every entry is 0 (attend) or so negative
    # that softmax gives exactly 0 (finfo.min, -inf; -1e4 in older transformers). Anything else
    # (a bias, a 0/1 mask passed where an additive one is expected) changes the scores of valid
    # keys: not ours to drop.
    if mask.dtype != torch.bool and not bool((allowed | (mask <= -1e4)).all()):
        return None
    keys = allowed[:, 0, 0, :]  # (B, T)
    if allowed.shape[2] > 1 and not bool((allowed[:, 0] == keys[:, None, :]).all()):
        return None  # a per-query mask (causal, custom): not a key-padding mask
    return keys


class FastHFEncoder(GuardedEncoder):
    """Replaces an HF encoder (``BertEncoder``, DistilBERT's ``Transformer``...), same state dict.

    ``mode`` is ``"packed"`` or ``"fused"``. Anything the fast path does not handle runs the
    original encoder, which shares every parameter (and its very ``_modules`` dict, so a child
    set on either is set on both) with this module. Before each fast call a :class:`TreeGuard`
    checks that the layers are still the ones the fast path was built from and carry no hooks.
    """

    def __init__(self, encoder: Any, mode: str, output_cls: Any):
        super().__init__()
        if mode not in ("packed", "fused"):
            raise ValueError(mode)
        self.__dict__["_original"] = encoder
        self.mode = mode
        self._output_cls = output_cls
        # the original layers, same state dict; the same dict, so that a layer replaced through
        # either module is replaced for both (the fallback must run what the model holds)
        self.__dict__["_modules"] = encoder._modules
        self.__dict__["_fast"] = []
        self.training = encoder.training
        self.fallbacks = 0  # forwards that ran the original encoder
        self._guard().why_not()  # reads the layers into self._fast
        for fast in self.__dict__["_fast"]:
            if mode == "packed":
                fast.prepack()
            else:
                fast._qkv()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def __getstate__(self) -> dict[str, Any]:
        return drop_cache(self)

    def _rebuild(self) -> str:
        """Read the fast path's parts from the layers the model holds now; why not, or ""."""
        self.__dict__.pop("_fastinfer_cache", None)  # rebuilt for the new parts on first use
        layers = self._modules.get("layer")
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            self.__dict__["_fast"] = []
            return "it no longer holds a ModuleList of layers"
        for i, lyr in enumerate(layers):
            why = hf_layer_unsupported(lyr)
            if not why and self.mode == "fused":
                why = hf_layer_fused_unsupported(HF_LAYER_PARTS[type(lyr).__name__](lyr))
            if why:
                self.__dict__["_fast"] = []
                return f"layer {i}: {why}"
        # one assignment: a concurrent call runs the old list or the new one, not a half-built one
        self.__dict__["_fast"] = [FastHFLayer(lyr, self, i) for i, lyr in enumerate(layers)]
        return ""

    def _fallback(self, *args: Any, **kwargs: Any) -> Any:
        self.fallbacks += 1
        self._original.training = self.training
        return self._original(*args, **kwargs)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        if tracing():  # jit.trace / export / compile: the original's plain ops, no side effects
            return self._original(hidden_states, attention_mask, *args, **kwargs)
        extra = [
            k
            for k in ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")
            if kwargs.get(k) is not None
        ]
        guard = self._guard()
        if (
            not isinstance(hidden_states, torch.Tensor)
            or (args and any(a is not None for a in args))
            or extra
            or kwargs.get("use_cache")
            or self.training
            or hidden_states.dim() != 3
            # a layer replaced or quantized, a hook on a layer: the original modules must run
            or guard.why_not()
            # autograd through the encoder's weights or its input: the original layers
            or (torch.is_grad_enabled() and (hidden_states.requires_grad or guard.wants_grad()))
            or autocast_enabled(hidden_states)
            # transformers records hidden states/attentions with hooks on its own layers: run them
            or _capturing_outputs()
        ):
            return self._fallback(hidden_states, attention_mask, *args, **kwargs)
        b, t, _ = hidden_states.shape
        valid = valid_from_hf_mask(attention_mask, b, t)
        if valid is None:
            return self._fallback(hidden_states, attention_mask, *args, **kwargs)
        valid = valid.to(hidden_states.device)
        if self.mode == "packed":
            packing = Packing.from_valid(valid)
            h = packing.pack(hidden_states)
            for layer in self.__dict__["_fast"]:
                h = layer.packed(h, packing)
            out = packing.unpack(h)
        else:
            fns = [lyr.fused for lyr in self.__dict__["_fast"]]
            out = run_fused_layers(fns, hidden_states, valid)
        return self._output_cls(last_hidden_state=out)


def run_fused_layers(
    layers: list[Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]],
    x: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Run fused layer kernels over ``x`` with padding skipped via a nested tensor when possible."""
    if bool(valid.all()):
        h = x
        for fn in layers:
            h = fn(h, None)
        return h
    if _torch_compat.nested_mask_left_aligned(x, valid):
        nt = _torch_compat.nested_from_mask(x, valid)
        for fn in layers:
            nt = fn(nt, None)
        return nt.to_padded_tensor(0.0, x.size())
    # Left-padded: no nested tensor; the kernel masks keys, padded rows are zeroed afterwards.
    pad_mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill_(
        ~valid, float("-inf")
    )
    h = x
    for fn in layers:
        h = fn(h, pad_mask)
    return h.masked_fill(~valid[..., None], 0.0)

"""Replacement encoders for the attention swap: packed valid tokens and PyTorch's fused layer kernel.

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

# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@dataclass
class Packing:
    """Where the valid tokens of a ``(B, T)`` batch live, computed once per forward."""

    batch: int
    seq: int
    valid: torch.Tensor  # (B, T) bool
    all_valid: bool
    index: torch.Tensor | None  # (N,) flat positions in B*T
    index_trim: torch.Tensor | None  # (N,) flat positions in B*T_max
    t_max: int
    key_mask: torch.Tensor | None  # (B, 1, 1, T_max) bool, True = attend

    @classmethod
    def from_valid(cls, valid: torch.Tensor) -> Packing:
        b, t = valid.shape
        if bool(valid.all()):
            return cls(b, t, valid, True, None, None, t, None)
        cols = valid.any(0).nonzero()
        t_max = int(cols.max()) + 1 if cols.numel() else 1
        valid_trim = valid[:, :t_max]
        index = valid.reshape(-1).nonzero().squeeze(1)
        index_trim = valid_trim.reshape(-1).nonzero().squeeze(1)
        return cls(b, t, valid, False, index, index_trim, t_max, valid_trim[:, None, None, :])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        flat = x.reshape(self.batch * self.seq, d)  # (B*T, D)
        return flat if self.index is None else flat.index_select(0, self.index)  # (N, D)

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        d = h.shape[-1]
        if self.index is None:
            return h.view(self.batch, self.seq, d)
        out = h.new_zeros(self.batch * self.seq, d)
        out.index_copy_(0, self.index, h)
        return out.view(self.batch, self.seq, d)  # (B, T, D), padded rows are zeros

    def attention(self, qkv: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
        """Self-attention per sequence for packed ``(N, 3D)`` Q|K|V; returns packed ``(N, D)``."""
        d3 = qkv.shape[-1]
        d = d3 // 3
        b = self.batch
        if self.index_trim is None:
            view = qkv.view(b, self.seq, 3, heads, d // heads)  # (B, T, 3, H, Dh)
            q, k, v = view.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh)
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return o.transpose(1, 2).reshape(b * self.seq, d)
        buf = qkv.new_zeros(b * self.t_max, d3)  # zeros: masked keys must not hold NaN garbage
        buf.index_copy_(0, self.index_trim, qkv)
        view = buf.view(b, self.t_max, 3, heads, d // heads)  # (B, Tm, 3, H, Dh)
        q, k, v = view.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, Tm, Dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.key_mask, scale=scale)
        o = o.transpose(1, 2).reshape(b * self.t_max, d)  # (B*Tm, D)
        return o.index_select(0, self.index_trim)  # (N, D)


def _cached(owner: Any, name: str, parts: list[torch.Tensor], build: Callable[[], Any]) -> Any:
    """``build()``, cached on ``owner`` until any of ``parts`` changes.

    A change is a new tensor (``load_state_dict(assign=True)``, ``.to()``, ``p.data = ...``) or an
    in-place write through the parameter itself (``load_state_dict``, ``p.copy_()`` under
    ``no_grad``). The entry holds the parts' storages, so a new tensor can never reuse the old
    one's address and pass for it. Writes through ``p.data`` bypass the version counter and are
    not seen: ``undo_attention_swap_`` and swap again after them.
    """
    key = tuple(
        (p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype, p.device) for p in parts
    )
    cache = owner.__dict__.setdefault("_fastinfer_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    cache.pop(name, None)  # free the stale value before building the new one
    with torch.no_grad():
        value = build()
    cache[name] = (key, value, [p.untyped_storage() for p in parts])
    return value


def _drop_cache(owner: Any) -> dict[str, Any]:
    """``owner``'s state without its caches: oneDNN's reordered weights cannot be copied or
    pickled (``copy.deepcopy``, ``torch.save``), and a copy rebuilds them on its first call."""
    state = dict(owner.__dict__)
    state.pop("_fastinfer_cache", None)
    return state


def _cached_cat(owner: Any, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts), cached until any part is changed in place."""
    return _cached(owner, name, parts, lambda: torch.cat([p.detach() for p in parts]))  # type: ignore[no-any-return]


_onednn: bool | None = None  # can this torch run the prepacked oneDNN linear? (checked once)


def _onednn_available() -> bool:
    global _onednn
    if _onednn is None:
        ops = torch.ops.mkldnn
        _onednn = bool(
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        )
    return _onednn


def dense(
    owner: Any,
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str = "",
    sources: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` for ``(N, D)`` rows, ``act`` "", "relu" or "gelu" (exact).

    On CPU in float32 it runs oneDNN's matmul on a copy of ``weight`` reordered once (cached on
    ``owner`` under ``name`` until ``weight``, or the ``sources`` it was built from, change) with
    the activation fused in; anywhere else, plain ``F.linear``.
    """
    global _onednn
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and bias is not None
        and x.dim() == 2
        and _onednn_available()
    ):
        packed = _cached(
            owner,
            name,
            sources or [weight],
            lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None),
        )
        try:
            return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
                x, packed, bias.detach(), act or "none", [], "none" if act == "gelu" else ""
            )
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                _onednn = False  # a torch whose private op changed: plain matmuls from now on
    else:
        owner.__dict__.get("_fastinfer_cache", {}).pop(name, None)  # moved off CPU fp32: free it
    y = F.linear(x, weight, bias)
    if act == "gelu":
        return F.gelu(y)
    return F.relu(y) if act == "relu" else y


# --------------------------------------------------------------------------------------------
# Hugging Face BERT-family layers
# --------------------------------------------------------------------------------------------


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


def _act_name(act: Any) -> str:
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
        act_name=_act_name(act),
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
        act_name=_act_name(layer.ffn.activation),
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


class FastHFLayer(nn.Module):
    """One HF encoder layer, holding the original's children under the same names.

    ``forward`` is the original layer's forward (exact fallback); :meth:`packed` and :meth:`fused`
    are the fast paths the :class:`FastHFEncoder` calls.
    """

    def __init__(self, layer: Any):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.__dict__["_original"] = layer  # not registered: no duplicate state-dict keys
        self.parts = HF_LAYER_PARTS[type(layer).__name__](layer)
        self.training = layer.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_original"](*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return _drop_cache(self)

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts
        w = _cached_cat(self, "w", [p.q.weight, p.k.weight, p.v.weight])
        b = _cached_cat(self, "b", [p.q.bias, p.k.bias, p.v.bias])  # type: ignore[list-item]
        return w, b

    def packed(self, h: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``(N, D)`` valid tokens in, ``(N, D)`` out."""
        p = self.parts
        w, b = self._qkv()
        qkv = dense(self, "qkv", h, w, b, sources=[p.q.weight, p.k.weight, p.v.weight])
        a = packing.attention(qkv, p.heads)  # (N, D)
        a = p.norm1(dense(self, "out", a, p.out.weight, p.out.bias) + h)
        if p.act_name in ("gelu", "relu"):
            f = dense(self, "ffn_in", a, p.ffn_in.weight, p.ffn_in.bias, p.act_name)
        else:
            f = p.act(dense(self, "ffn_in", a, p.ffn_in.weight, p.ffn_in.bias))
        return p.norm2(dense(self, "ffn_out", f, p.ffn_out.weight, p.ffn_out.bias) + a)

    def fused(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Dense ``(B, T, D)`` or nested input through PyTorch's fused encoder-layer kernel."""
        p = self.parts
        w, b = self._qkv()
        return torch._transformer_encoder_layer_fwd(
            x,
            p.q.in_features,
            p.heads,
            w,
            b,
            p.out.weight,
            p.out.bias,
            p.act_name == "gelu",
            False,  # norm_first: BERT is post-norm
            p.norm1.eps,
            p.norm1.weight,
            p.norm1.bias,
            p.norm2.weight,
            p.norm2.bias,
            p.ffn_in.weight,
            p.ffn_in.bias,
            p.ffn_out.weight,
            p.ffn_out.bias,
            mask,
            None if mask is None else 1,
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
    keys = allowed[:, 0, 0, :]  # (B, T)
    if allowed.shape[2] > 1 and not bool((allowed[:, 0] == keys[:, None, :]).all()):
        return None  # a per-query mask (causal, custom): not a key-padding mask
    return keys


class FastHFEncoder(nn.Module):
    """Replaces an HF encoder (``BertEncoder``, DistilBERT's ``Transformer``...), same state dict.

    ``mode`` is ``"packed"`` or ``"fused"``. Anything the fast path does not handle runs the
    original encoder, which shares every parameter with this module.
    """

    def __init__(self, encoder: Any, mode: str, output_cls: Any):
        super().__init__()
        if mode not in ("packed", "fused"):
            raise ValueError(mode)
        self.__dict__["_original"] = encoder
        self.mode = mode
        self._output_cls = output_cls
        self.layer = nn.ModuleList(FastHFLayer(layer) for layer in encoder.layer)
        for name, child in encoder.named_children():
            if name != "layer":
                self.add_module(name, child)
        self.training = encoder.training
        self.fallbacks = 0  # forwards that ran the original encoder

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def _fallback(self, *args: Any, **kwargs: Any) -> Any:
        self.fallbacks += 1
        return self._original(*args, **kwargs)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        extra = [
            k
            for k in ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")
            if kwargs.get(k) is not None
        ]
        if (
            (args and any(a is not None for a in args))
            or extra
            or kwargs.get("use_cache")
            or self.training
            or (torch.is_grad_enabled() and hidden_states.requires_grad)
            or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dim() != 3
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
            for layer in self.layer:
                h = layer.packed(h, packing)  # type: ignore[operator]
            out = packing.unpack(h)
        else:
            fns = [lyr.fused for lyr in self.layer]  # type: ignore[union-attr]
            out = run_fused_layers(fns, hidden_states, valid)  # type: ignore[arg-type]
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
    if torch._nested_tensor_from_mask_left_aligned(x, valid):
        nt = torch._nested_tensor_from_mask(x, valid, mask_check=False)
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


# --------------------------------------------------------------------------------------------
# nn.TransformerEncoder
# --------------------------------------------------------------------------------------------


def torch_layer_unsupported(layer: nn.Module) -> str:
    """Why the packed path cannot run this ``nn.TransformerEncoderLayer`` ("" when it can)."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return f"{type(layer).__name__} is not nn.TransformerEncoderLayer"
    a = layer.self_attn
    if not a._qkv_same_embed_dim:
        return "self_attn has separate q/k/v projections (kdim/vdim)"
    if a.bias_k is not None or a.bias_v is not None or a.add_zero_attn:
        return "self_attn uses bias_k/bias_v/add_zero_attn"
    return ""


def _torch_layer_packed(
    owner: nn.Module, i: int, layer: nn.TransformerEncoderLayer, h: torch.Tensor, packing: Packing
) -> torch.Tensor:
    a = layer.self_attn
    act = _act_name(layer.activation)
    act = act if act in ("gelu", "relu") else ""

    def sa(x: torch.Tensor) -> torch.Tensor:
        qkv = dense(owner, f"{i}.qkv", x, a.in_proj_weight, a.in_proj_bias)
        o = packing.attention(qkv, a.num_heads)
        return dense(owner, f"{i}.out", o, a.out_proj.weight, a.out_proj.bias)

    def ff(x: torch.Tensor) -> torch.Tensor:
        l1, l2 = layer.linear1, layer.linear2
        f = dense(owner, f"{i}.ffn_in", x, l1.weight, l1.bias, act)
        f = f if act else layer.activation(f)
        return dense(owner, f"{i}.ffn_out", f, l2.weight, l2.bias)

    if layer.norm_first:
        h = h + sa(layer.norm1(h))
        return h + ff(layer.norm2(h))
    h = layer.norm1(h + sa(h))
    return layer.norm2(h + ff(h))


class PackedTorchEncoder(nn.Module):
    """Replaces an ``nn.TransformerEncoder``: same ``layers``/``norm`` children and state dict.

    Runs the packed path for eval, no-autograd, key-padding-only calls; anything else (an attention
    ``mask``, training, autograd) runs the original encoder.
    """

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.__dict__["_original"] = encoder
        self.layers = encoder.layers
        self.norm = encoder.norm
        self.num_layers = encoder.num_layers
        self.training = encoder.training
        self.batch_first = encoder.layers[0].self_attn.batch_first
        self.fallbacks = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def __getstate__(self) -> dict[str, Any]:
        return _drop_cache(self)

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (
            src.requires_grad or any(p.requires_grad for p in self.layers.parameters())
        )
        if (
            mask is not None
            or is_causal
            or self.training
            or grad
            or src.dim() != 3
            or src.is_nested
        ):
            self.fallbacks += 1
            return self._original(src, mask, src_key_padding_mask, is_causal)  # type: ignore[no-any-return]
        x = src if self.batch_first else src.transpose(0, 1)  # (B, T, D)
        if src_key_padding_mask is None:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif src_key_padding_mask.dtype == torch.bool:
            valid = ~src_key_padding_mask
        else:  # float mask: -inf (or any non-zero) = padded, as F._canonical_mask treats it
            valid = src_key_padding_mask == 0
        packing = Packing.from_valid(valid)
        h = packing.pack(x)
        for i, layer in enumerate(self.layers):
            h = _torch_layer_packed(self, i, layer, h, packing)
        if self.norm is not None:
            h = self.norm(h)
        out = packing.unpack(h)
        return out if self.batch_first else out.transpose(0, 1)

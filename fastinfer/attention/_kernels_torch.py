"""``nn.TransformerEncoder`` run on packed valid tokens (the ``torch:packed`` path)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fastinfer.attention._guard import GuardedEncoder, tracing
from fastinfer.attention._kernels_hf import act_name
from fastinfer.attention._packing import Packing, autocast_enabled, dense, drop_cache, prepack

__all__ = ["PackedTorchEncoder", "torch_layer_unsupported"]


def torch_layer_unsupported(layer: nn.Module) -> str:
    """Why the packed path cannot run this ``nn.TransformerEncoderLayer`` ("" when it can)."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return f"{type(layer).__name__} is not nn.TransformerEncoderLayer"
    a = layer.self_attn
    if not a._qkv_same_embed_dim:
        return "self_attn has separate q/k/v projections (kdim/vdim)"
    if a.bias_k is not None or a.bias_v is not None or a.add_zero_attn:
        return "self_attn uses bias_k/bias_v/add_zero_attn"
    linears = (a.out_proj, layer.linear1, layer.linear2)
    odd = [
        type(m).__name__
        for m in (*linears, layer.norm1, layer.norm2)
        if type(m) not in (nn.Linear, NonDynamicallyQuantizableLinear, nn.LayerNorm)
    ]
    if odd:  # quantized, wrapped: the packed path reads .weight/.bias and runs them its own way
        return f"it has a {odd[0]} where the packed path needs a plain nn.Linear / nn.LayerNorm"
    tensors = [a.in_proj_weight, a.in_proj_bias, *(t for m in linears for t in (m.weight, m.bias))]
    if any(t is not None and type(t) not in (nn.Parameter, torch.Tensor) for t in tensors):
        return "it has weights of a tensor subclass (quantized?) the packed path cannot run"
    return ""


def _torch_layer_packed(
    owner: nn.Module, i: int, layer: nn.TransformerEncoderLayer, h: torch.Tensor, packing: Packing
) -> torch.Tensor:
    a = layer.self_attn
    act = act_name(layer.activation)
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


class PackedTorchEncoder(GuardedEncoder):
    """Replaces an ``nn.TransformerEncoder``: same ``layers``/``norm`` children and state dict.

    Runs the packed path for eval, no-autograd, key-padding-only calls; anything else (an attention
    ``mask``, training, autograd, tracing, hooks on the layers, layers no longer plain) runs the
    original encoder, which shares its ``_modules`` dict with this one.
    """

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.__dict__["_original"] = encoder
        self.__dict__["_modules"] = encoder._modules  # layers/norm, shared: see FastHFEncoder
        if "norm" not in self._modules:  # norm=None: a plain attribute, not a child
            self.norm = encoder.norm
        self.num_layers = encoder.num_layers
        self.training = encoder.training
        self.batch_first = encoder.layers[0].self_attn.batch_first
        self.fallbacks = 0
        self._guard().why_not()
        for i, layer in enumerate(self.layers):  # reorder the weights now, not in a request
            a = layer.self_attn
            prepack(self, f"{i}.qkv", a.in_proj_weight, a.in_proj_bias)
            prepack(self, f"{i}.out", a.out_proj.weight, a.out_proj.bias)
            prepack(self, f"{i}.ffn_in", layer.linear1.weight, layer.linear1.bias)
            prepack(self, f"{i}.ffn_out", layer.linear2.weight, layer.linear2.bias)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def __getstate__(self) -> dict[str, Any]:
        return drop_cache(self)

    def _rebuild(self) -> str:
        self.__dict__.pop("_fastinfer_cache", None)
        layers = self._modules.get("layers")
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            return "it no longer holds a ModuleList of layers"
        for i, layer in enumerate(layers):
            why = torch_layer_unsupported(layer)
            if why:
                return f"layer {i}: {why}"
        return ""

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        if tracing():  # jit.trace / export / compile: the original's plain ops
            return self._original(src, mask, src_key_padding_mask, is_causal)  # type: ignore[no-any-return]
        guard = self._guard()
        if (
            mask is not None
            or is_causal
            or self.training
            or src.dim() != 3
            or src.is_nested
            or guard.why_not()
            or (torch.is_grad_enabled() and (src.requires_grad or guard.wants_grad()))
            or autocast_enabled(src)
        ):
            self.fallbacks += 1
            self._original.training = self.training
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

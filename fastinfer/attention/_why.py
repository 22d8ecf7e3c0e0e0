"""Why PyTorch's native attention fastpath is (not) taken, computed the way PyTorch computes it.

``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` each
decide inside ``forward`` whether to call a fused kernel (``torch._transformer_encoder_layer_fwd``,
``torch._native_multi_head_attention``) or the plain Python path, and whether to convert the
input to a nested tensor that skips padding. The decision is an ``elif`` chain that stops at the
first failing condition and is never shown to the user. The functions here replay those chains
(torch/nn/modules/transformer.py and activation.py, torch 2.5 to 2.13) in the same order and
return the same reason text PyTorch builds, or ``""`` when the fastpath applies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastinfer import _torch_compat

_FASTPATH_DEVICES = ("cpu", "cuda", "xpu")


def _supported_devices() -> list[str]:
    return [*_FASTPATH_DEVICES, torch.utils.backend_registration._privateuse1_backend_name]


def encoder_nested_init_reason(encoder: nn.TransformerEncoder) -> str:
    """Why ``TransformerEncoder.__init__`` disabled nested tensors (``use_nested_tensor``)."""
    enc_layer = "encoder_layer"
    layer = encoder.layers[0] if len(encoder.layers) else None
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return f"{enc_layer} was not TransformerEncoderLayer"
    if layer.norm_first:
        return f"{enc_layer}.norm_first was True"
    if not layer.self_attn.batch_first:
        return (
            f"{enc_layer}.self_attn.batch_first was not True"
            + "(use batch_first for better inference performance)"
        )
    if not layer.self_attn._qkv_same_embed_dim:
        return f"{enc_layer}.self_attn._qkv_same_embed_dim was not True"
    if layer.self_attn.in_proj_bias is None:
        return f"{enc_layer}.self_attn was passed bias=False"
    if not layer.activation_relu_or_gelu:
        return f"{enc_layer}.activation_relu_or_gelu was not True"
    if layer.norm1.eps != layer.norm2.eps:
        return f"{enc_layer}.norm1.eps was not equal to {enc_layer}.norm2.eps"
    if layer.self_attn.num_heads % 2 == 1:
        return f"{enc_layer}.self_attn.num_heads is odd"
    return ""


def _user_hooks(m: nn.Module) -> int:
    """Forward (pre-)hooks on ``m``, not counting fastinfer's own diagnostic pre-hooks."""
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    return sum(1 for h in hooks if not getattr(h, "_fastinfer_diag", False))


def _layer_tensor_args(src: torch.Tensor, layer: nn.TransformerEncoderLayer) -> tuple[Any, ...]:
    a = layer.self_attn
    return (
        src,
        a.in_proj_weight,
        a.in_proj_bias,
        a.out_proj.weight,
        a.out_proj.bias,
        layer.norm1.weight,
        layer.norm1.bias,
        layer.norm2.weight,
        layer.norm2.bias,
        layer.linear1.weight,
        layer.linear1.bias,
        layer.linear2.weight,
        layer.linear2.bias,
    )


def encoder_nested_reason(
    encoder: nn.TransformerEncoder,
    src: torch.Tensor,
    mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
) -> str:
    """Why ``TransformerEncoder.forward`` will not convert ``src`` to a nested tensor.

    Evaluated under the caller's current grad/autocast state, as ``forward`` would be.
    """
    src_key_padding_mask, mask = _torch_compat.canonical_masks(
        src_key_padding_mask, "src_key_padding_mask", mask, "mask", src.dtype
    )
    first_layer = encoder.layers[0]
    str_first_layer = "self.layers[0]"
    do_mask_check = getattr(encoder, "mask_check", True)
    if not _torch_compat.mha_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() was not True"
    if not hasattr(encoder, "use_nested_tensor"):
        return "use_nested_tensor attribute not present"
    if not encoder.use_nested_tensor:
        return "self.use_nested_tensor (set in init) was not True"
    if first_layer.training:
        return f"{str_first_layer} was in training mode"
    if src.dim() != 3:
        return f"input not batched; expected src.dim() of 3 but got {src.dim()}"
    if src_key_padding_mask is None:
        return "src_key_padding_mask was None"
    if do_mask_check and torch.compiler.is_compiling():
        return "mask_check enabled with torch.compile or torch.export"
    if do_mask_check and not _torch_compat.nested_mask_left_aligned(
        src, src_key_padding_mask.logical_not()
    ):
        return "mask_check enabled, and src and src_key_padding_mask was not left aligned"
    if src.is_nested:
        return "NestedTensor input is not supported"
    if mask is not None:
        return "src_key_padding_mask and mask were both supplied"
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    tensor_args = _layer_tensor_args(src, first_layer)
    if torch.overrides.has_torch_function(tensor_args):
        return "some Tensor argument has_torch_function"
    if src.device.type not in _supported_devices():
        return f"src device is neither one of {_supported_devices()}"
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensor_args):
        return (
            "grad is enabled and at least one of query or the "
            "input/output projection weights or biases requires_grad"
        )
    return ""


def layer_fastpath_reason(
    layer: nn.TransformerEncoderLayer,
    src: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
) -> str:
    """Why ``TransformerEncoderLayer.forward`` will not call ``torch._transformer_encoder_layer_fwd``."""
    src_key_padding_mask, src_mask = _torch_compat.canonical_masks(
        src_key_padding_mask, "src_key_padding_mask", src_mask, "src_mask", src.dtype
    )
    if not _torch_compat.mha_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() was not True"
    if src.dim() != 3:
        return f"input not batched; expected src.dim() of 3 but got {src.dim()}"
    if layer.training:
        return "training is enabled"
    if not layer.self_attn.batch_first:
        return "self_attn.batch_first was not True"
    if layer.self_attn.in_proj_bias is None:
        return "self_attn was passed bias=False"
    if not layer.self_attn._qkv_same_embed_dim:
        return "self_attn._qkv_same_embed_dim was not True"
    if not layer.activation_relu_or_gelu:
        return "activation_relu_or_gelu was not True"
    if layer.norm1.eps != layer.norm2.eps:
        return "norm1.eps is not equal to norm2.eps"
    if src.is_nested and (src_key_padding_mask is not None or src_mask is not None):
        return "neither src_key_padding_mask nor src_mask are not supported with NestedTensor input"
    if layer.self_attn.num_heads % 2 == 1:
        return "num_head is odd"
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    if any(_user_hooks(m) for m in layer.modules()):
        return "forward pre-/hooks are attached to the module"
    tensor_args = _layer_tensor_args(src, layer)
    if torch.overrides.has_torch_function(tensor_args):
        return "some Tensor argument has_torch_function"
    if not all(x.device.type in _supported_devices() for x in tensor_args):
        return f"some Tensor argument's device is neither one of {_supported_devices()}"
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensor_args):
        return (
            "grad is enabled and at least one of query or the "
            "input/output projection weights or biases requires_grad"
        )
    return ""


def mha_fastpath_reason(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> str:
    """Why ``MultiheadAttention.forward`` will not call ``torch._native_multi_head_attention``."""
    reason = ""
    if (attn_mask is not None and torch.is_floating_point(attn_mask)) or (
        key_padding_mask is not None and torch.is_floating_point(key_padding_mask)
    ):
        reason = "floating-point masks are not supported for fast path."
    is_batched = query.dim() == 3
    key_padding_mask, attn_mask = _torch_compat.canonical_masks(
        key_padding_mask, "key_padding_mask", attn_mask, "attn_mask", query.dtype
    )
    # PyTorch overwrites the float-mask reason with the first failing condition below, if any.
    if not _torch_compat.mha_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() was not True"
    if not is_batched:
        return f"input not batched; expected query.dim() of 3 but got {query.dim()}"
    if query is not key or key is not value:
        return "non-self attention was used (query, key, and value are not the same Tensor)"
    if mha.in_proj_bias is not None and query.dtype != mha.in_proj_bias.dtype:
        return (
            f"dtypes of query ({query.dtype}) and self.in_proj_bias "
            f"({mha.in_proj_bias.dtype}) don't match"
        )
    if mha.in_proj_weight is None:
        return "in_proj_weight was None"
    if query.dtype != mha.in_proj_weight.dtype:
        return (
            f"dtypes of query ({query.dtype}) and self.in_proj_weight "
            f"({mha.in_proj_weight.dtype}) don't match"
        )
    if mha.training:
        return "training is enabled"
    if mha.num_heads % 2 != 0:
        return "self.num_heads is not even"
    if not mha.batch_first:
        return "batch_first was not True"
    if mha.bias_k is not None:
        return "self.bias_k was not None"
    if mha.bias_v is not None:
        return "self.bias_v was not None"
    if mha.add_zero_attn:
        return "add_zero_attn was enabled"
    if not mha._qkv_same_embed_dim:
        return "_qkv_same_embed_dim was not True"
    if query.is_nested and (key_padding_mask is not None or attn_mask is not None):
        return "supplying both src_key_padding_mask and src_mask at the same time is not supported with NestedTensor input"
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    if reason:
        return reason
    tensor_args = (
        query,
        key,
        value,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.out_proj.weight,
        mha.out_proj.bias,
    )
    devices = ["cpu", "cuda", torch.utils.backend_registration._privateuse1_backend_name]
    if torch.overrides.has_torch_function(tensor_args):
        return "some Tensor argument has_torch_function"
    if not all(x is None or x.device.type in devices for x in tensor_args):
        return f"some Tensor argument's device is neither one of cpu, cuda or {devices[2]}"
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensor_args):
        return (
            "grad is enabled and at least one of query or the "
            "input/output projection weights or biases requires_grad"
        )
    if torch.compiler.is_exporting():
        return "we are running make_fx tracing"
    if mha.in_proj_bias is None:
        # PyTorch reaches the end of the chain without a reason but only calls the kernel with a bias.
        return "in_proj_bias was None (the native kernel needs the input projection bias)"
    return ""

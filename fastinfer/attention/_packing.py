"""Packed valid tokens and prepacked oneDNN dense layers, shared by the packed encoders.

A batch of padded sequences becomes one ``(N, D)`` matrix of its valid tokens (:class:`Packing`);
the dense layers then run on ``N`` rows instead of ``B * T``, and attention runs per sequence on
the packed rows. On CPU float32, :func:`dense` runs oneDNN's matmul on a weight reordered once
(cached on the replacement module), through :mod:`fastinfer._torch_compat`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fastinfer import _torch_compat

__all__ = [
    "Packing",
    "autocast_enabled",
    "cached_cat",
    "dense",
    "drop_cache",
    "onednn_available",
    "prepack",
]


def autocast_enabled(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device. The packed and fused paths run the layers'
    weights in their own dtype and were verified that way; under autocast the original encoder
    runs instead, in the dtypes autocast asks for (PyTorch's fused encoder kernel refuses mixed
    dtypes outright)."""
    try:
        return bool(torch.is_autocast_enabled(t.device.type))
    except TypeError:  # torch < 2.4: no device_type argument
        if t.device.type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


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
    not seen: ``undo_attention_swap_`` and swap again after them. Inference tensors (made under
    ``inference_mode``) have no version counter at all: the replacement encoders drop this cache
    whenever ``load_state_dict`` loads into them or a module above them; other in-place writes
    into inference tensors are not seen either.
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


def drop_cache(owner: Any) -> dict[str, Any]:
    """``owner``'s state without its caches: oneDNN's reordered weights cannot be copied or
    pickled (``copy.deepcopy``, ``torch.save``), and a copy rebuilds them on its first call.
    The tree guard goes too: a copy checks its own tree (and the hooks on it) on its first call,
    against a hook counter of its own process."""
    state = dict(owner.__dict__)
    state.pop("_fastinfer_cache", None)
    state.pop("_fastinfer_guard", None)
    return state


def cached_cat(owner: Any, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts), cached until any part is changed in place."""
    return _cached(owner, name, parts, lambda: torch.cat([p.detach() for p in parts]))  # type: ignore[no-any-return]


_onednn: bool | None = None  # can this torch run the prepacked oneDNN linear? (checked once)


def onednn_available() -> bool:
    global _onednn
    if _onednn is None:
        _onednn = _torch_compat.check("mkldnn_linear") == ""
    return _onednn


def _onednn_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and bias is not None
        and onednn_available()
    )


def _packed_weight(
    owner: Any, name: str, weight: torch.Tensor, sources: list[torch.Tensor] | None
) -> Any:
    return _cached(
        owner,
        name,
        sources or [weight],
        lambda: _torch_compat.mkldnn_reorder_linear_weight(weight.detach()),
    )


def prepack(
    owner: Any,
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sources: list[torch.Tensor] | None = None,
) -> None:
    """Build the reordered weight :func:`dense` will use, now rather than in the first call.

    Called when a packed encoder is built, so that the swap pays the reorder (about 0.1 s for
    BERT-base), not the first request, and a path's first timed call is not a cold one.
    """
    if _onednn_weight(weight, bias):
        _packed_weight(owner, name, weight, sources)


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
        and x.dim() == 2
        and _onednn_weight(weight, bias)
    ):
        packed = _packed_weight(owner, name, weight, sources)
        try:
            return _torch_compat.mkldnn_linear_pointwise(x, packed, bias.detach(), act)  # type: ignore[union-attr]
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                _onednn = False  # a torch whose private op changed: plain matmuls from now on
    else:
        owner.__dict__.get("_fastinfer_cache", {}).pop(name, None)  # moved off CPU fp32: free it
    y = F.linear(x, weight, bias)
    if act == "gelu":
        return F.gelu(y)
    return F.relu(y) if act == "relu" else y

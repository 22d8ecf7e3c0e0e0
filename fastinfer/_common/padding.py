"""Which positions of a padded batch are real: found from the inputs' padding mask, and used to
compare two models' outputs on valid positions only (what a padding-free path leaves in padded
positions differs, by design, from what the original model leaves there)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["empty_batch", "padding_layout", "padding_variants", "valid_mask", "zero_padded"]


def valid_mask(
    model: Any, inputs: Any, kwargs: Mapping[str, Any] | None = None
) -> torch.Tensor | None:
    """The ``(B, T)`` bool validity of a batch, from its padding/attention mask (None: none).

    ``inputs`` is a dict of keyword arguments, a tuple of positional ones, or one tensor;
    ``kwargs`` adds keyword arguments to positional ones."""
    if isinstance(inputs, Mapping):
        named = dict(inputs)
    else:
        args = inputs if isinstance(inputs, tuple | list) else (inputs,)
        try:
            forward = getattr(model, "forward", model)
            named = dict(inspect.signature(forward).bind_partial(*args).arguments)
        except (TypeError, ValueError):
            named = {}
    named.update(kwargs or {})
    found = _mask_in(named)
    if found is None:  # a wrapper taking one dict of features (sentence-transformers)
        for value in named.values():
            if isinstance(value, Mapping) and (found := _mask_in(value)) is not None:
                break
    if found is None:
        found = _torch_padding_argument(model, named)
    return found


_TORCH_ATTENTION = (
    torch.nn.TransformerEncoder,
    torch.nn.TransformerEncoderLayer,
    torch.nn.MultiheadAttention,
)


def _torch_padding_argument(model: Any, named: Mapping[str, Any]) -> torch.Tensor | None:
    """A wrapper of torch's own encoder whose padding mask has another name (``pad``): the one
    ``(B, T)`` bool argument that matches a 3-D float input (``(B, T, E)``, or ``(T, B, E)``
    sequence-first), read with torch's convention (True = padding, the only meaning a bool
    key-padding mask has in ``nn``)."""
    modules = getattr(model, "modules", None)
    if modules is None or not any(isinstance(m, _TORCH_ATTENTION) for m in modules()):
        return None
    values = [v for v in named.values() if isinstance(v, torch.Tensor)]
    leading = {tuple(v.shape[:2]) for v in values if v.dim() == 3 and v.is_floating_point()}
    masks = [v for v in values if v.dim() == 2 and v.dtype == torch.bool]
    fits = [m for m in masks if {tuple(m.shape), tuple(m.shape[::-1])} & leading]
    if len(fits) != 1:
        return None  # none, or more than one candidate: no guess
    return ~fits[0]


def empty_batch(inputs: Any, where: str = "example_inputs") -> str:
    """Where an input's batch dimension is empty (a ``(0, ...)`` tensor), as
    ``example_inputs['input_ids']`` or ``example_inputs[0]``; "" when none is. ``inputs`` is a
    dict of keyword arguments, a tuple of positional ones, or one tensor (a dict inside is
    searched too)."""
    if isinstance(inputs, torch.Tensor):
        return where if inputs.dim() > 0 and inputs.shape[0] == 0 else ""
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    elif isinstance(inputs, tuple | list):
        items = list(enumerate(inputs))
    else:
        return ""
    for name, value in items:
        if isinstance(value, torch.Tensor | Mapping) and (
            found := empty_batch(value, f"{where}[{name!r}]")
        ):
            return found
    return ""


def _mask_in(named: Mapping[str, Any]) -> torch.Tensor | None:
    mask = named.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1:
        # a 4-D mask (B, 1, Q, T), bool (True = attend) or additive (0 = attend, a large
        # negative number = masked): a key is a token when some query attends to it
        allowed = mask if mask.dtype == torch.bool else mask > -1.0
        return allowed[:, 0].any(dim=1)
    for key in ("src_key_padding_mask", "key_padding_mask", "padding_mask"):
        mask = named.get(key)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return ~mask if mask.dtype == torch.bool else mask == 0
    return None


def zero_padded(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``t`` with padded positions set to zero, where its leading dims are the mask's ``(B, T)``
    (or ``(T, B)``, sequence-first); otherwise ``t`` itself."""
    if valid is None or t.dim() < 2:
        return t
    v = valid.to(t.device)
    if tuple(t.shape[:2]) == tuple(v.shape):
        return t.masked_fill(~v.view(*v.shape, *([1] * (t.dim() - 2))), 0)
    if tuple(t.shape[:2]) == tuple(v.shape[::-1]):  # (T, B, ...) sequence-first outputs
        vt = v.t()
        return t.masked_fill(~vt.reshape(*vt.shape, *([1] * (t.dim() - 2))), 0)
    return t


def padding_layout(valid: torch.Tensor | None) -> str | None:
    """How a ``(B, T)`` validity lays its padding out: ``"unpadded"`` (every position valid),
    ``"right"`` (each row's tokens first, then padding), ``"left"`` (padding first), ``"mixed"``
    (a masked position between valid ones, or rows padded on different sides); None without a
    ``(B, T)`` mask. A row that is all tokens or all padding fits either side."""
    if valid is None or valid.dim() != 2 or valid.numel() == 0:
        return None
    v = valid.bool()
    if bool(v.all()):
        return "unpadded"
    # right-padded: validity never rises along a row; left-padded: it never falls
    steps = v[:, 1:].int() - v[:, :-1].int()
    right, left = not bool((steps > 0).any()), not bool((steps < 0).any())
    if right:
        return "right"  # a batch whose rows are all-token or all-padding counts as right
    return "left" if left else "mixed"


def padding_variants(named: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The batch ``named`` (keyword arguments with a 2-D ``attention_mask``, 1 = token) laid out
    otherwise, each ``(label, arguments)``: its rows moved to the other padding side (right to
    left, left to right; an unpadded batch left-padded by masking each row's first quarter), and
    a masked token inside its longest row. Every ``(B, T, ...)`` tensor moves with its mask, so a
    path that handles the example's layout only (a mask turned into per-row lengths) answers
    otherwise than eager on one of them. Empty without such a mask."""
    mask = named.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.numel() == 0:
        return []
    valid = mask != 0
    rows, width = valid.shape
    layout = padding_layout(valid)
    out: list[tuple[str, dict[str, Any]]] = []
    if layout in ("right", "left"):
        pads = (~valid).sum(dim=1)
        shift = pads if layout == "right" else -pads
        columns = torch.arange(width, device=mask.device)
        index = (columns - shift[:, None]) % width  # row r rolled by shift[r]
        row = torch.arange(rows, device=mask.device)[:, None]
        moved = {k: v[row, index] if _per_position(v, valid) else v for k, v in named.items()}
        out.append(("left-padded" if layout == "right" else "right-padded", moved))
    elif layout == "unpadded" and width >= 2:
        cut = mask.clone()
        cut[:, : max(1, width // 4)] = 0
        out.append(("left-padded", {**named, "attention_mask": cut}))
    counts = valid.sum(dim=1)
    longest = int(counts.argmax())
    if int(counts[longest]) >= 3:  # a hole between two tokens
        positions = valid[longest].nonzero().flatten()
        holed = mask.clone()
        holed[longest, positions[len(positions) // 2]] = 0
        out.append(
            (f"with a masked token inside row {longest}", {**named, "attention_mask": holed})
        )
    return out


def _per_position(t: Any, valid: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(valid.shape)

"""Candidate paths for ``nn.TransformerEncoder`` / ``TransformerEncoderLayer`` / ``MultiheadAttention``:
the native fastpath made to apply, with or without nested tensors, and the packed encoder."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastinfer.attention import _why
from fastinfer.attention._candidate import OPAQUE, PACKED, Candidate, Once
from fastinfer.attention._diagnose import native_modules
from fastinfer.attention._kernels_torch import PackedTorchEncoder, torch_layer_unsupported
from fastinfer.attention._undo import SetAttr, Undo, find_parent
from fastinfer.errors import AttentionSwapError

__all__ = ["torch_candidates"]


def torch_candidates(model: Any, once: Once) -> list[Candidate]:
    natives = native_modules(model)
    if not natives:
        return []
    cands: list[Candidate] = []
    tencoders = [m for _, m in natives if isinstance(m, nn.TransformerEncoder)]

    def apply_fastpath(undo: Undo, nested: bool = False) -> None:
        undo.freeze(model)
        for enc in tencoders:
            old = enc.use_nested_tensor
            enc.use_nested_tensor = nested and not _why.encoder_nested_init_reason(enc)
            undo.push(SetAttr(enc, "use_nested_tensor", old))

    cands.append(Candidate("torch:fastpath", apply_fastpath, False, OPAQUE))
    if tencoders:
        init_why = next((r for r in map(_why.encoder_nested_init_reason, tencoders) if r), "")
        cands.append(
            Candidate(
                "torch:fastpath-nested",
                lambda undo: apply_fastpath(undo, nested=True),
                False,
                OPAQUE,
                f"nested tensors are off because {init_why}" if init_why else "",
                skips_padding_only=True,
            )
        )
        packed_why = next(
            (r for e in tencoders for lyr in e.layers if (r := torch_layer_unsupported(lyr))),
            "",
        )

        def apply_packed(undo: Undo) -> None:
            undo.freeze(model)
            for enc in tencoders:
                where = find_parent(model, enc)
                if where is None:
                    raise AttentionSwapError(
                        "the model itself is an nn.TransformerEncoder: wrap it in a module "
                        "(torch:packed replaces the encoder inside its parent)"
                    )
                new = once("packed", enc, lambda enc=enc: PackedTorchEncoder(enc))  # type: ignore[misc]
                undo.set_child(*where, new)

        if not packed_why and any(find_parent(model, e) is None for e in tencoders):
            packed_why = "the model is a bare nn.TransformerEncoder (no parent to swap it in)"
        cands.append(Candidate("torch:packed", apply_packed, False, PACKED, packed_why))
    return cands

"""Candidate discovery: which attention paths a model offers, by model family.

Each family contributes its own candidates (:mod:`._family_hf` for Hugging Face models,
:mod:`._family_torch` for ``nn.TransformerEncoder`` & co., registered replacements here); a
wrapper module that only *holds* a model (a sentence-transformers pipeline, a user's ``nn.Module``
around an HF model) is searched for the model inside.
"""

from __future__ import annotations

from typing import Any

from fastinfer.attention._candidate import PLAIN, Candidate, Once
from fastinfer.attention._family_hf import hf_candidates, is_hf
from fastinfer.attention._family_torch import torch_candidates
from fastinfer.attention._types import REGISTRY
from fastinfer.attention._undo import Undo

__all__ = ["discover"]


def _registered_candidates(model: Any) -> list[Candidate]:
    registered = [
        (cls, fn)
        for cls, fn in REGISTRY.items()
        if any(isinstance(m, cls) for m in model.modules())
    ]
    if not registered:
        return []

    def apply_registered(undo: Undo) -> None:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                for cls, fn in registered:
                    if isinstance(child, cls):
                        undo.set_child(parent, name, fn(child))
                        break
        undo.freeze(model)

    return [Candidate("registered", apply_registered, True, PLAIN)]


def discover(model: Any) -> tuple[str, list[Candidate], list[str]]:
    """``(kind, candidates, notes)``: kind is hf-encoder, hf, torch, registered or none."""
    once = Once()
    cands = _registered_candidates(model)
    notes: list[str] = []
    kind = "registered" if cands else "none"
    if is_hf(model):
        hf_kind, hf_cands, hf_notes = hf_candidates(model, once)
        kind = hf_kind
        cands += hf_cands
        notes += hf_notes
    else:
        found = torch_candidates(model, once)
        if found:
            kind = "torch" if kind == "none" else kind
            cands += found
    return kind, cands, notes

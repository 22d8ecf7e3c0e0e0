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


def _held_hf_models(model: Any) -> list[tuple[str, Any]]:
    """The outermost Hugging Face models inside a module that is not one itself (a
    sentence-transformers pipeline, a user's ``nn.Module`` around an HF model)."""
    found: list[tuple[str, Any]] = []
    for name, mod in model.named_modules():
        if name and is_hf(mod) and not any(name.startswith(f"{f}.") for f, _ in found):
            found.append((name, mod))
    return found


def _combined(held: list[tuple[str, Any]], lists: list[list[Candidate]]) -> list[Candidate]:
    """One candidate per path name, applying that path to every held model."""
    names = list(dict.fromkeys(c.name for cands in lists for c in cands))
    out = []
    for name in names:
        parts = [next((c for c in cands if c.name == name), None) for cands in lists]
        why = "; ".join(
            f"{type(m).__name__} at {where!r}: {c.unavailable if c else 'not offered'}"
            for (where, m), c in zip(held, parts)
            if c is None or c.unavailable
        )
        present = [c for c in parts if c is not None]

        def apply(undo: Undo, present: list[Candidate] = present) -> None:
            for c in present:
                c.apply(undo)

        out.append(
            Candidate(
                name,
                apply,
                all(c.compile_useful for c in present),
                present[0].compile_reason,
                why,
                all(c.skips_padding_only for c in present),
            )
        )
    return out


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
        return kind, cands, notes
    held = _held_hf_models(model)
    if held:
        found = [hf_candidates(m, once) for _, m in held]
        kind = "hf-encoder" if any(k == "hf-encoder" for k, _, _ in found) else "hf"
        cands += _combined(held, [c for _, c, _ in found])
        notes += list(dict.fromkeys(n for _, _, ns in found for n in ns))
        where = ", ".join(f"{type(m).__name__} at {name!r}" for name, m in held)
        notes.append(f"{type(model).__name__} wraps {where}: the swap applies to the model inside")
        return kind, cands, notes
    found_torch = torch_candidates(model, once)
    if found_torch:
        kind = "torch" if kind == "none" else kind
        cands += found_torch
    return kind, cands, notes

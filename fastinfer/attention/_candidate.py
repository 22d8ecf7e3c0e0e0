"""A candidate attention path: how to apply it (undoably) and what compiling it would do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fastinfer.attention._undo import Undo

__all__ = ["OPAQUE", "PACKED", "PLAIN", "Candidate", "Once"]

OPAQUE = (
    "the swapped model runs PyTorch's opaque fused encoder-layer kernel on nested tensors; "
    "torch.compile cannot see inside it and graph-breaks on nested tensors, so compiling adds "
    "compile time for no gain"
)
PACKED = (
    "the packed path gathers the valid tokens with a data-dependent index (nonzero), so the "
    "compiled graph would break or recompile per token count; it is already a few large matmuls"
)
PLAIN = (
    "plain PyTorch ops around the attention call: Inductor can fuse the projections' epilogues, "
    "GELU and layer norms, so compiling can pay (measure it with the compile selector)"
)


@dataclass
class Candidate:
    name: str
    apply: Callable[[Undo], None]
    compile_useful: bool
    compile_reason: str
    unavailable: str = ""
    skips_padding_only: bool = False  # its only gain is skipping padding (nested tensors)


class Once:
    """Replacement modules built once per (candidate, original module) and re-installed on every
    apply, so what they cache (concatenated and reordered weights) is built once, not in every
    timed call."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, int], nn.Module] = {}

    def __call__(self, key: str, original: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
        new = self._made.get((key, id(original)))
        if new is None:
            new = self._made[(key, id(original))] = build()
        return new

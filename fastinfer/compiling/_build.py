"""What a candidate builder sees and promises (the base of the builder registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fastinfer.compiling._cache import InductorCache
from fastinfer.compiling._inputs import Inputs

__all__ = ["BuildContext", "Builder"]


@dataclass(frozen=True)
class BuildContext:
    """What a builder may look at: the model, its inputs, where it runs, what eager showed."""

    model: Callable[..., Any]
    example_inputs: Inputs
    sizes: tuple[int, ...]
    cache: InductorCache | None
    tmp: Path
    on_gpu: bool
    opaque: tuple[str, ...]
    artifacts: Path | None = None  # where exported artefacts are cached (None: tmp only)
    rtol: float | None = None
    atol: float | None = None
    notes: list[str] = field(default_factory=list)  # what a builder wants in its report row
    reference: Any = None  # eager's output on the example (its structure is what callers get)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)  # artefacts that failed

    @property
    def params_millions(self) -> float:
        if not isinstance(self.model, nn.Module):
            return 0.0
        return sum(p.numel() for p in self.model.parameters()) / 1e6


class Builder:
    """Builds one kind of candidate. ``skip`` says why it cannot run here ("" when it can)."""

    def skip(self, ctx: BuildContext) -> str:
        return ""

    def estimate_seconds(self, ctx: BuildContext) -> float:
        """About how long :meth:`build` takes here (a prior; 0 for what is already built)."""
        return 0.0

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        raise NotImplementedError

"""What select_backend measured and chose: one result per candidate, the report, the rule."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fastinfer._common.tables import render_table

__all__ = ["BackendReport", "CandidateResult", "pick_winner"]


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's outcome: ``status`` is ok, skipped, failed or rejected (too inaccurate)."""

    name: str
    status: str
    reason: str = ""
    compile_seconds: float = 0.0
    latency_seconds: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    max_error: float = 0.0

    @property
    def geomean_speedup(self) -> float:
        if not self.speedup:
            return 0.0
        return math.exp(sum(math.log(s) for s in self.speedup.values()) / len(self.speedup))


@dataclass(frozen=True)
class BackendReport:
    """What :func:`select_backend` measured and chose; ``winner`` is "eager" unless one beat it.

    ``selection_seconds`` is how long the choice took (in this call: a cached decision costs
    only the lookup); ``from_cache`` says it came from the decision cache, with nothing built or
    timed; ``budget_seconds`` is the budget it was measured under.
    """

    winner: str
    margin: float
    batch_sizes: tuple[int, ...]
    results: tuple[CandidateResult, ...]
    key: str
    from_cache: bool = False
    compiled: Any = field(default=None, compare=False, repr=False)
    selection_seconds: float = 0.0
    budget_seconds: float | None = None
    notes: tuple[str, ...] = ()

    def result(self, name: str) -> CandidateResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no candidate {name!r}; have {[r.name for r in self.results]}")

    def compile_kwargs(self) -> dict[str, Any]:
        """``backend``/``mode`` for :func:`compile_model` ({} for eager, aot, a runtime or a
        custom variant)."""
        from fastinfer.compiling._builders import BUILDERS, DynamoBuilder

        builder = BUILDERS.get(self.winner)
        if isinstance(builder, DynamoBuilder) and builder.backend == "inductor":
            return {"backend": builder.backend, "mode": builder.mode}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner,
            "margin": self.margin,
            "batch_sizes": list(self.batch_sizes),
            "key": self.key,
            "from_cache": self.from_cache,
            "selection_seconds": self.selection_seconds,
            "budget_seconds": self.budget_seconds,
            "notes": list(self.notes),
            "results": [
                {
                    **asdict(r),
                    "latency_seconds": {str(k): v for k, v in r.latency_seconds.items()},
                    "speedup": {str(k): v for k, v in r.speedup.items()},
                    "max_error": r.max_error if math.isfinite(r.max_error) else None,
                }
                for r in self.results
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(
        cls,
        doc: Mapping[str, Any],
        *,
        from_cache: bool = False,
        selection_seconds: float | None = None,
    ) -> BackendReport:
        results = tuple(
            CandidateResult(
                name=r["name"],
                status=r["status"],
                reason=r["reason"],
                compile_seconds=r["compile_seconds"],
                latency_seconds={int(k): v for k, v in r["latency_seconds"].items()},
                speedup={int(k): v for k, v in r["speedup"].items()},
                max_error=math.inf if r["max_error"] is None else r["max_error"],
            )
            for r in doc["results"]
        )
        return cls(
            winner=doc["winner"],
            margin=doc["margin"],
            batch_sizes=tuple(doc["batch_sizes"]),
            results=results,
            key=doc["key"],
            from_cache=from_cache,
            selection_seconds=(
                doc.get("selection_seconds", 0.0)
                if selection_seconds is None
                else selection_seconds
            ),
            budget_seconds=doc.get("budget_seconds"),
            notes=tuple(doc.get("notes", ())),
        )

    def table(self) -> str:
        head = ["candidate", "status", "compile", *[f"bs={b}" for b in self.batch_sizes], "max err"]
        rows = []
        for r in self.results:
            cells = [r.name + (" *" if r.name == self.winner else ""), r.status]
            cells.append(f"{r.compile_seconds:.2f}s" if r.status == "ok" else "")
            for b in self.batch_sizes:
                lat, sp = r.latency_seconds.get(b), r.speedup.get(b)
                cells.append("" if lat is None else f"{lat * 1e3:.3f}ms ({sp:.2f}x)")
            cells.append(f"{r.max_error:.2g}" if r.status in ("ok", "rejected") else "")
            rows.append(cells)
        lines = [render_table(head, rows)]
        for r in self.results:
            if r.reason:
                lines.append(f"  {r.name}: {r.reason}")
        lines += [f"note: {n}" for n in self.notes]
        origin = " (cached decision)" if self.from_cache else ""
        lines.append(f"winner: {self.winner} (must beat eager by {self.margin:.0%}){origin}")
        budget = "no budget" if self.budget_seconds is None else f"budget {self.budget_seconds:g} s"
        how = "from the decision cache, nothing built or timed" if self.from_cache else budget
        lines.append(f"selection: {self.selection_seconds:.2f} s ({how})")
        return "\n".join(lines)

    __str__ = table


def pick_winner(results: Sequence[CandidateResult], margin: float) -> str:
    """The fastest ok candidate whose geometric-mean speed-up over eager is at least ``1+margin``
    and that is not slower than eager at any batch size; otherwise ``"eager"``."""
    best, best_score = "eager", 1.0 + margin
    for r in results:
        if r.name == "eager" or r.status != "ok" or not r.speedup:
            continue
        if min(r.speedup.values()) < 1.0:
            continue
        if r.geomean_speedup >= best_score:
            best, best_score = r.name, r.geomean_speedup
    return best

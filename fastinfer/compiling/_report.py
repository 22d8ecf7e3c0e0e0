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
        """The report ``to_dict`` wrote. Every field is checked for its type: a document that is
        not one (``null``, a list, ``"results": 5``, a latency of ``null``) raises ``ValueError``
        naming the field."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"a report is a JSON object, got {type(doc).__name__}")
        raw = _get(doc, "results", list, "the report")
        results = tuple(_result(r, f"results[{i}]") for i, r in enumerate(raw))
        sizes = _get(doc, "batch_sizes", list, "the report")
        if not sizes or not all(_is_int(b) and b >= 1 for b in sizes):
            raise ValueError(f"batch_sizes is {sizes!r}, not a list of positive integers")
        budget = doc.get("budget_seconds")
        notes = doc.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ValueError(f"notes is {notes!r}, not a list of strings")
        return cls(
            winner=_get(doc, "winner", str, "the report"),
            margin=_number(_get(doc, "margin", object, "the report"), "margin"),
            batch_sizes=tuple(sizes),
            results=results,
            key=_get(doc, "key", str, "the report"),
            from_cache=from_cache,
            selection_seconds=(
                _number(doc.get("selection_seconds", 0.0), "selection_seconds")
                if selection_seconds is None
                else selection_seconds
            ),
            budget_seconds=None if budget is None else _number(budget, "budget_seconds"),
            notes=tuple(notes),
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


STATUSES = ("ok", "skipped", "failed", "rejected")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what} is {v!r}, not a finite number")
    if v < 0 or (positive and v == 0):
        raise ValueError(
            f"{what} is {v!r}, not a {'positive' if positive else 'non-negative'} number"
        )
    return float(v) if isinstance(v, float) else v


def _get(doc: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in doc:
        raise ValueError(f"{where} has no {name!r}")
    v = doc[name]
    if not isinstance(v, kind):
        raise ValueError(f"{name} in {where} is {v!r}, not a {kind.__name__}")
    return v


def _per_size(v: Any, what: str, *, positive: bool) -> dict[int, float]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} is {v!r}, not an object of batch size to number")
    out: dict[int, float] = {}
    for k, x in v.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise ValueError(f"{what} has the key {k!r}, not a batch size")
        out[int(k)] = _number(x, f"{what}[{k!r}]", positive=positive)
    return out


def _result(r: Any, where: str) -> CandidateResult:
    if not isinstance(r, Mapping):
        raise ValueError(f"{where} is {r!r}, not a JSON object")
    status = _get(r, "status", str, where)
    if status not in STATUSES:
        raise ValueError(f"status in {where} is {status!r}, not one of {list(STATUSES)}")
    err = _get(r, "max_error", object, where)
    return CandidateResult(
        name=_get(r, "name", str, where),
        status=status,
        reason=_get(r, "reason", str, where),
        compile_seconds=_number(_get(r, "compile_seconds", object, where), "compile_seconds"),
        latency_seconds=_per_size(
            _get(r, "latency_seconds", object, where), f"latency_seconds in {where}", positive=False
        ),
        speedup=_per_size(_get(r, "speedup", object, where), f"speedup in {where}", positive=True),
        max_error=math.inf if err is None else _number(err, f"max_error in {where}"),
    )

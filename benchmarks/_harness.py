"""Shared benchmark harness: a baseline and candidates side by side in one run, reported as ratios.

This machine is shared and noisy, so absolute times do not survive from one run to the next, but a
ratio measured in one run, with trials interleaved between the variants, does. Every benchmark in
this folder uses this module:

    from _harness import Bench, compare

    bench = Bench("loading", description="time to first correct output")
    result = compare({"naive": naive, "fastinfer": fast}, baseline="naive", repeat=7)
    bench.add(result, metric="s/load", target=("fastinfer", ">=", 20.0))
    bench.finish()          # prints the table and machine; --json PATH writes JSON

Timing rules it enforces: warm-up calls first, an optional ``sync`` (e.g. ``torch.cuda.synchronize``)
before every clock read, interleaved trials, median of several repetitions with the spread (IQR and
min/max) reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "Bench",
    "Comparison",
    "Row",
    "Stats",
    "compare",
    "machine_info",
    "measure",
    "run_fresh",
    "summarize",
]

Clock = Callable[[], float]


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements (seconds unless said otherwise)."""

    n: int
    median: float
    mean: float
    minimum: float
    maximum: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = ±2.5% around it)."""
        return self.iqr / self.median if self.median else 0.0


def summarize(samples: Sequence[float]) -> Stats:
    """Median, mean, min/max and quartiles of ``samples`` (linear interpolation, like numpy)."""
    if not samples:
        raise ValueError("summarize() needs at least one sample")
    xs = sorted(samples)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Stats(
        n=len(xs),
        median=statistics.median(xs),
        mean=statistics.fmean(xs),
        minimum=xs[0],
        maximum=xs[-1],
        q1=q(0.25),
        q3=q(0.75),
    )


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeat: int = 7,
    number: int = 1,
    sync: Callable[[], None] | None = None,
    clock: Clock = time.perf_counter,
) -> Stats:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeat`` trials of ``number`` calls each.

    Each sample is the time per call of one trial. ``sync`` runs before every clock read.
    """
    return compare(
        {"x": fn}, baseline="x", warmup=warmup, repeat=repeat, number=number, sync=sync, clock=clock
    ).stats["x"]


@dataclass(frozen=True)
class Comparison:
    """Stats per variant and each variant's speed-up over the baseline (baseline / variant)."""

    baseline: str
    stats: Mapping[str, Stats]
    samples: Mapping[str, Sequence[float]] = field(repr=False)

    def ratio(self, name: str) -> float:
        """How many times faster ``name`` is than the baseline, by medians (>1 = faster)."""
        return self.stats[self.baseline].median / self.stats[name].median


def compare(
    variants: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    warmup: int = 2,
    repeat: int = 7,
    number: int = 1,
    sync: Callable[[], None] | None = None,
    clock: Clock = time.perf_counter,
) -> Comparison:
    """Time every variant with trials interleaved round-robin, so drift hits all alike."""
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(variants)}")
    if repeat < 1 or number < 1 or warmup < 0:
        raise ValueError("repeat and number must be >= 1 and warmup >= 0")
    sync = sync or (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            sync()
            t0 = clock()
            for _ in range(number):
                fn()
            sync()
            samples[name].append((clock() - t0) / number)
    return Comparison(baseline, {k: summarize(v) for k, v in samples.items()}, samples)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU, Python, torch and GPU of this machine, for the report."""
    import psutil
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
    }


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.2f} µs"
    return f"{s * 1e9:.0f} ns"


@dataclass
class Row:
    case: str
    variant: str
    value: float
    unit: str
    spread: float | None = None
    ratio: float | None = None
    target: str | None = None
    ok: bool | None = None


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


class Bench:
    """Collects rows, prints them as a table with the machine, and writes JSON with ``--json``.

    ``Bench`` parses the common command-line options itself: ``--json PATH`` and ``--quick`` (fewer
    repetitions; benchmarks read :attr:`quick`). Extra options can be added with ``add_argument``
    before reading :attr:`args`.
    """

    def __init__(self, name: str, *, description: str = "", argv: Sequence[str] | None = None):
        self.name = name
        self.description = description
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self._parser = argparse.ArgumentParser(prog=f"benchmarks/{name}", description=description)
        self._parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        self._parser.add_argument(
            "--quick", action="store_true", help="fewer repetitions (smoke run)"
        )
        self._argv = argv
        self._args: argparse.Namespace | None = None
        self.started = datetime.now(timezone.utc)

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        self._parser.add_argument(*args, **kwargs)

    @property
    def args(self) -> argparse.Namespace:
        if self._args is None:
            self._args = self._parser.parse_args(self._argv)
        return self._args

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def add(
        self,
        comparison: Comparison,
        *,
        case: str = "",
        unit: str = "s",
        target: tuple[str, str, float] | None = None,
    ) -> Comparison:
        """Add one row per variant of ``comparison``; ``target=(variant, op, ratio)`` is checked."""
        for variant, st in comparison.stats.items():
            ratio = None if variant == comparison.baseline else comparison.ratio(variant)
            row = Row(case, variant, st.median, unit, spread=st.spread, ratio=ratio)
            if target and target[0] == variant and ratio is not None:
                _, op, want = target
                row.target, row.ok = f"{op} {want}x", _OPS[op](ratio, want)
            self.rows.append(row)
        return comparison

    def add_value(
        self,
        case: str,
        variant: str,
        value: float,
        *,
        unit: str = "",
        ratio: float | None = None,
        target: tuple[str, float] | None = None,
    ) -> None:
        """Add a single figure; ``target=(op, bound)`` checks ``value`` (or ``ratio`` when given)."""
        row = Row(case, variant, value, unit, ratio=ratio)
        if target:
            op, bound = target
            subject = ratio if ratio is not None else value
            row.target, row.ok = f"{op} {bound:g}", _OPS[op](subject, bound)
        self.rows.append(row)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def table(self) -> str:
        head = ["case", "variant", "median", "spread", "ratio", "target", "ok"]
        body = []
        for r in self.rows:
            value = _fmt_time(r.value) if r.unit == "s" else f"{r.value:.4g} {r.unit}".strip()
            body.append(
                [
                    r.case,
                    r.variant,
                    value,
                    "" if r.spread is None else f"±{r.spread * 50:.1f}%",
                    "" if r.ratio is None else f"{r.ratio:.2f}x",
                    r.target or "",
                    "" if r.ok is None else ("yes" if r.ok else "NO"),
                ]
            )
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])

    def finish(self) -> dict[str, Any]:
        """Print the table, notes and machine; write JSON if asked. Returns the JSON document."""
        machine = machine_info()
        doc = {
            "benchmark": self.name,
            "description": self.description,
            "date": self.started.isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
            "machine": machine,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
        }
        print(f"\n== {self.name}: {self.description}")
        print(self.table())
        for n in self.notes:
            print(f"note: {n}")
        gpu = machine["gpu"] or "no GPU"
        print(
            f"machine: {machine['cpu']}, {machine['logical_cpus']} CPUs "
            f"({machine['physical_cores']} physical), {machine['memory_gib']} GiB, "
            f"Python {machine['python']}, torch {machine['torch']}, {gpu}"
        )
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(doc, f, indent=2)
        return doc


def run_fresh(code: str, *, env: Mapping[str, str] | None = None, timeout: float = 600) -> str:
    """Run ``code`` in a fresh Python process (cold imports, own page-cache view); return stdout.

    Use it for start-up figures (loading, compile caches) that a warm process would flatter.
    """
    merged = {**os.environ, **(env or {})}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [root, merged.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=merged, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode:
        raise RuntimeError(f"fresh process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout

"""One definition of a percentile, used by every statistics snapshot and histogram.

A percentile is read as numpy's default ("linear", Hyndman & Fan type 7): the value at rank
``q * (n - 1)`` of the sorted samples, interpolated between the two neighbouring order statistics.
With 100 samples p99 is therefore between the 99th and the 100th value, never simply the maximum.
Histograms estimate the order statistics from their buckets and read them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

__all__ = ["PERCENTILES", "percentile_key", "quantile", "quantile_from", "summary"]

#: The percentiles every distribution in fastinfer reports, as (field name, fraction).
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p999", 0.999),
)


def percentile_key(q: float) -> str:
    """``0.99`` -> ``"p99"``, ``0.999`` -> ``"p999"``, ``0.5`` -> ``"p50"``."""
    digits = f"{q * 100:.10g}".replace(".", "")
    return f"p{digits}"


def quantile_from(order_stat: Callable[[int], float], n: int, q: float) -> float:
    """The ``q`` quantile of ``n`` values given ``order_stat(k)``, the k-th smallest (0-based)."""
    if n <= 0:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    rank = q * (n - 1)
    k = math.floor(rank)
    frac = rank - k
    low = order_stat(k)
    if frac == 0.0 or k + 1 >= n:
        return low
    return low + (order_stat(k + 1) - low) * frac


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    return quantile_from(sorted_values.__getitem__, len(sorted_values), q)


def summary(samples: Iterable[float]) -> dict[str, float]:
    """``count``, ``mean``, the :data:`PERCENTILES` and ``max`` of ``samples`` (zeros when empty)."""
    xs = sorted(samples)
    out: dict[str, float] = {"count": len(xs), "mean": math.fsum(xs) / len(xs) if xs else 0.0}
    for key, q in PERCENTILES:
        out[key] = quantile(xs, q)
    out["max"] = xs[-1] if xs else 0.0
    return out

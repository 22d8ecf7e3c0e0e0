"""Histogram buckets: the defaults per unit and high-resolution log-linear buckets."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fastinfer.errors import ConfigError

__all__ = ["DEFAULT_LATENCY_BUCKETS", "DEFAULT_SIZE_BUCKETS", "LogLinearBuckets", "resolve_buckets"]

_INF = float("inf")

#: Latency buckets in seconds: 0.5 ms to 60 s (prometheus_client's stop at 10 s; LLM calls do not).
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Buckets for sizes and counts (batch sizes, tokens): powers of two from 1 to 4096.
DEFAULT_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(13))
_BYTES_BUCKETS: tuple[float, ...] = tuple(float(4**i) for i in range(5, 19))  # 1 KiB .. 64 GiB


@dataclass(frozen=True)
class LogLinearBuckets:
    """High-resolution buckets: each power-of-two octave split into ``per_octave`` equal parts.

    Percentiles read from them are within ``relative_error`` (``1 / (2 * per_octave)``: 1.6% for 32)
    of the exact value for observations between ``low`` and ``high`` (rounded out to powers of two).
    The defaults cover 1 µs to 4.5 hours in seconds (1089 buckets). Prometheus export uses the
    powers of two only, so a scrape stays small; snapshots and merges keep every bucket.

        rec.histogram("x_seconds", unit="seconds", buckets=LogLinearBuckets())
    """

    low: float = 2.0**-20
    high: float = 2.0**14
    per_octave: int = 32

    def __post_init__(self) -> None:
        if not (isinstance(self.low, int | float) and isinstance(self.high, int | float)):
            raise ConfigError(f"LogLinearBuckets low/high must be numbers, got {self!r}")
        if not (0 < self.low < self.high < _INF):
            raise ConfigError(
                f"LogLinearBuckets needs 0 < low < high < inf, got low={self.low}, high={self.high}"
            )
        n = self.per_octave
        if not isinstance(n, int) or n < 1 or n > 1024 or n & (n - 1):
            raise ConfigError(
                f"LogLinearBuckets per_octave must be a power of two in [1, 1024], got {n!r}"
            )
        if self.octaves > 256:
            raise ConfigError(
                f"LogLinearBuckets spans {self.octaves} octaves; keep high/low below 2**256"
            )

    @property
    def octaves(self) -> int:
        return self._e1 - self._e0

    @property
    def _e0(self) -> int:
        return math.floor(math.log2(self.low))

    @property
    def _e1(self) -> int:
        return math.ceil(math.log2(self.high))

    @property
    def relative_error(self) -> float:
        """Worst relative error of a percentile read from these buckets (inside [low, high])."""
        return 1.0 / (2 * self.per_octave)

    def bounds(self) -> tuple[float, ...]:
        """Every bucket's upper bound (exact binary fractions, identical in every process)."""
        n = self.per_octave
        out = [math.ldexp(1.0 + k / n, e) for e in range(self._e0, self._e1) for k in range(n)]
        out.append(math.ldexp(1.0, self._e1))
        return tuple(out)

    def export_bounds(self) -> tuple[float, ...]:
        """The powers of two: the buckets exported to Prometheus."""
        return tuple(math.ldexp(1.0, e) for e in range(self._e0, self._e1 + 1))


def resolve_buckets(
    name: str, unit: str, buckets: Sequence[float] | LogLinearBuckets | str | None
) -> tuple[tuple[float, ...], tuple[float, ...] | None, bool]:
    """-> (bounds, export bounds or None for all, midpoint percentiles)."""
    if buckets is None:
        if unit == "seconds":
            return DEFAULT_LATENCY_BUCKETS, None, False
        if unit == "bytes":
            return _BYTES_BUCKETS, None, False
        return DEFAULT_SIZE_BUCKETS, None, False
    if isinstance(buckets, str):
        if buckets != "log-linear":
            raise ConfigError(
                f"histogram {name!r}: buckets={buckets!r} is not understood; pass a sequence of "
                "upper bounds, a LogLinearBuckets(...) or 'log-linear'"
            )
        buckets = LogLinearBuckets() if unit == "seconds" else LogLinearBuckets(1.0, 2.0**40)
    if isinstance(buckets, LogLinearBuckets):
        return buckets.bounds(), buckets.export_bounds(), True
    try:
        bounds = [float(b) for b in buckets]
    except (TypeError, ValueError):
        raise ConfigError(f"histogram {name!r}: buckets must be numbers, got {buckets!r}") from None
    if bounds and bounds[-1] == _INF:
        bounds.pop()  # +Inf is always implied
    if not bounds:
        raise ConfigError(f"histogram {name!r} needs at least one finite bucket bound")
    if any(math.isnan(b) or math.isinf(b) for b in bounds) or any(
        a >= b for a, b in itertools.pairwise(bounds)
    ):
        raise ConfigError(
            f"histogram {name!r}: bucket bounds must be finite and strictly increasing, got {bounds}"
        )
    return tuple(bounds), None, False

"""Counters, gauges and histograms that cost less than prometheus_client, merge across processes
and export to Prometheus.

    >>> rec = MetricsRecorder()
    >>> latency = rec.histogram("app_latency_seconds", "time per request", unit="seconds")
    >>> latency.observe(0.012)
    >>> with rec.timer("app_step_seconds"):
    ...     pass
    >>> rec.snapshot()["app_latency_seconds"].series[0].count
    1

Design notes (why it is fast and exact):

- A histogram observation is one ``bisect`` on a precomputed tuple of bucket bounds (C code) and
  a few additions into the calling thread's own shard of the series: no lock, so no contention
  between threads and no lost counts (each shard has one writer). Readers add the shards up; a
  finished thread's shard is folded into the series. prometheus_client takes two locks per
  observation and walks its buckets in Python. Counters and gauges use a per-series lock.
- Latencies are seconds. Histograms default to latency buckets (``unit="seconds"``) or powers of
  two for sizes; :class:`LogLinearBuckets` gives high-resolution buckets whose percentiles have a
  bounded relative error (``1 / (2 * per_octave)``, 1.6% by default).
- Worker processes ship *deltas* (:meth:`MetricsRecorder.collect_delta`): plain, picklable data
  holding only what changed since the last ship. The parent adds them (:meth:`MetricsRecorder.merge`),
  so a worker that dies loses only what it never shipped and leaves no file behind; duplicates are
  ignored by (source, sequence number).

See docs/metrics.md for the standard metric names and the Grafana dashboard.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal, TypedDict, TypeVar, cast

from fastinfer._optional import require
from fastinfer.errors import CardinalityError, ConfigError, MetricNameError

__all__ = [
    "DEFAULT_LATENCY_BUCKETS",
    "DEFAULT_SIZE_BUCKETS",
    "STANDARD_METRICS",
    "Counter",
    "Gauge",
    "Histogram",
    "LogLinearBuckets",
    "MetricSnapshot",
    "MetricsRecorder",
    "MetricsSnapshot",
    "RecorderStatistics",
    "SeriesSnapshot",
    "StandardMetrics",
    "Timer",
    "standard_metrics",
]

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
_INF = float("inf")

#: Latency buckets in seconds: 0.5 ms to 60 s (prometheus_client's stop at 10 s; LLM calls do not).
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Buckets for sizes and counts (batch sizes, tokens): powers of two from 1 to 4096.
DEFAULT_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(13))
_BYTES_BUCKETS: tuple[float, ...] = tuple(float(4**i) for i in range(5, 19))  # 1 KiB .. 64 GiB

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_UNIT = re.compile(r"^[a-z][a-z0-9_]*$")
_NON_BASE_UNITS = {
    "ms": "seconds", "milliseconds": "seconds", "us": "seconds", "microseconds": "seconds",
    "ns": "seconds", "nanoseconds": "seconds", "minutes": "seconds", "hours": "seconds",
    "kb": "bytes", "mb": "bytes", "gb": "bytes", "kilobytes": "bytes", "megabytes": "bytes",
}  # fmt: skip
# statistics() fields in sub-units are exported in seconds: ``max_wait_ms`` -> ``..._max_wait_seconds``
_SUBUNIT_SUFFIXES = {"_ms": 1e-3, "_us": 1e-6, "_ns": 1e-9}
GaugeMode = Literal["worker", "sum", "max", "min", "last"]
_GAUGE_MODES = ("worker", "sum", "max", "min", "last")
Kind = Literal["counter", "gauge", "histogram"]


def _validate_name(name: object, what: str = "metric") -> str:
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        raise MetricNameError(
            f"invalid {what} name {name!r}: Prometheus names match [a-zA-Z_:][a-zA-Z0-9_:]* "
            "(letters, digits, '_' and ':'; not starting with a digit). "
            "Fix: use snake_case such as 'myapp_request_latency_seconds'."
        )
    if name.startswith("__"):
        raise MetricNameError(
            f"invalid {what} name {name!r}: names starting with '__' are reserved"
        )
    return name


def _validate_labels(metric: str, labels: object, *, kind: str) -> tuple[str, ...]:
    if isinstance(labels, str):
        raise ConfigError(
            f"labels of {metric!r} must be a sequence of names, got the string {labels!r}; "
            f"write labels=({labels!r},)"
        )
    names = tuple(cast("Iterable[str]", labels))
    for label in names:
        if not isinstance(label, str) or not _LABEL_NAME.match(label) or label.startswith("__"):
            raise MetricNameError(
                f"invalid label name {label!r} on metric {metric!r}: Prometheus label names match "
                "[a-zA-Z_][a-zA-Z0-9_]* and must not start with '__'. Fix: use snake_case."
            )
        if kind == "histogram" and label == "le":
            raise MetricNameError(
                f"label 'le' is reserved for histogram buckets (metric {metric!r}); rename it"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MetricNameError(f"metric {metric!r} repeats label names {dupes}; name each once")
    return names


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


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


def _resolve_buckets(
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


# --------------------------------------------------------------------------------------------
# Series (one label set) and metric families
# --------------------------------------------------------------------------------------------


def _bad_value(metric: str, value: object) -> ConfigError:
    return ConfigError(
        f"metric {metric!r} got {value!r} ({type(value).__name__}); record a real Python number "
        "(use tensor.item() for a tensor), not NaN"
    )


class _CounterSeries:
    __slots__ = ("_lock", "_metric", "_value", "labels")

    def __init__(self, metric: str, labels: tuple[str, ...]) -> None:
        self._metric = metric
        self.labels = labels
        self._lock = threading.Lock()
        self._value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0) to the counter."""
        if not amount >= 0:  # also refuses NaN
            raise ConfigError(
                f"counter {self._metric!r} can only go up: inc({amount!r}) refused; "
                "use a gauge for values that go down"
            )
        lock = self._lock
        lock.acquire()
        try:
            self._value += amount
        finally:
            lock.release()

    @property
    def value(self) -> float:
        return self._value

    def _set_total(self, value: float) -> None:  # tracked sources report absolute totals
        self._value = value


class _GaugeSeries:
    __slots__ = ("_lock", "_metric", "_stamp", "_value", "labels")

    def __init__(self, metric: str, labels: tuple[str, ...]) -> None:
        self._metric = metric
        self.labels = labels
        self._lock = threading.Lock()
        self._value: float = 0.0
        self._stamp = 0  # 0: never set (a merge ignores unset gauges)

    def set(self, value: float) -> None:
        """Set the gauge to ``value``."""
        self._value = value
        self._stamp = next(_STAMPS)

    def inc(self, amount: float = 1) -> None:
        lock = self._lock
        lock.acquire()
        try:
            self._value += amount
            self._stamp = next(_STAMPS)
        finally:
            lock.release()

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)

    @property
    def value(self) -> float:
        return self._value


_STAMPS = itertools.count(1)  # next() on itertools.count is atomic under the GIL


class _Shard:
    """One thread's part of a histogram series: written by that thread only, so no lock."""

    __slots__ = ("counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum: float = 0.0
        self.min: float = _INF
        self.max: float = -_INF

    def fold(self, other: _Shard) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)


class _ThreadToken:
    """Lives in a thread's local storage; when the thread ends, its shard is folded into the base."""

    __slots__ = ("__weakref__",)


class _HistogramSeries:
    """Per-thread shards: an observation touches only its own thread's shard (no lock, no
    contention); readers add the shards up under the series lock. A finished thread's shard is
    folded into ``_base`` so that thread churn does not grow the series."""

    __slots__ = (
        "__weakref__",
        "_base",
        "_bounds",
        "_local",
        "_lock",
        "_metric",
        "_shards",
        "labels",
    )

    def __init__(self, metric: str, labels: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        self._metric = metric
        self.labels = labels
        self._bounds = bounds
        self._base = _Shard(len(bounds) + 1)  # last slot: +Inf; merges and retired shards
        self._shards: list[_Shard] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Record one observation (seconds for latencies)."""
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        try:
            i = bisect_left(self._bounds, value)
        except TypeError:
            raise _bad_value(self._metric, value) from None
        if value != value:  # NaN would poison the sum forever
            raise _bad_value(self._metric, value)
        try:
            shard = self._local.shard
        except AttributeError:
            shard = self._new_shard()
        shard.counts[i] += 1
        shard.sum += value
        if value < shard.min:
            shard.min = value
        if value > shard.max:
            shard.max = value

    def _new_shard(self) -> _Shard:
        shard = _Shard(len(self._bounds) + 1)
        token = _ThreadToken()
        with self._lock:
            self._shards.append(shard)
        # a weak reference: a series dropped while the thread lives on must not be kept alive
        weakref.finalize(token, _retire_shard, weakref.ref(self), shard)
        self._local.token = token  # dropped when the thread ends
        self._local.shard = shard
        return shard

    def _retire(self, shard: _Shard) -> None:
        with self._lock:
            if shard in self._shards:
                self._shards.remove(shard)
                self._base.fold(shard)

    def time(self, *, cuda_sync: bool | Literal["events"] = False) -> Timer:
        """A :class:`Timer` observing into this series."""
        return Timer(self, cuda_sync=cuda_sync)

    def _read(self) -> tuple[list[int], float, float, float]:
        with self._lock:
            base = self._base
            counts, total, lo, hi = list(base.counts), base.sum, base.min, base.max
            for sh in self._shards:
                # a shard's owner may be writing: each read is atomic; count and sum can be one
                # observation apart for an instant, counts are never lost
                counts = [a + b for a, b in zip(counts, list(sh.counts))]
                total += sh.sum
                lo = min(lo, sh.min)
                hi = max(hi, sh.max)
            return counts, total, lo, hi

    def _add(
        self,
        bucket_deltas: Iterable[tuple[int, int]],
        total: float,
        lo: float | None,
        hi: float | None,
    ) -> None:
        with self._lock:
            base = self._base
            counts = base.counts
            for i, c in bucket_deltas:
                counts[i] += c
            base.sum += total
            if lo is not None and lo < base.min:
                base.min = lo
            if hi is not None and hi > base.max:
                base.max = hi


def _retire_shard(series_ref: weakref.ref[_HistogramSeries], shard: _Shard) -> None:
    series = series_ref()
    if series is not None:
        series._retire(shard)


_Series = _CounterSeries | _GaugeSeries | _HistogramSeries
_S = TypeVar("_S", _CounterSeries, _GaugeSeries, _HistogramSeries)


class _Metric:
    """A metric family: a name, its label names and one series per label set."""

    kind: Kind

    def __init__(
        self, name: str, help: str, unit: str, label_names: tuple[str, ...], max_series: int
    ) -> None:
        self.name = name
        self.help = help
        self.unit = unit
        self.label_names = label_names
        self.max_series = max_series
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def _new(self, key: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def _child(self, key: tuple[str, ...]) -> Any:
        child = self._children.get(key)
        if child is not None:
            return child
        with self._lock:
            child = self._children.get(key)
            if child is None:
                if len(self._children) >= self.max_series:
                    shown = dict(zip(self.label_names, key))
                    raise CardinalityError(
                        f"metric {self.name!r} already has {len(self._children)} label sets "
                        f"(limit max_series={self.max_series}); refused new labels {shown}. "
                        "Fix: do not put unbounded values (request ids, user ids, raw paths) in "
                        "labels, or raise the limit with max_series=N when creating the metric "
                        "or the MetricsRecorder."
                    )
                child = self._children[key] = self._new(key)
            return child

    def labels(self, *values: object, **kw: object) -> Any:
        """The series for one set of label values, by position or by name."""
        names = self.label_names
        if not names:
            raise ConfigError(f"metric {self.name!r} has no labels; call its methods directly")
        if values and kw:
            raise ConfigError(f"labels() of {self.name!r} takes values by position or by name")
        if kw:
            if set(kw) != set(names):
                raise ConfigError(
                    f"metric {self.name!r} has labels {list(names)}; got {sorted(kw)}"
                )
            values = tuple(kw[n] for n in names)
        if len(values) != len(names):
            raise ConfigError(
                f"metric {self.name!r} has labels {list(names)}; got {len(values)} values {values}"
            )
        key = tuple(v if type(v) is str else str(v) for v in values)
        return self._child(key)

    def _unlabelled(self) -> Any:
        if self.label_names:
            raise ConfigError(
                f"metric {self.name!r} has labels {list(self.label_names)}: "
                f"use {self.name}.labels(...) first"
            )
        return self._child(())

    def _refuse(self, *args: object, **kwargs: object) -> None:
        self._unlabelled()

    def _series_items(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._children.items())

    def _spec(self) -> tuple[Any, ...]:
        return (self.kind, self.unit, self.label_names)


class Counter(_Metric):
    """A value that only goes up (requests, errors). Use ``.inc()`` or ``.labels(...).inc()``."""

    kind: Kind = "counter"
    inc: Callable[..., None]

    def __init__(
        self, name: str, help: str, unit: str, label_names: tuple[str, ...], max_series: int
    ) -> None:
        super().__init__(name, help, unit, label_names, max_series)
        self.inc = self._refuse if label_names else self._unlabelled().inc

    def _new(self, key: tuple[str, ...]) -> _CounterSeries:
        return _CounterSeries(self.name, key)

    @property
    def value(self) -> float:
        return cast("float", self._unlabelled().value)


class Gauge(_Metric):
    """A value that goes up and down (queue depth). ``merge`` says how worker values combine."""

    kind: Kind = "gauge"
    set: Callable[[float], None]
    inc: Callable[..., None]
    dec: Callable[..., None]

    def __init__(
        self,
        name: str,
        help: str,
        unit: str,
        label_names: tuple[str, ...],
        max_series: int,
        merge: GaugeMode = "worker",
    ) -> None:
        super().__init__(name, help, unit, label_names, max_series)
        self.merge_mode: GaugeMode = merge
        # worker name -> label key -> (value, stamp): values merged from worker processes
        self._workers: dict[str, dict[tuple[str, ...], tuple[float, int]]] = {}
        if label_names:
            self.set = self.inc = self.dec = self._refuse
        else:
            child = self._unlabelled()
            self.set, self.inc, self.dec = child.set, child.inc, child.dec

    def _new(self, key: tuple[str, ...]) -> _GaugeSeries:
        return _GaugeSeries(self.name, key)

    @property
    def value(self) -> float:
        return cast("float", self._unlabelled().value)

    def _spec(self) -> tuple[Any, ...]:
        return (*super()._spec(), self.merge_mode)


class Histogram(_Metric):
    """A distribution (latencies, batch sizes). Use ``.observe(v)`` or ``.labels(...).observe(v)``."""

    kind: Kind = "histogram"
    observe: Callable[[float], None]

    def __init__(
        self,
        name: str,
        help: str,
        unit: str,
        label_names: tuple[str, ...],
        max_series: int,
        bounds: tuple[float, ...],
        export_bounds: tuple[float, ...] | None,
        midpoint: bool,
    ) -> None:
        super().__init__(name, help, unit, label_names, max_series)
        self.bounds = bounds
        self.export_bounds = export_bounds
        self.midpoint = midpoint
        self.observe = self._refuse if label_names else self._unlabelled().observe

    def _new(self, key: tuple[str, ...]) -> _HistogramSeries:
        return _HistogramSeries(self.name, key, self.bounds)

    def time(self, *, cuda_sync: bool | Literal["events"] = False) -> Timer:
        """A :class:`Timer` (context manager and decorator) observing seconds into this histogram."""
        return Timer(self._unlabelled(), cuda_sync=cuda_sync)

    def _spec(self) -> tuple[Any, ...]:
        return (*super()._spec(), self.bounds)


# --------------------------------------------------------------------------------------------
# Timer
# --------------------------------------------------------------------------------------------


class Timer:
    """Times a block or every call of a function and observes the seconds into a histogram.

    ``cuda_sync=True`` synchronizes the CUDA device before both clock reads, so queued kernels are
    counted; ``cuda_sync="events"`` records CUDA events around the block instead and waits only for
    the end event (device time on the current stream). Both are no-ops without CUDA.

        with rec.timer("app_step_seconds"):
            model(x)

        @rec.timer("app_handler_seconds")
        def handler(x): ...
    """

    __slots__ = ("_cuda", "_series", "_starts", "elapsed")

    def __init__(
        self, series: _HistogramSeries, *, cuda_sync: bool | Literal["events"] = False
    ) -> None:
        if cuda_sync not in (False, True, "events"):
            raise ConfigError(f"cuda_sync must be False, True or 'events', got {cuda_sync!r}")
        self._series = series
        self._cuda: str | None = None
        if cuda_sync:
            import torch

            if torch.cuda.is_available():
                self._cuda = "events" if cuda_sync == "events" else "sync"
        self._starts: dict[int, list[Any]] = {}
        #: seconds measured by the last completed block or call
        self.elapsed: float | None = None

    def _start(self) -> Any:
        if self._cuda is None:
            return time.perf_counter()
        import torch

        if self._cuda == "sync":
            torch.cuda.synchronize()
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def _stop(self, start: Any) -> float:
        if self._cuda is None:
            elapsed = time.perf_counter() - start
        elif self._cuda == "sync":
            import torch

            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        else:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1000.0  # ms -> s
        self.elapsed = elapsed
        self._series.observe(elapsed)
        return elapsed

    def __enter__(self) -> Timer:
        self._starts.setdefault(threading.get_ident(), []).append(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        ident = threading.get_ident()
        stack = self._starts[ident]
        start = stack.pop()
        if not stack:
            del self._starts[ident]
        self._stop(start)

    def __call__(self, fn: _F) -> _F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                start = self._start()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self._stop(start)

            return cast("_F", awrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self._start()
            try:
                return fn(*args, **kwargs)
            finally:
                self._stop(start)

        return cast("_F", wrapper)


# --------------------------------------------------------------------------------------------
# Snapshots: frozen plain data
# --------------------------------------------------------------------------------------------

_PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))


@dataclass(frozen=True)
class SeriesSnapshot:
    """One label set of a metric. Counters and gauges fill ``value``; histograms the rest.

    ``bucket_counts`` are per bucket (not cumulative), one per bound plus the +Inf bucket.
    Percentiles are estimated from the buckets (exact to the bucket width, clamped to min/max).
    In a delta (:meth:`MetricsRecorder.collect_delta`) histograms carry ``bucket_deltas`` instead:
    ``(bucket index, added count)`` for the buckets that changed, so merging 1000-bucket
    histograms costs what changed, not what exists.
    """

    labels: Mapping[str, str]
    value: float | None = None
    count: int = 0
    sum: float = 0.0
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    p999: float | None = None
    bucket_counts: tuple[int, ...] = ()
    bucket_deltas: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class MetricSnapshot:
    """One metric family at one moment."""

    name: str
    kind: Kind
    help: str
    unit: str
    label_names: tuple[str, ...]
    series: tuple[SeriesSnapshot, ...]
    buckets: tuple[float, ...] = ()  # histogram upper bounds, +Inf implied
    export_buckets: tuple[float, ...] | None = None
    midpoint: bool = False
    merge: GaugeMode = "worker"

    def get(self, **labels: object) -> SeriesSnapshot | None:
        """The series with exactly these label values, or None."""
        want = {k: str(v) for k, v in labels.items()}
        for s in self.series:
            if dict(s.labels) == want:
                return s
        return None

    def __getitem__(self, labels: Mapping[str, object]) -> SeriesSnapshot:
        found = self.get(**labels)
        if found is None:
            raise KeyError(f"metric {self.name!r} has no series with labels {dict(labels)}")
        return found


@dataclass(frozen=True)
class MetricsSnapshot:
    """A frozen, plain-data view of a recorder: picklable, printable, convertible to JSON.

    ``delta`` snapshots (from :meth:`MetricsRecorder.collect_delta`) hold only what changed since the
    previous one from the same ``source``; ``seq`` numbers them from 1.
    """

    metrics: Mapping[str, MetricSnapshot]
    time: float
    source: str = ""
    seq: int = 0
    delta: bool = False
    pid: int = 0

    def __getitem__(self, name: str) -> MetricSnapshot:
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"no metric {name!r}; have {sorted(self.metrics)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.metrics

    def __iter__(self) -> Iterator[MetricSnapshot]:
        return iter(self.metrics.values())

    def value(self, name: str, **labels: object) -> float | None:
        """A counter's or gauge's value (a histogram's count), or None when the series is absent."""
        s = self[name].get(**labels)
        if s is None:
            return None
        return s.value if s.value is not None else float(s.count)

    # -- plain data ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and numbers (``json.dumps``-able)."""
        out: dict[str, Any] = {
            "time": self.time,
            "source": self.source,
            "seq": self.seq,
            "delta": self.delta,
            "pid": self.pid,
            "metrics": {},
        }
        for m in self.metrics.values():
            md: dict[str, Any] = {
                "kind": m.kind,
                "help": m.help,
                "unit": m.unit,
                "label_names": list(m.label_names),
                "series": [],
            }
            if m.kind == "histogram":
                md["buckets"] = list(m.buckets)
                md["export_buckets"] = None if m.export_buckets is None else list(m.export_buckets)
                md["midpoint"] = m.midpoint
            if m.kind == "gauge":
                md["merge"] = m.merge
            for s in m.series:
                sd: dict[str, Any] = {"labels": dict(s.labels)}
                if m.kind == "histogram":
                    for f in ("count", "sum", "min", "max", "mean", "p50", "p90", "p99", "p999"):
                        sd[f] = getattr(s, f)
                    sd["bucket_counts"] = list(s.bucket_counts)
                    if s.bucket_deltas:
                        sd["bucket_deltas"] = [list(p) for p in s.bucket_deltas]
                else:
                    sd["value"] = s.value
                md["series"].append(sd)
            out["metrics"][m.name] = md
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricsSnapshot:
        """Rebuild a snapshot from :meth:`to_dict` output (for example after JSON transport)."""
        try:
            metrics: dict[str, MetricSnapshot] = {}
            for name, md in data["metrics"].items():
                series = tuple(_series_from_dict(sd) for sd in md["series"])
                eb = md.get("export_buckets")
                metrics[name] = MetricSnapshot(
                    name=name,
                    kind=md["kind"],
                    help=md.get("help", ""),
                    unit=md.get("unit", ""),
                    label_names=tuple(md["label_names"]),
                    series=series,
                    buckets=tuple(md.get("buckets", ())),
                    export_buckets=None if eb is None else tuple(eb),
                    midpoint=bool(md.get("midpoint", False)),
                    merge=md.get("merge", "worker"),
                )
            return cls(
                metrics=metrics,
                time=float(data["time"]),
                source=str(data.get("source", "")),
                seq=int(data.get("seq", 0)),
                delta=bool(data.get("delta", False)),
                pid=int(data.get("pid", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"not a MetricsSnapshot.to_dict() document ({type(exc).__name__}: {exc})"
            ) from None

    # -- display -----------------------------------------------------------------------------

    def _rows(self) -> list[list[str]]:
        rows = []
        for m in self.metrics.values():
            for s in m.series:
                labels = ",".join(f"{k}={v}" for k, v in s.labels.items())
                if m.kind == "histogram":
                    f = functools.partial(_fmt, unit=m.unit)
                    rows.append(
                        [
                            m.name,
                            labels,
                            m.kind,
                            str(s.count),
                            f(s.mean),
                            f(s.p50),
                            f(s.p90),
                            f(s.p99),
                            f(s.p999),
                            f(s.max),
                        ]
                    )
                else:
                    rows.append([m.name, labels, m.kind, _fmt(s.value, m.unit), *[""] * 6])
        return rows

    _HEAD = ("metric", "labels", "kind", "count/value", "mean", "p50", "p90", "p99", "p99.9", "max")

    def __str__(self) -> str:
        rows = self._rows()
        if not rows:
            return "(no metrics)"
        table = [list(self._HEAD), *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(self._HEAD))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{html.escape(h)}</th>" for h in self._HEAD)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
            for r in self._rows()
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def plot(self, names: Sequence[str] | None = None) -> Any:
        """Draw each histogram's distribution with its p50/p99 (matplotlib). Returns the figure."""
        plt = require("matplotlib.pyplot", purpose="MetricsSnapshot.plot()")
        hists = [
            m
            for m in self.metrics.values()
            if m.kind == "histogram" and (names is None or m.name in names)
        ]
        if names is not None:
            missing = sorted(set(names) - {m.name for m in hists})
            if missing:
                raise ConfigError(
                    f"plot(): no histogram named {missing}; have {sorted(self.metrics)}"
                )
        if not hists:
            raise ConfigError("plot(): this snapshot has no histograms to draw")
        fig, axes = plt.subplots(len(hists), 1, figsize=(7, 2.6 * len(hists)), squeeze=False)
        for ax, m in zip(axes[:, 0], hists):
            for s in m.series:
                if not s.count:
                    continue
                edges = [s.min if s.min is not None else 0.0, *m.buckets]
                lows = [max(edges[i], s.min or 0.0) for i in range(len(m.buckets))]
                highs = [min(b, s.max if s.max is not None else b) for b in m.buckets]
                xs, ys = [], []
                for lo, hi, c in zip(lows, highs, s.bucket_counts):
                    if c and hi > lo:
                        xs.append((lo + hi) / 2)
                        ys.append(c / s.count / (hi - lo))
                    elif c:
                        xs.append(hi)
                        ys.append(c / s.count)
                label = ",".join(f"{k}={v}" for k, v in s.labels.items()) or m.name
                ax.plot(xs, ys, marker=".", label=label)
                for q, style in ((s.p50, "--"), (s.p99, ":")):
                    if q is not None:
                        ax.axvline(q, linestyle=style, color="gray")
            if m.unit == "seconds" or m.midpoint:
                ax.set_xscale("log")
            ax.set_title(f"{m.name} (dashed p50, dotted p99)")
            ax.set_xlabel(m.unit or "value")
            ax.set_ylabel("density")
            ax.legend(fontsize="small")
        fig.tight_layout()
        return fig


def _series_from_dict(sd: Mapping[str, Any]) -> SeriesSnapshot:
    skip = ("labels", "bucket_counts", "bucket_deltas")
    kw: dict[str, Any] = {k: v for k, v in sd.items() if k not in skip}
    return SeriesSnapshot(
        labels=dict(sd["labels"]),
        bucket_counts=tuple(sd.get("bucket_counts", ())),
        bucket_deltas=tuple((int(i), int(c)) for i, c in sd.get("bucket_deltas", ())),
        **kw,
    )


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "seconds":
        a = abs(v)
        if a >= 1 or a == 0:
            return f"{v:.3g} s"
        if a >= 1e-3:
            return f"{v * 1e3:.3g} ms"
        return f"{v * 1e6:.3g} µs"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def _percentiles(
    counts: Sequence[int], bounds: Sequence[float], lo: float, hi: float, midpoint: bool
) -> dict[str, float]:
    """numpy-style (linear) percentiles estimated from bucket counts, clamped to [min, max]."""
    cum = list(itertools.accumulate(counts))
    n = cum[-1]
    nb = len(bounds)

    def order_stat(k: int) -> float:  # estimate of the k-th smallest value (0-based)
        j = bisect_right(cum, k)
        below = cum[j - 1] if j else 0
        lower = bounds[j - 1] if j else lo
        upper = bounds[j] if j < nb else hi
        lower, upper = max(lower, lo), min(upper, hi)
        if upper <= lower:
            return lower
        if midpoint:
            return (lower + upper) / 2
        return lower + (upper - lower) * ((k - below + 0.5) / counts[j])

    out = {}
    for key, q in _PERCENTILES:
        r = q * (n - 1)
        k0 = math.floor(r)
        frac = r - k0
        v0 = order_stat(k0)
        v = v0 if frac == 0 else v0 + (order_stat(k0 + 1) - v0) * frac
        out[key] = min(max(v, lo), hi)
    return out


def _hist_series_snapshot(
    labels: Mapping[str, str],
    counts: Sequence[int],
    total: float,
    lo: float,
    hi: float,
    bounds: Sequence[float],
    midpoint: bool,
    *,
    percentiles: bool = True,
) -> SeriesSnapshot:
    n = sum(counts)
    if n == 0:
        return SeriesSnapshot(labels=labels, count=0, sum=0.0, bucket_counts=tuple(counts))
    pct: dict[str, Any] = _percentiles(counts, bounds, lo, hi, midpoint) if percentiles else {}
    return SeriesSnapshot(
        labels=labels,
        count=n,
        sum=total,
        min=lo,
        max=hi,
        mean=total / n,
        bucket_counts=tuple(counts),
        **pct,
    )


# --------------------------------------------------------------------------------------------
# Statistics and tracking
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecorderStatistics:
    """A frozen view of the recorder itself."""

    metrics: int
    series: int
    tracked: int
    deltas_shipped: int
    deltas_merged: int
    duplicate_deltas_ignored: int
    workers: int
    worker_restarts: int
    track_errors: int


@dataclass
class _Tracked:
    ref: Callable[[], Any]
    prefix: str
    labels: dict[str, str]
    names: dict[str, str]
    counters: frozenset[str]
    standard: bool
    failed: bool = False


# field name -> (metric name, kind, extra labels); see STANDARD_METRICS.
_STANDARD_FIELDS: dict[str, tuple[str, Kind, dict[str, str]]] = {
    "queue_depth": ("fastinfer_queue_depth", "gauge", {}),
    "batches_in_flight": ("fastinfer_batches_in_flight", "gauge", {}),
    "workers_alive": ("fastinfer_workers_alive", "gauge", {}),
    "worker_restarts": ("fastinfer_worker_restarts_total", "counter", {}),
    "worker_restarts_total": ("fastinfer_worker_restarts_total", "counter", {}),
    "worker_busy_ratio": ("fastinfer_worker_busy_ratio", "gauge", {}),
    **{
        f"requests_{o}": ("fastinfer_requests_total", "counter", {"outcome": o})
        for o in ("ok", "failed", "rejected", "expired", "cancelled")
    },
    "cache_hits": ("fastinfer_compile_cache_total", "counter", {"result": "hit"}),
    "cache_misses": ("fastinfer_compile_cache_total", "counter", {"result": "miss"}),
    "cache_bypasses": ("fastinfer_compile_cache_total", "counter", {"result": "bypass"}),
    "cache_bypass": ("fastinfer_compile_cache_total", "counter", {"result": "bypass"}),
}
_STANDARD_FIELDS["busy_ratio_per_worker"] = ("fastinfer_worker_busy_ratio", "gauge", {})


def _dict_label(field_name: str) -> str:
    """The label for a dict field's keys: ``worker`` for ``*_per_worker``, else ``key``."""
    if field_name == "worker_busy_ratio":
        return "worker"
    _, sep, tail = field_name.rpartition("_per_")
    return tail if sep and _LABEL_NAME.match(tail) and tail != "le" else "key"


# --------------------------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------------------------


class MetricsRecorder:
    """Creates and holds metrics; snapshots, merges and exports them.

    Args:
        max_series: default limit of label sets per metric (a :class:`CardinalityError` past it).
        clock: wall clock for snapshot timestamps (injectable in tests).

    Getting a metric that exists returns it; asking for the same name with another kind, unit,
    label names, buckets or merge mode raises :class:`ConfigError`.

        rec = MetricsRecorder()
        reqs = rec.counter("app_requests_total", "requests", labels=("outcome",))
        reqs.labels("ok").inc()
        print(rec.snapshot())
    """

    def __init__(self, *, max_series: int = 1000, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(max_series, int) or max_series < 1:
            raise ConfigError(f"max_series must be a positive int, got {max_series!r}")
        self.max_series = max_series
        self._clock = clock
        self._metrics: dict[str, _Metric] = {}
        self._sample_names: dict[str, str] = {}  # exposed sample name -> owning metric
        self._lock = threading.RLock()
        self._tracked: list[_Tracked] = []
        # collect_delta() state: (metric, labels) -> what was shipped last
        self._source = uuid.uuid4().hex
        self._seq = 0
        self._shipped: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._delta_lock = threading.Lock()
        # merge() state
        self._merge_lock = threading.Lock()
        self._sources: dict[str, tuple[str, int]] = {}  # source -> (worker, last seq)
        self._worker_source: dict[str, str] = {}  # worker -> its current source
        self._merged = 0
        self._duplicates = 0
        self._restarts = 0
        self._track_errors = 0

    # -- creation -------------------------------------------------------------------------

    def _get_or_create(self, name: str, kind: str, make: Callable[[], _Metric]) -> Any:
        existing = self._metrics.get(name)
        if existing is None:
            with self._lock:
                existing = self._metrics.get(name)
                if existing is None:
                    metric = make()
                    self._reserve(metric)
                    self._metrics[name] = metric
                    return metric
        new = make()
        if existing._spec() != new._spec():
            raise ConfigError(
                f"metric {name!r} already exists as {_describe(existing)}; asked for "
                f"{_describe(new)}. Fix: use one definition (or another name)."
            )
        return existing

    def _reserve(self, metric: _Metric) -> None:
        name = metric.name
        if metric.kind == "histogram":
            samples = [name, f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"]
        elif metric.kind == "counter":
            base = name[:-6] if name.endswith("_total") else name
            samples = [base, f"{base}_total", f"{base}_created"]
        else:
            samples = [name]
        for s in samples:
            owner = self._sample_names.get(s)
            if owner is not None and owner != name:
                raise MetricNameError(
                    f"metric {name!r} would expose {s!r}, which metric {owner!r} already exposes; "
                    "rename one of them"
                )
        for s in samples:
            self._sample_names[s] = name

    def _common(self, name: str, labels: Iterable[str], kind: str) -> tuple[str, tuple[str, ...]]:
        name = _validate_name(name)
        return name, _validate_labels(name, labels, kind=kind)

    def _limit(self, max_series: int | None) -> int:
        if max_series is None:
            return self.max_series
        if not isinstance(max_series, int) or max_series < 1:
            raise ConfigError(f"max_series must be a positive int, got {max_series!r}")
        return max_series

    def counter(
        self,
        name: str,
        help: str = "",
        *,
        labels: Sequence[str] = (),
        max_series: int | None = None,
    ) -> Counter:
        """A counter; the name should end in ``_total`` (it is exported as ``<base>_total``)."""
        name, names = self._common(name, labels, "counter")
        limit = self._limit(max_series)
        return cast(
            "Counter",
            self._get_or_create(name, "counter", lambda: Counter(name, help, "", names, limit)),
        )

    def gauge(
        self,
        name: str,
        help: str = "",
        *,
        labels: Sequence[str] = (),
        unit: str = "",
        merge: GaugeMode = "worker",
        max_series: int | None = None,
    ) -> Gauge:
        """A gauge. ``merge`` says how values from worker processes combine in :meth:`merge`:
        ``"worker"`` keeps one series per worker (a ``worker`` label), ``"sum"``/``"max"``/
        ``"min"``/``"last"`` aggregate them into one value."""
        name, names = self._common(name, labels, "gauge")
        unit = _check_unit(name, unit)
        if merge not in _GAUGE_MODES:
            raise ConfigError(f"gauge {name!r}: merge must be one of {_GAUGE_MODES}, got {merge!r}")
        limit = self._limit(max_series)
        return cast(
            "Gauge",
            self._get_or_create(
                name, "gauge", lambda: Gauge(name, help, unit, names, limit, merge)
            ),
        )

    def histogram(
        self,
        name: str,
        help: str = "",
        *,
        unit: str | None = None,
        labels: Sequence[str] = (),
        buckets: Sequence[float] | LogLinearBuckets | str | None = None,
        max_series: int | None = None,
    ) -> Histogram:
        """A histogram. ``unit`` defaults from the name's suffix (``_seconds`` -> ``"seconds"``).

        ``buckets``: upper bounds, :class:`LogLinearBuckets` (or ``"log-linear"``) for percentiles
        with bounded relative error, or None for the unit's defaults (latency buckets for seconds,
        powers of two otherwise).
        """
        name, names = self._common(name, labels, "histogram")
        if unit is None:
            unit = (
                "seconds"
                if name.endswith("_seconds")
                else ("bytes" if name.endswith("_bytes") else "")
            )
        unit = _check_unit(name, unit)
        bounds, export, midpoint = _resolve_buckets(name, unit, buckets)
        limit = self._limit(max_series)
        return cast(
            "Histogram",
            self._get_or_create(
                name,
                "histogram",
                lambda: Histogram(name, help, unit, names, limit, bounds, export, midpoint),
            ),
        )

    def timer(
        self,
        name: str,
        help: str = "",
        *,
        labels: Mapping[str, object] | None = None,
        buckets: Sequence[float] | LogLinearBuckets | str | None = None,
        cuda_sync: bool | Literal["events"] = False,
    ) -> Timer:
        """A :class:`Timer` (context manager and decorator) observing into histogram ``name``,
        which must end in ``_seconds``. ``labels`` gives label values by name."""
        if not (isinstance(name, str) and name.endswith("_seconds")):
            raise MetricNameError(
                f"timer name {name!r} must end in '_seconds': timers record seconds "
                "(for example 'app_step_seconds')"
            )
        labels = dict(labels or {})
        hist = self.histogram(name, help, unit="seconds", labels=tuple(labels), buckets=buckets)
        series = hist.labels(**labels) if labels else hist._unlabelled()
        return Timer(series, cuda_sync=cuda_sync)

    def get(self, name: str) -> Counter | Gauge | Histogram:
        """The metric called ``name`` (KeyError naming the known ones if absent)."""
        try:
            return cast("Counter | Gauge | Histogram", self._metrics[name])
        except KeyError:
            raise KeyError(f"no metric {name!r}; have {sorted(self._metrics)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def names(self) -> list[str]:
        return list(self._metrics)

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> MetricsSnapshot:
        """A frozen, plain-data view of every metric (tracked objects are read first)."""
        self._refresh_tracked()
        metrics: dict[str, MetricSnapshot] = {}
        for metric in list(self._metrics.values()):
            metrics[metric.name] = self._metric_snapshot(metric)
        return MetricsSnapshot(
            metrics=metrics, time=self._clock(), source=self._source, pid=os.getpid()
        )

    def _metric_snapshot(self, metric: _Metric, *, percentiles: bool = True) -> MetricSnapshot:
        names = metric.label_names
        series: list[SeriesSnapshot] = []
        if isinstance(metric, Histogram):
            for key, child in metric._series_items():
                counts, total, lo, hi = child._read()
                series.append(
                    _hist_series_snapshot(
                        dict(zip(names, key)),
                        counts,
                        total,
                        lo,
                        hi,
                        metric.bounds,
                        metric.midpoint,
                        percentiles=percentiles,
                    )
                )
            return MetricSnapshot(
                metric.name,
                "histogram",
                metric.help,
                metric.unit,
                names,
                tuple(series),
                metric.bounds,
                metric.export_bounds,
                metric.midpoint,
            )
        if isinstance(metric, Gauge):
            names, series = self._gauge_series(metric)
            return MetricSnapshot(
                metric.name,
                "gauge",
                metric.help,
                metric.unit,
                names,
                tuple(series),
                merge=metric.merge_mode,
            )
        for key, child in metric._series_items():
            series.append(SeriesSnapshot(labels=dict(zip(names, key)), value=child.value))
        return MetricSnapshot(
            metric.name, metric.kind, metric.help, metric.unit, names, tuple(series)
        )

    def _gauge_series(self, g: Gauge) -> tuple[tuple[str, ...], list[SeriesSnapshot]]:
        """Local values plus values merged from workers, combined by the gauge's merge mode."""
        names = g.label_names
        local = {key: (c.value, c._stamp) for key, c in g._series_items() if c._stamp}
        with self._merge_lock:
            workers = {w: dict(v) for w, v in g._workers.items()}
        if not workers:
            return names, [
                SeriesSnapshot(labels=dict(zip(names, k)), value=v) for k, (v, _) in local.items()
            ]
        if g.merge_mode == "worker":
            if "worker" in names:  # the label set already names the worker
                merged = dict(local)
                for vals in workers.values():
                    merged.update(vals)
                return names, [
                    SeriesSnapshot(labels=dict(zip(names, k)), value=v)
                    for k, (v, _) in merged.items()
                ]
            out_names = (*names, "worker")
            out = [
                SeriesSnapshot(labels={**dict(zip(names, k)), "worker": ""}, value=v)
                for k, (v, _) in local.items()
            ]
            for w in sorted(workers):
                for k, (v, _) in workers[w].items():
                    out.append(SeriesSnapshot(labels={**dict(zip(names, k)), "worker": w}, value=v))
            return out_names, out
        groups: dict[tuple[str, ...], list[tuple[float, int]]] = {}
        for k, vs in local.items():
            groups.setdefault(k, []).append(vs)
        for vals in workers.values():
            for k, vs in vals.items():
                groups.setdefault(k, []).append(vs)
        out = []
        for k, items in groups.items():
            values = [v for v, _ in items]
            if g.merge_mode == "sum":
                value = math.fsum(values)
            elif g.merge_mode == "max":
                value = max(values)
            elif g.merge_mode == "min":
                value = min(values)
            else:  # last
                value = max(items, key=lambda it: it[1])[0]
            out.append(SeriesSnapshot(labels=dict(zip(names, k)), value=value))
        return names, out

    # -- cross-process: deltas out, merges in -----------------------------------------------

    def collect_delta(self) -> MetricsSnapshot:
        """What changed since the previous call, as plain picklable data to ship to a parent.

        Counters and histograms carry increments; gauges carry their current value when it was set
        since the last ship; histogram min/max are lifetime values (merging them is idempotent).
        """
        self._refresh_tracked()
        with self._delta_lock:
            shipped = self._shipped
            metrics: dict[str, MetricSnapshot] = {}
            for metric in list(self._metrics.values()):
                names = metric.label_names
                series: list[SeriesSnapshot] = []
                for key, child in metric._series_items():
                    skey = (metric.name, key)
                    labels = dict(zip(names, key))
                    if isinstance(child, _HistogramSeries):
                        counts, total, lo, hi = child._read()
                        prev = shipped.get(skey)
                        if prev is None:
                            pairs = [(i, c) for i, c in enumerate(counts) if c]
                            dsum = total
                        else:
                            if prev[0] == counts:
                                continue
                            pairs = [
                                (i, c - p)
                                for i, c, p in zip(itertools.count(), counts, prev[0])
                                if c != p
                            ]
                            dsum = total - prev[1]
                        shipped[skey] = (counts, total)
                        series.append(
                            SeriesSnapshot(
                                labels=labels,
                                count=sum(c for _, c in pairs),
                                sum=dsum,
                                min=lo,
                                max=hi,
                                bucket_deltas=tuple(pairs),
                            )
                        )
                    elif isinstance(child, _CounterSeries):
                        value = child.value
                        prev = shipped.get(skey, 0)
                        if value == prev:
                            continue
                        # a tracked source that restarted reports a smaller total: ship it whole
                        delta = value - prev if value >= prev else value
                        shipped[skey] = value
                        series.append(SeriesSnapshot(labels=labels, value=delta))
                    else:
                        stamp = child._stamp
                        if not stamp or shipped.get(skey) == stamp:
                            continue
                        shipped[skey] = stamp
                        series.append(SeriesSnapshot(labels=labels, value=child.value))
                if series:
                    metrics[metric.name] = MetricSnapshot(
                        metric.name,
                        metric.kind,
                        metric.help,
                        metric.unit,
                        names,
                        tuple(series),
                        getattr(metric, "bounds", ()),
                        getattr(metric, "export_bounds", None),
                        getattr(metric, "midpoint", False),
                        getattr(metric, "merge_mode", "worker"),
                    )
            self._seq += 1
            return MetricsSnapshot(
                metrics=metrics,
                time=self._clock(),
                source=self._source,
                seq=self._seq,
                delta=True,
                pid=os.getpid(),
            )

    def merge(self, delta: MetricsSnapshot, *, worker: str | None = None) -> bool:
        """Add a worker's :meth:`collect_delta` output into this recorder.

        Counters and histograms (same buckets, bucket-wise) are summed; gauges are kept per
        ``worker`` and combined by their merge mode. A delta already merged (same source and
        sequence number) is ignored and False is returned. A new source under a known ``worker``
        name is a restart: the old incarnation's gauges are dropped, its counts stay.

        ``worker`` defaults to ``"pid<N>"`` of the sending process.
        """
        if not isinstance(delta, MetricsSnapshot):
            raise ConfigError(
                f"merge() takes a MetricsSnapshot from collect_delta(), got {type(delta).__name__}"
            )
        if not delta.delta:
            raise ConfigError(
                "merge() takes collect_delta() output; a snapshot() is cumulative and merging it "
                "twice would double count. Fix: ship worker_recorder.collect_delta()."
            )
        if delta.source == self._source:
            raise ConfigError("merge(): a recorder cannot merge its own deltas")
        worker = str(worker) if worker is not None else f"pid{delta.pid}"
        # validate everything before changing anything, so a bad delta leaves no partial merge
        plan: list[tuple[_Metric, MetricSnapshot]] = []
        for m in delta.metrics.values():
            plan.append((self._metric_for(m), m))
        with self._merge_lock:
            known = self._sources.get(delta.source)
            if known is not None and delta.seq <= known[1]:
                self._duplicates += 1
                return False
            if known is not None and delta.seq != known[1] + 1:
                logger.warning(
                    "metrics delta from worker %r skipped sequence %d..%d: those counts were lost in transit",
                    worker,
                    known[1] + 1,
                    delta.seq - 1,
                )
            previous = self._worker_source.get(worker)
            if previous is not None and previous != delta.source:
                self._restarts += 1
                self._sources.pop(previous, None)
                for metric in self._metrics.values():
                    if isinstance(metric, Gauge):
                        metric._workers.pop(worker, None)
            self._worker_source[worker] = delta.source
            self._sources[delta.source] = (worker, delta.seq)
            self._merged += 1
            for metric, m in plan:
                if isinstance(metric, Histogram):
                    for s in m.series:
                        child = metric._child(tuple(s.labels[n] for n in metric.label_names))
                        child._add(s.bucket_deltas, s.sum, s.min, s.max)
                elif isinstance(metric, Counter):
                    for s in m.series:
                        metric._child(tuple(s.labels[n] for n in metric.label_names)).inc(
                            s.value or 0
                        )
                elif isinstance(metric, Gauge):
                    vals = metric._workers.setdefault(worker, {})
                    for s in m.series:
                        key = tuple(s.labels[n] for n in metric.label_names)
                        if key not in vals and len(vals) >= metric.max_series:
                            raise CardinalityError(
                                f"gauge {metric.name!r} from worker {worker!r} exceeds max_series="
                                f"{metric.max_series}; bound its label values"
                            )
                        vals[key] = (cast("float", s.value), next(_STAMPS))
        return True

    def _metric_for(self, m: MetricSnapshot) -> _Metric:
        if m.kind == "counter":
            return self.counter(m.name, m.help, labels=m.label_names)
        if m.kind == "gauge":
            return self.gauge(m.name, m.help, labels=m.label_names, unit=m.unit, merge=m.merge)
        if m.kind == "histogram":
            existing = self._metrics.get(m.name)
            if isinstance(existing, Histogram) and existing.bounds != m.buckets:
                raise ConfigError(
                    f"cannot merge histogram {m.name!r}: the worker's {len(m.buckets)} buckets "
                    f"differ from this recorder's {len(existing.bounds)}; create it with the same "
                    "buckets in both processes"
                )
            name, names = self._common(m.name, m.label_names, "histogram")
            unit = _check_unit(name, m.unit)
            bounds, export, midpoint = tuple(m.buckets), m.export_buckets, m.midpoint
            limit = self.max_series
            return cast(
                "Histogram",
                self._get_or_create(
                    name,
                    "histogram",
                    lambda: Histogram(name, m.help, unit, names, limit, bounds, export, midpoint),
                ),
            )
        raise ConfigError(f"unknown metric kind {m.kind!r} in delta")

    def forget_worker(self, worker: str) -> None:
        """Drop what a worker that is gone for good left in gauges (its counts stay)."""
        with self._merge_lock:
            for metric in self._metrics.values():
                if isinstance(metric, Gauge):
                    metric._workers.pop(worker, None)
            source = self._worker_source.pop(worker, None)
            if source is not None:
                self._sources.pop(source, None)

    # -- tracking other primitives' statistics() ----------------------------------------------

    def track(
        self,
        obj: Any,
        *,
        prefix: str = "",
        labels: Mapping[str, object] | None = None,
        names: Mapping[str, str] | None = None,
        counters: Iterable[str] = (),
        standard: bool = True,
    ) -> None:
        """Export ``obj.statistics()`` (a dataclass of numbers) at every snapshot and scrape.

        Fields with a standard meaning (``queue_depth``, ``requests_ok``, ``cache_hits``...; see
        docs/metrics.md) go to the standard metrics when ``standard``; other numeric fields become
        gauges called ``<prefix>_<field>``, or counters when they end in ``_total`` or are listed in
        ``counters``. ``names`` maps a field to a metric name explicitly; ``labels`` are constant
        labels added to every series (to tell two batchers apart). Dict fields of numbers become
        one series per key (label ``key``, ``worker`` for ``worker_busy_ratio``).
        """
        stats_fn = getattr(obj, "statistics", None)
        if not callable(stats_fn):
            raise ConfigError(
                f"track() needs an object with a statistics() method, got {type(obj).__name__}"
            )
        stats = stats_fn()
        if not is_dataclass(stats) or isinstance(stats, type):
            raise ConfigError(
                f"{type(obj).__name__}.statistics() must return a dataclass instance, "
                f"got {type(stats).__name__}"
            )
        if prefix:
            _validate_name(prefix, "prefix")
        try:
            ref: Callable[[], Any] = weakref.ref(obj)
        except TypeError:
            ref = lambda: obj  # noqa: E731
        t = _Tracked(
            ref=ref,
            prefix=prefix,
            labels={str(k): str(v) for k, v in (labels or {}).items()},
            names=dict(names or {}),
            counters=frozenset(counters),
            standard=standard,
        )
        _validate_labels(prefix or "track", tuple(t.labels), kind="gauge")
        plan = self._track_plan(t, stats)
        mine = {(n, k) for n, _, k, _ in plan}
        for other in self._tracked:
            o = other.ref()
            if o is None:
                continue
            clash = mine & {(n, k) for n, _, k, _ in self._track_plan(other, o.statistics())}
            if clash:
                name, key = sorted(clash)[0]
                raise ConfigError(
                    f"track(): {type(obj).__name__} and {type(o).__name__} would both write "
                    f"{name}{dict(key)}; pass labels={{...}} (e.g. {{'model': 'a'}}) to tell them apart"
                )
        for mname, kind, key, _ in plan:  # create (and validate) every metric now
            self._tracked_metric(mname, kind, tuple(k for k, _ in key))
        with self._lock:
            self._tracked.append(t)

    def untrack(self, obj: Any) -> None:
        with self._lock:
            self._tracked = [t for t in self._tracked if t.ref() is not obj]

    def _track_plan(
        self, t: _Tracked, stats: Any
    ) -> list[tuple[str, Kind, tuple[tuple[str, str], ...], float]]:
        plan: list[tuple[str, Kind, tuple[tuple[str, str], ...], float]] = []
        for f in fields(stats):
            value = getattr(stats, f.name)
            items: list[tuple[dict[str, str], float]]
            if isinstance(value, bool | int | float):
                items = [({}, float(value))]
            elif isinstance(value, Mapping):
                label = _dict_label(f.name)
                items = [
                    ({label: str(k)}, float(v))
                    for k, v in value.items()
                    if isinstance(v, bool | int | float)
                ]
            else:
                continue
            if f.name in t.names:
                mname = t.names[f.name]
                kind: Kind = (
                    "counter" if (mname.endswith("_total") or f.name in t.counters) else "gauge"
                )
                extra: dict[str, str] = {}
            elif t.standard and f.name in _STANDARD_FIELDS:
                mname, kind, extra = _STANDARD_FIELDS[f.name]
            else:
                field = f.name
                for suffix, factor in _SUBUNIT_SUFFIXES.items():  # record base units: seconds
                    if field.endswith(suffix):
                        field = field[: -len(suffix)] + "_seconds"
                        items = [(lab, v * factor) for lab, v in items]
                        break
                base = f"{t.prefix.rstrip('_')}_{field}" if t.prefix else field
                kind = "counter" if (f.name.endswith("_total") or f.name in t.counters) else "gauge"
                mname, extra = base, {}
                std = STANDARD_METRICS.get(mname)
                if std is not None and std.kind != kind:
                    continue  # e.g. compile_seconds: the standard histogram is fed by callbacks
            for lab, v in items:
                key = tuple(sorted({**t.labels, **extra, **lab}.items()))
                plan.append((mname, kind, key, v))
        return plan

    def _tracked_metric(self, name: str, kind: Kind, label_names: tuple[str, ...]) -> _Metric:
        existing = self._metrics.get(name)
        if (
            existing is not None
            and existing.kind == kind
            and set(existing.label_names) == set(label_names)
        ):
            return existing  # same labels in another order, or another merge mode: reuse it
        spec = STANDARD_METRICS.get(name)
        if spec is not None and set(spec.labels) <= set(label_names):
            extra = tuple(n for n in label_names if n not in spec.labels)
            label_names = (*spec.labels, *extra)
        if kind == "counter":
            return self.counter(name, spec.help if spec else "", labels=label_names)
        merge = spec.merge if spec is not None else "worker"
        return self.gauge(name, spec.help if spec else "", labels=label_names, merge=merge)

    def _refresh_tracked(self) -> None:
        if not self._tracked:
            return
        with self._lock:
            tracked = list(self._tracked)
        alive = []
        for t in tracked:
            obj = t.ref()
            if obj is None:
                continue
            alive.append(t)
            try:
                plan = self._track_plan(t, obj.statistics())
                for mname, kind, key, value in plan:
                    metric = self._tracked_metric(mname, kind, tuple(k for k, _ in key))
                    values = dict(key)
                    child = metric._child(tuple(values[n] for n in metric.label_names))
                    if kind == "counter":
                        child._set_total(value)
                    else:
                        child.set(value)
                t.failed = False
            except Exception:
                self._track_errors += 1
                if not t.failed:
                    logger.exception(
                        "reading statistics() of tracked %s failed; its metrics keep their last values",
                        type(obj).__name__,
                    )
                t.failed = True
        if len(alive) != len(tracked):
            with self._lock:
                self._tracked = [t for t in self._tracked if t.ref() is not None]

    # -- Prometheus ---------------------------------------------------------------------------

    def collector(self) -> Any:
        """A prometheus_client collector for this recorder (register it on any registry)."""
        return _PrometheusCollector(self)

    def register(self, registry: Any = None) -> Any:
        """Register :meth:`collector` on ``registry`` (prometheus_client's global one by default)."""
        prom = require("prometheus_client", purpose="Prometheus export")
        collector = self.collector()
        (registry if registry is not None else prom.REGISTRY).register(collector)
        return collector

    def exposition(self, *, openmetrics: bool = False) -> str:
        """This recorder's metrics in the Prometheus text format (rendered by prometheus_client)."""
        prom = require("prometheus_client", purpose="Prometheus export")
        registry = prom.CollectorRegistry(auto_describe=False)
        registry.register(self.collector())
        if openmetrics:
            from prometheus_client.openmetrics.exposition import generate_latest as om_latest

            return cast("bytes", om_latest(registry)).decode()
        return cast("bytes", prom.generate_latest(registry)).decode()

    # -- misc -----------------------------------------------------------------------------------

    def statistics(self) -> RecorderStatistics:
        with self._merge_lock:
            return RecorderStatistics(
                metrics=len(self._metrics),
                series=sum(len(m._children) for m in self._metrics.values()),
                tracked=len(self._tracked),
                deltas_shipped=self._seq,
                deltas_merged=self._merged,
                duplicate_deltas_ignored=self._duplicates,
                workers=len(self._worker_source),
                worker_restarts=self._restarts,
                track_errors=self._track_errors,
            )

    def __repr__(self) -> str:
        return f"<MetricsRecorder {len(self._metrics)} metrics>"


def _describe(m: _Metric) -> str:
    extra = ""
    if isinstance(m, Histogram):
        extra = f", {len(m.bounds)} buckets"
    if isinstance(m, Gauge):
        extra = f", merge={m.merge_mode!r}"
    return f"{m.kind}(unit={m.unit!r}, labels={list(m.label_names)}{extra})"


def _check_unit(name: str, unit: str) -> str:
    if not isinstance(unit, str) or (unit and not _UNIT.match(unit)):
        raise MetricNameError(f"metric {name!r}: unit must be a lowercase word, got {unit!r}")
    suffix = name.rsplit("_", 1)[-1].lower() if "_" in name else ""
    for bad in (unit, suffix):
        if bad in _NON_BASE_UNITS:
            base = _NON_BASE_UNITS[bad]
            raise MetricNameError(
                f"metric {name!r} uses unit {bad!r}: record base units ({base}) as Prometheus does. "
                f"Fix: name it '..._{base}' and observe {base} (e.g. 0.012 for 12 ms)"
            )
    if unit and not name.endswith("_" + unit):
        raise MetricNameError(
            f"metric {name!r} has unit {unit!r} but its name does not end in '_{unit}'; "
            f"rename it to '{name}_{unit}' (Prometheus convention)"
        )
    return unit


# --------------------------------------------------------------------------------------------
# prometheus_client bridge (imported lazily)
# --------------------------------------------------------------------------------------------


class _PrometheusCollector:
    """A prometheus_client custom collector: every scrape reads a fresh snapshot."""

    def __init__(self, recorder: MetricsRecorder) -> None:
        require("prometheus_client", purpose="Prometheus export")
        self._recorder = recorder

    def describe(self) -> list[Any]:
        return []  # metrics are created at run time; skip the registry's up-front name check

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        rec = self._recorder
        rec._refresh_tracked()
        for metric in list(rec._metrics.values()):
            snap = rec._metric_snapshot(metric, percentiles=False)
            names = list(snap.label_names)
            unit = snap.unit if snap.unit and snap.name.endswith("_" + snap.unit) else ""
            fam: Any
            if snap.kind == "counter":
                fam = CounterMetricFamily(snap.name, snap.help, labels=names)
                for s in snap.series:
                    fam.add_metric([s.labels[n] for n in names], s.value)
            elif snap.kind == "gauge":
                fam = GaugeMetricFamily(snap.name, snap.help, labels=names, unit=unit)
                for s in snap.series:
                    fam.add_metric([s.labels[n] for n in names], s.value)
            else:
                fam = HistogramMetricFamily(snap.name, snap.help, labels=names, unit=unit)
                export = snap.export_buckets
                idx = (
                    range(len(snap.buckets))
                    if export is None
                    else [bisect_left(snap.buckets, b) for b in export]
                )
                for s in snap.series:
                    cum = list(itertools.accumulate(s.bucket_counts))
                    buckets = [(floatToGoString(snap.buckets[i]), cum[i]) for i in idx]
                    buckets.append(("+Inf", cum[-1]))
                    fam.add_metric([s.labels[n] for n in names], buckets, s.sum)
            yield fam


# --------------------------------------------------------------------------------------------
# Standard metric names (the shared contract; docs/metrics.md has the table)
# --------------------------------------------------------------------------------------------

REQUEST_LATENCY = "fastinfer_request_latency_seconds"
QUEUE_WAIT = "fastinfer_queue_wait_seconds"
BATCH_SIZE = "fastinfer_batch_size"
BATCH_EXECUTION = "fastinfer_batch_execution_seconds"
QUEUE_DEPTH = "fastinfer_queue_depth"
BATCHES_IN_FLIGHT = "fastinfer_batches_in_flight"
REQUESTS = "fastinfer_requests_total"
COMPILE_SECONDS = "fastinfer_compile_seconds"
COMPILE_CACHE = "fastinfer_compile_cache_total"
LOAD_SECONDS = "fastinfer_load_seconds"
WORKERS_ALIVE = "fastinfer_workers_alive"
WORKER_RESTARTS = "fastinfer_worker_restarts_total"
WORKER_BUSY_RATIO = "fastinfer_worker_busy_ratio"

#: outcome label values of fastinfer_requests_total / result values of fastinfer_compile_cache_total
OUTCOMES = ("ok", "failed", "rejected", "expired", "cancelled")
CACHE_RESULTS = ("hit", "miss", "bypass")


@dataclass(frozen=True)
class _Spec:
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    unit: str = ""
    merge: GaugeMode = "worker"


STANDARD_METRICS: Mapping[str, _Spec] = {
    REQUEST_LATENCY: _Spec("histogram", "Time from request arrival to response, seconds.", unit="seconds"),
    QUEUE_WAIT: _Spec("histogram", "Time a request waited before its batch started, seconds.", unit="seconds"),
    BATCH_SIZE: _Spec("histogram", "Requests per executed batch."),
    BATCH_EXECUTION: _Spec("histogram", "Time to run one batch through the model, seconds.", unit="seconds"),
    QUEUE_DEPTH: _Spec("gauge", "Requests waiting in the batcher queue.", merge="sum"),
    BATCHES_IN_FLIGHT: _Spec("gauge", "Batches currently executing.", merge="sum"),
    REQUESTS: _Spec("counter", "Requests finished, by outcome (ok|failed|rejected|expired|cancelled).", ("outcome",)),
    COMPILE_SECONDS: _Spec("histogram", "Time to compile (and warm up) a model, seconds.", unit="seconds"),
    COMPILE_CACHE: _Spec("counter", "Compile cache lookups, by result (hit|miss|bypass).", ("result",)),
    LOAD_SECONDS: _Spec("histogram", "Time to load a model's weights, seconds.", unit="seconds"),
    WORKERS_ALIVE: _Spec("gauge", "Worker processes alive.", merge="sum"),
    WORKER_RESTARTS: _Spec("counter", "Worker processes restarted after a crash or timeout."),
    WORKER_BUSY_RATIO: _Spec("gauge", "Share of time each worker spent running calls (0..1).", ("worker",)),
}  # fmt: skip

_COMPILE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class StandardMetrics:
    """The standard instruments on one recorder (from :func:`standard_metrics`)."""

    request_latency: Histogram
    queue_wait: Histogram
    batch_size: Histogram
    batch_execution: Histogram
    queue_depth: Gauge
    batches_in_flight: Gauge
    requests: Counter
    compile_seconds: Histogram
    compile_cache: Counter
    load_seconds: Histogram
    workers_alive: Gauge
    worker_restarts: Counter
    worker_busy_ratio: Gauge

    def observe_request(
        self, *, latency: float | None = None, queue_wait: float | None = None, outcome: str = "ok"
    ) -> None:
        """Record one finished request (a ready-made ``on_request=`` body)."""
        if outcome not in OUTCOMES:
            raise ConfigError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self.requests.labels(outcome).inc()
        if latency is not None:
            self.request_latency.observe(latency)
        if queue_wait is not None:
            self.queue_wait.observe(queue_wait)

    def observe_batch(self, *, size: int, seconds: float | None = None) -> None:
        """Record one executed batch (a ready-made ``on_batch=`` body)."""
        self.batch_size.observe(size)
        if seconds is not None:
            self.batch_execution.observe(seconds)

    def batcher_hooks(self) -> BatcherHooks:
        """``on_batch``/``on_request`` callbacks for a ``fastinfer.DynamicBatcher`` that record the
        standard distributions: batch size, batch execution time, queue wait (per item) and the
        latency of successful requests. Pass them as ``DynamicBatcher(fn, ..., **hooks)``; counts
        and gauges (requests by outcome, queue depth) come from ``rec.track(batcher)``.
        The records are read by attribute, so this module does not import the batcher."""

        def on_batch(rec: Any) -> None:
            self.observe_batch(size=rec.size, seconds=rec.execution_seconds)
            for wait in rec.queue_wait_seconds:
                self.queue_wait.observe(wait)

        def on_request(rec: Any) -> None:
            if rec.outcome == "ok":
                self.request_latency.observe(rec.latency_seconds)

        return BatcherHooks(on_batch=on_batch, on_request=on_request)


class BatcherHooks(TypedDict):
    """Keyword arguments for ``DynamicBatcher(..., **standard_metrics(rec).batcher_hooks())``."""

    on_batch: Callable[[Any], None]
    on_request: Callable[[Any], None]


def standard_metrics(
    rec: MetricsRecorder, *, latency_buckets: Sequence[float] | LogLinearBuckets | str | None = None
) -> StandardMetrics:
    """Create (or get) every standard metric on ``rec``; idempotent.

    ``latency_buckets`` applies to request latency, queue wait and batch execution
    (default :data:`DEFAULT_LATENCY_BUCKETS`).
    """
    made: dict[str, Any] = {}
    for name, spec in STANDARD_METRICS.items():
        if spec.kind == "counter":
            made[name] = rec.counter(name, spec.help, labels=spec.labels)
        elif spec.kind == "gauge":
            made[name] = rec.gauge(name, spec.help, labels=spec.labels, merge=spec.merge)
        else:
            buckets: Any = None
            if name in (REQUEST_LATENCY, QUEUE_WAIT, BATCH_EXECUTION):
                buckets = latency_buckets
            elif name in (COMPILE_SECONDS, LOAD_SECONDS):
                buckets = _COMPILE_BUCKETS
            made[name] = rec.histogram(
                name, spec.help, unit=spec.unit, labels=spec.labels, buckets=buckets
            )
    return StandardMetrics(
        request_latency=made[REQUEST_LATENCY],
        queue_wait=made[QUEUE_WAIT],
        batch_size=made[BATCH_SIZE],
        batch_execution=made[BATCH_EXECUTION],
        queue_depth=made[QUEUE_DEPTH],
        batches_in_flight=made[BATCHES_IN_FLIGHT],
        requests=made[REQUESTS],
        compile_seconds=made[COMPILE_SECONDS],
        compile_cache=made[COMPILE_CACHE],
        load_seconds=made[LOAD_SECONDS],
        workers_alive=made[WORKERS_ALIVE],
        worker_restarts=made[WORKER_RESTARTS],
        worker_busy_ratio=made[WORKER_BUSY_RATIO],
    )

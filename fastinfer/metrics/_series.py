"""Series (one label set) and metric families: the hot path of every observation.

A histogram observation is one ``bisect`` on a precomputed tuple of bucket bounds (C code) and a few
additions into the calling thread's own shard of the series: no lock, so no contention between
threads and no lost counts (each shard has one writer). Readers add the shards up; a finished
thread's shard is folded into the series. Counters and gauges use a per-series lock.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from fastinfer.errors import CardinalityError, ConfigError
from fastinfer.metrics._names import GaugeMode, Kind

if TYPE_CHECKING:
    from fastinfer.metrics._timer import Timer

__all__ = ["STAMPS", "Counter", "Gauge", "Histogram", "Metric", "bad_label_value", "finite"]

_INF = float("inf")
_MAX = sys.float_info.max  # ints compare with floats exactly: 10**400 > _MAX
_MIN = -_MAX
_MAX_INT = int(_MAX)  # the same bound for ints: int-to-int comparisons are the cheaper ones
_MIN_INT = -_MAX_INT


def _shown(value: object) -> str:
    """``value`` for an error message: short, and never raising (the repr of an int past 4300
    digits raises ValueError, and the value may be anything)."""
    if isinstance(value, int) and not -(10**18) < value < 10**18:
        exp = math.floor(math.log10(abs(value)))
        return f"{'-' if value < 0 else ''}~1e{exp} (a {exp + 1}-digit int)"
    try:
        shown = repr(value)
    except Exception:
        return f"<a {type(value).__name__}>"
    return shown if len(shown) <= 80 else f"{shown[:77]}..."


def _bad_value(metric: str, value: object) -> ConfigError:
    return ConfigError(
        f"metric {metric!r} got {_shown(value)} ({type(value).__name__}); record a finite real "
        "Python number within the float range (+-1.8e308; use tensor.item() for a tensor), not "
        "NaN or an infinity: either would make a histogram's sum, a counter or a merged gauge "
        "meaningless for good, and a value past the float range cannot be exported"
    )


def _real(value: object) -> bool:
    # numbers.Real, plus Decimal (a Number that is not Complex; not imported: import cost)
    return isinstance(value, numbers.Real) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Complex)
    )


def finite(metric: str, value: object) -> float:
    """``value`` as a finite number, or ConfigError (None, strings, tensors, NaN, ±inf, and numbers
    past the float range, such as ``10**400``, which could never be exported).

    Python ints and floats pass as they are; other real numbers (numpy scalars, bools,
    fractions, decimals) are converted to float.
    """
    cls = value.__class__
    if cls is int:
        if _MIN_INT <= value <= _MAX_INT:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        raise _bad_value(metric, value)
    if cls is not float:
        if not _real(value):
            raise _bad_value(metric, value)
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, ArithmeticError):  # ArithmeticError: OverflowError
            raise _bad_value(metric, value) from None
    if value - value:  # type: ignore[operator]  # NaN or ±inf (x - x is NaN for both)
        raise _bad_value(metric, value)
    return value  # type: ignore[return-value]


def bad_label_value(metric: str, label: str, value: object) -> str | None:
    """Why ``value`` cannot be a label value of ``metric`` (None when it can).

    Prometheus text is UTF-8: a ``str`` with a lone surrogate (what ``os.fsdecode`` gives for a
    file name that is not UTF-8) cannot be encoded, and would fail every later scrape.
    """
    if type(value) is not str:
        return f"label {label!r} of metric {metric!r} must be a str, got {type(value).__name__}"
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"label {label!r} of metric {metric!r} got {value!r}, which is not valid Unicode text "
            f"(a lone surrogate {value[e.start]!r} at position {e.start}, as os.fsdecode() gives "
            "for a file name that is not UTF-8) and cannot be exported. Fix: pass a readable "
            "form, e.g. os.fsencode(name).decode('utf-8', 'replace')"
        )
    return None


class _CounterSeries:
    __slots__ = ("_lock", "_metric", "_value", "labels")

    def __init__(self, metric: str, labels: tuple[str, ...]) -> None:
        self._metric = metric
        self.labels = labels
        self._lock = threading.Lock()
        self._value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (a finite number >= 0) to the counter."""
        cls = amount.__class__
        if cls is int:
            ok = 0 <= amount <= _MAX_INT
        elif cls is float:
            ok = 0.0 <= amount <= _MAX  # False for NaN and ±inf
        else:
            try:
                amount = finite(self._metric, amount)
                ok = amount >= 0
            except ConfigError:
                ok = False
        if not ok:
            raise self._refused(amount, "")
        lock = self._lock
        lock.acquire()
        try:
            total = self._value + amount
            if total <= _MAX:  # 1e308 + 1e308 is inf; ints compare exactly
                self._value = total
        finally:
            lock.release()
        if not total <= _MAX:
            raise self._refused(
                amount,
                f" (it is at {_shown(self._value)}: the total would pass the float range, "
                "+-1.8e308, and could not be exported; a counter this large is most likely fed "
                "a wrong value)",
            )

    def _refused(self, amount: object, why: str) -> ConfigError:
        return ConfigError(
            f"counter {self._metric!r} can only go up, by a finite number: inc({_shown(amount)}) "
            f"refused{why}; the counter keeps its value. Fix: pass a finite number >= 0 within "
            "the float range (+-1.8e308), and use a gauge for values that go down"
        )

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
        """Set the gauge to ``value`` (a finite number)."""
        self._value = finite(self._metric, value)
        self._stamp = next(STAMPS)

    def inc(self, amount: float = 1) -> None:
        amount = finite(self._metric, amount)
        lock = self._lock
        lock.acquire()
        try:
            value = self._value + amount
            ok = _MIN <= value <= _MAX  # 1e308 + 1e308 is inf; ints compare exactly
            if ok:
                self._value = value
                self._stamp = next(STAMPS)
        finally:
            lock.release()
        if not ok:
            raise ConfigError(
                f"gauge {self._metric!r} is at {_shown(self._value)}: inc({_shown(amount)}) would "
                "take it past the float range (+-1.8e308), refused; the gauge keeps its value. "
                "Fix: set() the value the gauge should have"
            )

    def dec(self, amount: float = 1) -> None:
        self.inc(-finite(self._metric, amount))

    @property
    def value(self) -> float:
        return self._value


STAMPS = itertools.count(1)  # next() on itertools.count is atomic under the GIL


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
        "_retired",
        "_shards",
        "labels",
    )

    def __init__(self, metric: str, labels: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        self._metric = metric
        self.labels = labels
        self._bounds = bounds
        self._base = _Shard(len(bounds) + 1)  # last slot: +Inf; merges and retired shards
        self._shards: list[_Shard] = []
        self._retired: list[_Shard] = []  # shards of ended threads, folded under the lock
        self._local = threading.local()
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Record one observation (seconds for latencies): a finite number."""
        cls = value.__class__
        if cls is float:
            if value - value:  # NaN or ±inf would poison the sum for good
                raise _bad_value(self._metric, value)
        elif cls is not int or not _MIN_INT <= value <= _MAX_INT:  # 10**400 cannot join the sum
            value = finite(self._metric, value)
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        i = bisect_left(self._bounds, value)
        try:
            shard = self._local.shard
        except AttributeError:
            shard = self._new_shard()
        total = shard.sum + value
        if total - total:  # the sum would overflow to ±inf: refused before anything is counted
            raise ConfigError(
                f"histogram {self._metric!r}: observe({_shown(value)}) would take its sum past "
                "the float range (+-1.8e308), refused; nothing was recorded. Fix: record values "
                "in the metric's base unit, which keeps them far from 1e308"
            )
        shard.counts[i] += 1
        shard.sum = total
        if value < shard.min:
            shard.min = value
        if value > shard.max:
            shard.max = value

    def _new_shard(self) -> _Shard:
        shard = _Shard(len(self._bounds) + 1)
        token = _ThreadToken()
        with self._lock:
            self._fold_retired()
            self._shards.append(shard)
        # a weak reference: a series dropped while the thread lives on must not be kept alive
        weakref.finalize(token, _retire_shard, weakref.ref(self), shard)
        self._local.token = token  # dropped when the thread ends
        self._local.shard = shard
        return shard

    def _retire(self, shard: _Shard) -> None:
        # Run by a finalizer, which the garbage collector can run inside any allocation, this
        # series' locked sections included: no lock here (waiting on one deadlocked), only an
        # atomic append; the shard stays counted where it is until the next locked section.
        self._retired.append(shard)

    def _fold_retired(self) -> None:
        """Fold the retired shards into the base (the lock is held)."""
        while self._retired:
            shard = self._retired.pop()
            if shard in self._shards:
                self._shards.remove(shard)
                self._base.fold(shard)

    def time(self, *, cuda_sync: bool | Literal["events"] = False) -> Timer:
        """A :class:`Timer` observing into this series."""
        from fastinfer.metrics._timer import Timer

        return Timer(self, cuda_sync=cuda_sync)

    def _read(self) -> tuple[list[int], float, float, float]:
        with self._lock:
            self._fold_retired()
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
            self._fold_retired()
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


class Metric:
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
                self._check_key(key)
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

    def _check_key(self, key: tuple[str, ...]) -> None:
        """Every label value must be exportable (checked once, when a label set is first seen)."""
        for label, value in zip(self.label_names, key):
            why = bad_label_value(self.name, label, value)
            if why is not None:
                raise ConfigError(why)

    def _child_merged(self, key: tuple[str, ...]) -> Any:
        """The series for ``key``, created without the max_series check: a merge validated the
        whole delta against the limit before applying any of it, so applying cannot fail."""
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
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


class Counter(Metric):
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


class Gauge(Metric):
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


class Histogram(Metric):
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
        from fastinfer.metrics._timer import Timer

        return Timer(self._unlabelled(), cuda_sync=cuda_sync)

    def _spec(self) -> tuple[Any, ...]:
        return (*super()._spec(), self.bounds)

"""Cross-process metrics: workers ship deltas, the parent merges them (private part of the recorder).

Worker processes ship *deltas* (:meth:`collect_delta`): plain, picklable data holding only what
changed since the last ship. The parent adds them (:meth:`merge`), so a worker that dies loses only
what it never shipped and leaves no file behind; duplicates are ignored by (source, sequence).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import threading
import uuid
import weakref
from collections.abc import Mapping
from typing import Any, cast

from fastinfer.errors import CardinalityError, ConfigError, MetricNameError
from fastinfer.metrics._names import GAUGE_MODES, check_unit
from fastinfer.metrics._registry import MetricRegistry, describe
from fastinfer.metrics._series import (
    STAMPS,
    Counter,
    Gauge,
    Histogram,
    Metric,
    _CounterSeries,
    _HistogramSeries,
    finite,
)
from fastinfer.metrics._snapshot import MetricSnapshot, MetricsSnapshot, SeriesSnapshot

__all__ = ["Merging", "watch_forks"]

logger = logging.getLogger("fastinfer.metrics")

_MAX = sys.float_info.max

# Recorders that get a new delta identity in a forked child. The at-fork hook is registered when
# the first recorder is created, never at import (``import fastinfer`` changes no global state).
_recorders: weakref.WeakSet[Merging] = weakref.WeakSet()
_hook_lock = threading.Lock()
_hook_registered = False


def watch_forks(rec: Merging) -> None:
    """Give ``rec`` its own delta source in every child forked from this process."""
    global _hook_registered
    with _hook_lock:
        if not _hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _hook_registered = True
        _recorders.add(rec)


def _after_fork_in_child() -> None:
    global _hook_lock
    _hook_lock = threading.Lock()  # another parent thread may have held it at the fork
    for rec in list(_recorders):
        try:
            rec._forked()
        except Exception:  # never fail a fork; this recorder's deltas may then be dropped
            logger.exception(
                "a MetricsRecorder could not take a new delta source after fork(); the parent "
                "may ignore this child's deltas as already merged"
            )


class Merging(MetricRegistry):
    """collect_delta() in a worker, merge() in the parent."""

    _source: str
    _seq: int
    _shipped: dict[tuple[str, tuple[str, ...]], Any]
    _delta_lock: threading.Lock
    _sources: dict[str, tuple[str, int]]
    _worker_source: dict[str, str]
    _merged: int
    _duplicates: int
    _restarts: int
    _refused: int

    def collect_delta(self) -> MetricsSnapshot:
        """What changed since the previous call, as plain picklable data to ship to a parent.

        Counters and histograms carry increments; gauges carry their current value when it was set
        since the last ship; histogram min/max are lifetime values (merging them is idempotent).

        A recorder inherited through ``fork()`` (a module-level recorder under gunicorn's prefork
        or multiprocessing's fork start method) ships as a new source in each child, starting from
        what the child records after the fork: what the parent had recorded is the parent's.
        """
        self._refresh_tracked()
        with self._delta_lock:
            metrics = self._changes()
            self._seq += 1
            return MetricsSnapshot(
                metrics=metrics,
                time=self._clock(),
                source=self._source,
                seq=self._seq,
                delta=True,
                pid=os.getpid(),
            )

    def _changes(self) -> dict[str, MetricSnapshot]:
        """What changed since the last ship, marked as shipped (the caller holds _delta_lock)."""
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
        return metrics

    def _forked(self) -> None:
        """In a forked child (run by the at-fork hook): a new source identity, and everything
        recorded so far counts as shipped, so the child's first delta holds only its own counts.

        The child is single-threaded here, but a lock that another parent thread held at the fork
        (a shipper mid-``collect_delta``, a scrape) stays held forever in the child: every lock is
        replaced first, or this hook (and the child's next observation) would hang.
        """
        self._lock = threading.RLock()
        self._merge_lock = threading.Lock()
        self._delta_lock = threading.Lock()
        for metric in self._metrics.values():
            metric._lock = threading.Lock()
            for child in metric._children.values():
                child._lock = threading.Lock()
        self._source = uuid.uuid4().hex
        self._seq = 0
        self._changes()  # the baseline: the parent's values, merged ones included, are not ours

    def merge(self, delta: MetricsSnapshot, *, worker: str | None = None) -> bool:
        """Add a worker's :meth:`collect_delta` output into this recorder, all or nothing.

        Counters and histograms (same buckets, bucket-wise) are summed; gauges are kept per
        ``worker`` and combined by their merge mode. A delta already merged (same source and
        sequence number) is ignored and False is returned. A new source under a known ``worker``
        name is a restart: the old incarnation's gauges are dropped, its counts stay.

        The whole delta is checked before any of it is applied: a delta that would take a metric
        past its ``max_series`` (``CardinalityError``) or that holds a malformed series
        (``ConfigError``) is refused whole, counted in ``statistics().deltas_refused``, and not
        recorded as merged, so the same delta can be merged once the cause is fixed (for
        example a raised limit).

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
        with self._merge_lock, self._lock:  # the same lock order as everywhere: merge, registry
            known = self._sources.get(delta.source)
            if known is not None and delta.seq <= known[1]:
                self._duplicates += 1
                return False
            previous = self._worker_source.get(worker)
            restart = previous is not None and previous != delta.source
            try:
                plan = self._merge_plan(delta, worker, restart)
            except Exception:
                self._refused += 1
                raise
            # Validated whole: nothing below can fail, so the delta is merged entirely or not at all.
            if known is not None and delta.seq != known[1] + 1:
                logger.warning(
                    "metrics delta from worker %r skipped sequence %d..%d: those counts were lost in transit",
                    worker,
                    known[1] + 1,
                    delta.seq - 1,
                )
            if restart:
                assert previous is not None
                self._restarts += 1
                self._sources.pop(previous, None)
                for metric in self._metrics.values():
                    if isinstance(metric, Gauge):
                        metric._workers.pop(worker, None)
            self._worker_source[worker] = delta.source
            self._sources[delta.source] = (worker, delta.seq)
            self._merged += 1
            for metric, m, keys in plan:
                if metric.name not in self._metrics:  # checked by _merge_plan, under self._lock
                    self._reserve(metric)
                    self._metrics[metric.name] = metric
                if isinstance(metric, Histogram):
                    for s, key in zip(m.series, keys):
                        metric._child_merged(key)._add(s.bucket_deltas, s.sum, s.min, s.max)
                elif isinstance(metric, Counter):
                    for s, key in zip(m.series, keys):
                        metric._child_merged(key).inc(s.value)
                elif isinstance(metric, Gauge):
                    vals = metric._workers.setdefault(worker, {})
                    for s, key in zip(m.series, keys):
                        vals[key] = (float(cast("float", s.value)), next(STAMPS))
        return True

    def _merge_plan(
        self, delta: MetricsSnapshot, worker: str, restart: bool
    ) -> list[tuple[Metric, MetricSnapshot, list[tuple[str, ...]]]]:
        """Check every metric and series of ``delta`` against this recorder; change nothing."""
        plan: list[tuple[Metric, MetricSnapshot, list[tuple[str, ...]]]] = []
        new_samples: dict[str, str] = {}  # sample names of metrics this delta would create
        for m in delta.metrics.values():
            if not isinstance(m, MetricSnapshot):
                raise ConfigError(f"delta holds {type(m).__name__}, not a MetricSnapshot")
            metric = self._merge_target(m)
            if metric.name not in self._metrics:
                for sample in self._samples(metric):
                    owner = new_samples.setdefault(sample, metric.name)
                    if owner != metric.name:
                        raise MetricNameError(
                            f"cannot merge: the delta's metrics {owner!r} and {metric.name!r} "
                            f"both expose {sample!r}"
                        )
            keys = [self._merge_key(metric, s) for s in m.series]
            have: Any = metric._children
            if isinstance(metric, Gauge):
                have = {} if restart else metric._workers.get(worker, {})
            if isinstance(metric, Counter):
                self._check_totals(metric, m, keys, worker, delta.seq)
            new = {k for k in keys if k not in have}
            if new and len(have) + len(new) > metric.max_series:
                raise CardinalityError(
                    f"cannot merge the delta from worker {worker!r} (seq {delta.seq}): metric "
                    f"{metric.name!r} would have {len(have) + len(new)} label sets"
                    f"{' from this worker' if isinstance(metric, Gauge) else ''}, over its "
                    f"max_series={metric.max_series} ({len(new)} new in this delta). Nothing of the "
                    "delta was merged (its other metrics included); it can be merged again once "
                    "the limit is raised in this process (MetricsRecorder(max_series=N), or "
                    "metric.max_series = N). Better: keep unbounded values out of labels in the "
                    "worker."
                )
            plan.append((metric, m, keys))
        return plan

    @staticmethod
    def _check_totals(
        metric: Counter, m: MetricSnapshot, keys: list[tuple[str, ...]], worker: str, seq: int
    ) -> None:
        """ConfigError when adding the delta would take a counter past the float range."""
        for s, key in zip(m.series, keys):
            child = metric._children.get(key)
            if child is not None and not child.value + finite(metric.name, s.value) <= _MAX:
                raise ConfigError(
                    f"cannot merge the delta from worker {worker!r} (seq {seq}): counter "
                    f"{metric.name!r}{dict(zip(metric.label_names, key))} would pass the float "
                    "range (+-1.8e308) and could not be exported. Nothing of the delta was merged; "
                    "a counter this large is most likely fed a wrong value in the worker."
                )

    def _merge_target(self, m: MetricSnapshot) -> Metric:
        """The metric ``m`` merges into: the existing one, or a new one not registered yet."""
        kind = m.kind
        if kind not in ("counter", "gauge", "histogram"):
            raise ConfigError(f"unknown metric kind {kind!r} in delta (metric {m.name!r})")
        name, names = self._common(m.name, m.label_names, kind, m.help)
        limit = self.max_series
        candidate: Metric
        if kind == "counter":
            candidate = Counter(name, m.help, "", names, limit)
        elif kind == "gauge":
            if m.merge not in GAUGE_MODES:
                raise ConfigError(f"gauge {name!r} in delta: unknown merge mode {m.merge!r}")
            candidate = Gauge(name, m.help, check_unit(name, m.unit), names, limit, m.merge)
        else:
            bounds = tuple(m.buckets)
            if (
                not bounds
                or not all(isinstance(b, int | float) and math.isfinite(b) for b in bounds)
                or any(a >= b for a, b in itertools.pairwise(bounds))
            ):
                raise ConfigError(
                    f"histogram {name!r} in delta: bucket bounds must be finite and increasing"
                )
            existing = self._metrics.get(name)
            if isinstance(existing, Histogram) and existing.bounds != bounds:
                raise ConfigError(
                    f"cannot merge histogram {name!r}: the worker's {len(bounds)} buckets "
                    f"differ from this recorder's {len(existing.bounds)}; create it with the same "
                    "buckets in both processes"
                )
            candidate = Histogram(
                name, m.help, check_unit(name, m.unit), names, limit, bounds,
                m.export_buckets, m.midpoint,
            )  # fmt: skip
        existing = self._metrics.get(name)
        if existing is None:
            self._check_samples(candidate)
            return candidate
        if existing._spec() != candidate._spec():
            raise ConfigError(
                f"cannot merge metric {name!r}: it exists here as {describe(existing)}, the "
                f"worker's is {describe(candidate)}. Fix: use one definition in every process."
            )
        return existing

    @staticmethod
    def _merge_key(metric: Metric, s: SeriesSnapshot) -> tuple[str, ...]:
        """The label key of delta series ``s``, with its labels and values checked."""
        name, names = metric.name, metric.label_names
        if not isinstance(s, SeriesSnapshot):
            raise ConfigError(f"delta series of {name!r} is a {type(s).__name__}")
        if not isinstance(s.labels, Mapping) or set(s.labels) != set(names):
            raise ConfigError(
                f"delta series of {name!r} has labels {s.labels!r}; the metric's are {list(names)}"
            )
        key = tuple(s.labels[n] for n in names)
        metric._check_key(key)
        if isinstance(metric, Counter):
            if finite(name, s.value) < 0:
                raise ConfigError(f"delta counter {name!r} has a negative increment {s.value!r}")
        elif isinstance(metric, Gauge):
            finite(name, s.value)
        elif isinstance(metric, Histogram):
            nb = len(metric.bounds) + 1
            for pair in s.bucket_deltas:
                i, c = pair
                if not (type(i) is int and 0 <= i < nb and type(c) is int and c >= 0):
                    raise ConfigError(
                        f"delta histogram {name!r} has a bad bucket delta {pair!r} "
                        f"(index in 0..{nb - 1}, count >= 0)"
                    )
            finite(name, s.sum)
            for x in (s.min, s.max):
                if x is not None and (not isinstance(x, int | float) or math.isnan(x)):
                    raise ConfigError(f"delta histogram {name!r} has a bad min/max {x!r}")
        return key

    def forget_worker(self, worker: str) -> None:
        """Drop what a worker that is gone for good left in gauges (its counts stay)."""
        with self._merge_lock:
            for metric in self._metrics.values():
                if isinstance(metric, Gauge):
                    metric._workers.pop(worker, None)
            source = self._worker_source.pop(worker, None)
            if source is not None:
                self._sources.pop(source, None)

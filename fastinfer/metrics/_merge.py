"""Cross-process metrics: workers ship deltas, the parent merges them (private part of the recorder).

Worker processes ship *deltas* (:meth:`collect_delta`): plain, picklable data holding only what
changed since the last ship. The parent adds them (:meth:`merge`), so a worker that dies loses only
what it never shipped and leaves no file behind; duplicates are ignored by (source, sequence).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any, cast

from fastinfer.errors import CardinalityError, ConfigError
from fastinfer.metrics._names import check_unit
from fastinfer.metrics._registry import MetricRegistry
from fastinfer.metrics._series import (
    STAMPS,
    Counter,
    Gauge,
    Histogram,
    Metric,
    _CounterSeries,
    _HistogramSeries,
)
from fastinfer.metrics._snapshot import MetricSnapshot, MetricsSnapshot, SeriesSnapshot

__all__ = ["Merging"]

logger = logging.getLogger("fastinfer.metrics")


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
        plan: list[tuple[Metric, MetricSnapshot]] = []
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
                        vals[key] = (cast("float", s.value), next(STAMPS))
        return True

    def _metric_for(self, m: MetricSnapshot) -> Metric:
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
            unit = check_unit(name, m.unit)
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

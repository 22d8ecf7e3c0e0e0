"""MetricsRecorder: counters, gauges and histograms that cost less than prometheus_client, merge
across processes and export to Prometheus."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from fastinfer._common.export import counter, gauge
from fastinfer._optional import require
from fastinfer.errors import ConfigError, MetricNameError
from fastinfer.metrics._merge import Merging, watch_forks
from fastinfer.metrics._snapshot import MetricSnapshot, MetricsSnapshot, metric_snapshot
from fastinfer.metrics._tracking import Tracking

__all__ = ["MetricsRecorder", "RecorderStatistics"]


@dataclass(frozen=True)
class RecorderStatistics:
    """A frozen view of the recorder itself.

    ``series_dropped`` counts series left out of a Prometheus scrape because they could not be
    exported (each logged once); ``deltas_refused`` counts worker deltas that ``merge()`` refused
    whole (over ``max_series``, or malformed), nothing of them applied.
    """

    metrics: int = gauge()
    series: int = gauge()
    tracked: int = gauge()
    deltas_shipped: int = gauge()
    deltas_merged: int = gauge()
    duplicate_deltas_ignored: int = gauge()
    workers: int = gauge()
    worker_restarts: int = counter(standard="fastinfer_worker_restarts_total")
    track_errors: int = gauge()
    series_dropped: int = gauge()
    deltas_refused: int = gauge()


class MetricsRecorder(Merging, Tracking):
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
        self._metrics = {}
        self._sample_names = {}  # exposed sample name -> owning metric
        self._lock = threading.RLock()
        self._tracked = []
        # collect_delta() state: (metric, labels) -> what was shipped last
        self._source = uuid.uuid4().hex
        self._seq = 0
        self._shipped = {}
        self._delta_lock = threading.Lock()
        # merge() state
        self._merge_lock = threading.Lock()
        self._sources = {}  # source -> (worker, last seq)
        self._worker_source = {}  # worker -> its current source
        self._merged = 0
        self._duplicates = 0
        self._restarts = 0
        self._track_errors = 0
        self._refused = 0
        self._series_dropped = 0
        self._drops_logged = set()
        self._registrations = []
        watch_forks(self)  # a forked child ships its own deltas, as a new source

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> MetricsSnapshot:
        """A frozen, plain-data view of every metric (tracked objects are read first)."""
        self._refresh_tracked()
        metrics: dict[str, MetricSnapshot] = {}
        for metric in list(self._metrics.values()):
            metrics[metric.name] = metric_snapshot(metric, self._merge_lock)
        return MetricsSnapshot(
            metrics=metrics, time=self._clock(), source=self._source, pid=os.getpid()
        )

    # -- Prometheus ---------------------------------------------------------------------------

    def collector(self) -> Any:
        """A prometheus_client collector for this recorder (register it on any registry)."""
        from fastinfer.metrics._prometheus import PrometheusCollector

        return PrometheusCollector(self)

    def register(self, registry: Any = None) -> Any:
        """Register :meth:`collector` on ``registry`` (prometheus_client's global one by default).

        Raises :class:`MetricNameError` when a metric of this recorder exposes a sample name that
        another collector of ``registry`` exposes (prometheus_client's process, platform and gc
        collectors in the global registry, or your own prometheus_client metrics); nothing is
        registered then. A metric created later is checked against the registry when it is
        created, and its names are held there, so a clashing collector registered later is
        refused by prometheus_client. Registering again into the same registry returns the
        collector already there.
        """
        prom = require("prometheus_client", purpose="Prometheus export")
        from fastinfer.metrics._prometheus import DUPLICATES

        if registry is None:
            registry = prom.REGISTRY
        for reg, registered in self._registrations:  # twice into one registry: the same one
            if reg is registry and registered in getattr(
                registry, "_collector_to_names", {registered: None}
            ):
                return registered
        collector = self.collector()
        with self._lock:  # no metric is created between describe() and holding the registry
            try:
                registry.register(collector)
            except ValueError as e:
                if not str(e).startswith(DUPLICATES):
                    raise
                clash = sorted(getattr(e, "duplicates", ()) or ())
                mine = sorted({self._sample_names.get(s, s) for s in clash})
                raise MetricNameError(
                    f"cannot register this MetricsRecorder: its metric(s) {mine} expose sample "
                    f"name(s) {clash} that another collector of the registry already exposes "
                    "(prometheus_client's default process/platform/gc collectors, or a "
                    "prometheus_client metric of yours); Prometheus would get the same series "
                    "twice. Fix: rename the recorder's metric (for example with your app's prefix, "
                    f"'myapp_{mine[0] if mine else 'name'}')"
                ) from None
            self._registrations.append((registry, collector))
        return collector

    def exposition(self, *, openmetrics: bool = False) -> str:
        """This recorder's metrics in the Prometheus text format (rendered by prometheus_client)."""
        prom = require("prometheus_client", purpose="Prometheus export")
        from fastinfer.metrics._prometheus import ScrapeOnly

        registry = prom.CollectorRegistry(auto_describe=False)
        registry.register(ScrapeOnly(self.collector()))  # a registry of its own: nothing to check
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
                series_dropped=self._series_dropped,
                deltas_refused=self._refused,
            )

    def __repr__(self) -> str:
        return f"<MetricsRecorder {len(self._metrics)} metrics>"

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
  ignored by (source, sequence number). A recorder inherited through ``fork()`` ships as a new
  source in each child, from what the child records after the fork.

See docs/metrics.md for the standard metric names and the Grafana dashboard.

Layout, one concern per file: ``_names`` (Prometheus naming rules), ``_buckets``, ``_series``
(series and metric families: the hot path), ``_timer``, ``_snapshot`` (frozen plain data) and
``_display`` (text, HTML, plot), ``_registry`` (creating metrics), ``_merge`` (cross-process
deltas), ``_tracking`` (other objects' ``statistics()``), ``_recorder`` (the public object),
``_prometheus`` (the prometheus_client bridge), ``_standard`` (the standard metric names).
"""

from fastinfer.metrics._buckets import (
    DEFAULT_LATENCY_BUCKETS,
    DEFAULT_SIZE_BUCKETS,
    LogLinearBuckets,
)
from fastinfer.metrics._recorder import MetricsRecorder, RecorderStatistics
from fastinfer.metrics._series import Counter, Gauge, Histogram
from fastinfer.metrics._snapshot import MetricSnapshot, MetricsSnapshot, SeriesSnapshot
from fastinfer.metrics._standard import (
    STANDARD_METRICS,
    BatcherHooks,
    StandardMetrics,
    standard_metrics,
)
from fastinfer.metrics._timer import Timer

__all__ = [
    "DEFAULT_LATENCY_BUCKETS",
    "DEFAULT_SIZE_BUCKETS",
    "STANDARD_METRICS",
    "BatcherHooks",
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

"""What a DynamicBatcher reports: per-event records and the frozen statistics snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fastinfer._common.export import counter, gauge

__all__ = ["DISPATCH_REASONS", "BatchRecord", "BatcherStatistics", "RequestRecord"]

QUEUE_DEPTH = "fastinfer_queue_depth"
BATCHES_IN_FLIGHT = "fastinfer_batches_in_flight"
REQUESTS = "fastinfer_requests_total"

DISPATCH_REASONS = ("full", "wait_expired", "adaptive", "idle")


@dataclass(frozen=True)
class BatchRecord:
    """One finished batch, as given to ``on_batch`` (maps to ``fastinfer_batch_size``,
    ``fastinfer_batch_execution_seconds`` and ``fastinfer_queue_wait_seconds``)."""

    size: int
    padded_size: int
    reason: str
    queue_wait_seconds: tuple[float, ...]
    execution_seconds: float
    failed: int


@dataclass(frozen=True)
class RequestRecord:
    """One resolved request, as given to ``on_request`` (maps to
    ``fastinfer_requests_total{outcome}`` and ``fastinfer_request_latency_seconds``).

    ``outcome`` is ok, failed, rejected, expired or cancelled; ``queue_wait_seconds`` and
    ``batch_size`` are ``None`` when the request never ran.
    """

    outcome: str
    latency_seconds: float
    queue_wait_seconds: float | None
    batch_size: int | None
    priority: int


@dataclass(frozen=True)
class BatcherStatistics:
    """A frozen snapshot of a :class:`DynamicBatcher` (see ``statistics()``).

    Distributions (``*_seconds``) summarise the last 10,000 events as count, mean, p50, p90, p99,
    p999 and max (one percentile definition: :mod:`fastinfer._common.quantiles`). Each field
    declares the metric it is exported as when a :class:`~fastinfer.MetricsRecorder` tracks the
    batcher: ``queue_depth`` → ``fastinfer_queue_depth``, ``batches_in_flight`` →
    ``fastinfer_batches_in_flight``, ``requests_<outcome>`` → ``fastinfer_requests_total{outcome}``
    (a batch given up after ``batch_timeout`` counts its callers as expired, and is counted in
    ``batches_run`` and ``batches_timed_out``);
    the histograms ``fastinfer_batch_size``, ``fastinfer_queue_wait_seconds``,
    ``fastinfer_request_latency_seconds`` and ``fastinfer_batch_execution_seconds`` are fed per
    event by the ``on_batch`` / ``on_request`` callbacks (``StandardMetrics.batcher_hooks()``).
    """

    queue_depth: int = gauge(standard=QUEUE_DEPTH)
    batches_in_flight: int = gauge(standard=BATCHES_IN_FLIGHT)
    batches_run: int = gauge()
    requests_submitted: int = gauge()
    requests_ok: int = counter(standard=REQUESTS, labels={"outcome": "ok"})
    requests_failed: int = counter(standard=REQUESTS, labels={"outcome": "failed"})
    requests_rejected: int = counter(standard=REQUESTS, labels={"outcome": "rejected"})
    requests_expired: int = counter(standard=REQUESTS, labels={"outcome": "expired"})
    requests_cancelled: int = counter(standard=REQUESTS, labels={"outcome": "cancelled"})
    padded_items: int = gauge()
    bisections: int = gauge()
    batches_timed_out: int = gauge()  # given up after batch_timeout (callers: DeadlineExceeded)
    batches_aborted: int = gauge()  # fn raised a BaseException, contained (callers: BatchError)
    abandoned_threads: int = gauge()  # sync calls given up on that still run in their thread
    cost_probes: int = gauge()  # batches run although the cost model said they were hopeless
    dispatch_reasons: Mapping[str, int] = gauge(key_label="key")
    batch_size_counts: Mapping[int, int] = gauge(key_label="key")
    batch_size_mean: float = gauge()
    queue_wait_seconds: Mapping[str, float] = gauge(key_label="key")
    request_latency_seconds: Mapping[str, float] = gauge(key_label="key")
    batch_execution_seconds: Mapping[str, float] = gauge(key_label="key")
    cost_per_item_seconds: float = gauge()
    cost_per_batch_seconds: float = gauge()
    arrival_rate: float = gauge()
    max_batch_size: int = gauge()
    max_wait_ms: float = gauge(unit="ms")
    max_concurrent_batches: int = gauge()
    prefetch_batches: int = gauge()
    closed: bool = gauge()

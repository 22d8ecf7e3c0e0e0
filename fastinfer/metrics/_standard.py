"""The standard metric names (the shared contract; docs/metrics.md has the table)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from fastinfer.errors import ConfigError
from fastinfer.metrics._buckets import LogLinearBuckets
from fastinfer.metrics._names import GaugeMode, Kind
from fastinfer.metrics._series import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from fastinfer.metrics._recorder import MetricsRecorder

__all__ = [
    "CACHE_RESULTS",
    "OUTCOMES",
    "STANDARD_METRICS",
    "BatcherHooks",
    "StandardMetrics",
    "standard_metrics",
]

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

"""What a DynamicBatcher reports: per-event records and the frozen statistics snapshot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["DISPATCH_REASONS", "BatchRecord", "BatcherStatistics", "RequestRecord", "summary"]

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

    Distributions (``*_seconds``) summarise the last 10,000 events as count, mean, p50, p90, p99
    and max. Field names map to the standard metrics: ``queue_depth`` → ``fastinfer_queue_depth``,
    ``batches_in_flight`` → ``fastinfer_batches_in_flight``, ``requests_<outcome>`` →
    ``fastinfer_requests_total{outcome}``, ``batch_size_counts`` → ``fastinfer_batch_size``,
    ``queue_wait_seconds`` → ``fastinfer_queue_wait_seconds``, ``request_latency_seconds`` →
    ``fastinfer_request_latency_seconds``, ``batch_execution_seconds`` →
    ``fastinfer_batch_execution_seconds``.
    """

    queue_depth: int
    batches_in_flight: int
    batches_run: int
    requests_submitted: int
    requests_ok: int
    requests_failed: int
    requests_rejected: int
    requests_expired: int
    requests_cancelled: int
    padded_items: int
    bisections: int
    dispatch_reasons: Mapping[str, int]
    batch_size_counts: Mapping[int, int]
    batch_size_mean: float
    queue_wait_seconds: Mapping[str, float]
    request_latency_seconds: Mapping[str, float]
    batch_execution_seconds: Mapping[str, float]
    cost_per_item_seconds: float
    cost_per_batch_seconds: float
    arrival_rate: float
    max_batch_size: int
    max_wait_ms: float
    max_concurrent_batches: int
    closed: bool


def summary(samples: Sequence[float]) -> dict[str, float]:
    xs = sorted(samples)
    if not xs:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {
        "count": len(xs),
        "mean": sum(xs) / len(xs),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": xs[-1],
    }

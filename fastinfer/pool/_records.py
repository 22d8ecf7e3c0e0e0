"""What a PinnedPool reports: per-call records and the frozen statistics snapshots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from fastinfer._common.export import counter, gauge, not_exported

__all__ = ["CallRecord", "PoolStatistics", "WorkerStatistics"]

QUEUE_DEPTH = "fastinfer_queue_depth"
REQUESTS = "fastinfer_requests_total"
WORKERS_ALIVE = "fastinfer_workers_alive"
WORKER_RESTARTS = "fastinfer_worker_restarts_total"
WORKER_BUSY_RATIO = "fastinfer_worker_busy_ratio"


@dataclass(frozen=True)
class CallRecord:
    """One finished call, for ``on_call=`` (e.g. a metrics recorder)."""

    worker: int
    outcome: Literal["ok", "failed", "crashed", "timeout", "cancelled"]
    queue_wait_seconds: float
    service_seconds: float  # dispatch to result, as seen by the parent (includes transport)
    execution_seconds: float | None  # fn() alone, measured in the worker
    latency_seconds: float  # submit to result


@dataclass(frozen=True)
class WorkerStatistics:
    """One worker slot. ``latency_seconds`` summarises the parent-side service times of the
    recent calls (count, mean, p50, p90, p99, p999, max; :mod:`fastinfer._common.quantiles`)."""

    worker: int = gauge()
    pid: int | None = not_exported("an identifier, not a measurement")
    alive: bool = gauge()
    state: str = not_exported("text: the worker's lifecycle state")
    cpus: tuple[int, ...] = not_exported("a CPU list")
    threads: int = gauge()
    in_flight: int = gauge()
    calls_ok: int = gauge()
    calls_failed: int = gauge()
    restarts: int = gauge()
    consecutive_crashes: int = gauge()
    busy_ratio: float = gauge()
    latency_seconds: Mapping[str, float] = gauge(key_label="key")
    #: why the slot's last failed start (after the pool started) failed, on one line; None: none
    start_error: str | None = not_exported("text", default=None)
    #: the worker's traceback of that failure (init() raised), for operators; never sent to clients
    start_traceback: str | None = not_exported("text", default=None)


@dataclass(frozen=True)
class PoolStatistics:
    """A frozen snapshot of a :class:`PinnedPool`; each field declares the metric it feeds."""

    workers: int = gauge()
    workers_alive: int = gauge(standard=WORKERS_ALIVE)
    worker_restarts_total: int = counter(standard=WORKER_RESTARTS)
    queue_depth: int = gauge(standard=QUEUE_DEPTH)
    calls_in_flight: int = gauge()
    requests_ok: int = counter(standard=REQUESTS, labels={"outcome": "ok"})
    requests_failed: int = counter(standard=REQUESTS, labels={"outcome": "failed"})
    requests_cancelled: int = counter(standard=REQUESTS, labels={"outcome": "cancelled"})
    crashes: int = gauge()
    timeouts: int = gauge()
    retries: int = gauge()
    busy_ratio: float = gauge()
    queue_per_worker: dict[int, int] = gauge(key_label="worker")
    busy_ratio_per_worker: dict[int, float] = gauge(standard=WORKER_BUSY_RATIO, key_label="worker")
    per_worker: tuple[WorkerStatistics, ...] = not_exported(
        "nested records; per-worker values are exported by the *_per_worker fields"
    )
    foreign_load_warning: str | None = not_exported("text")
    notes: tuple[str, ...] = not_exported("text")
    closed: bool = gauge()
    #: the most crashes in a row of one slot (no call succeeded in between); from 3 on, its
    #: restart waits (backoff) and, while no worker is up, calls fail at once with WorkerCrashed
    consecutive_crashes: int = gauge()
    #: seconds until the next restart of a slot waiting in backoff (the soonest); 0 when none waits
    restart_backoff_seconds: float = gauge()
    #: every slot failed to restart and the pool runs no more calls (not ready for good)
    gave_up: bool = gauge()
    gave_up_reason: str | None = not_exported("text")

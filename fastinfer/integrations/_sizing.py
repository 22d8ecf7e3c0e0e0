"""How a service computes on its cores: batch slots × torch threads, chosen by measurement.

On a CPU a batch can run as one forward pass with many threads, or several batches can run at once
with fewer threads each. Which is faster depends on the model: a small model's forward pass does
not scale to many threads (2 single-thread passes beat one 2-thread pass on the 2-core machine the
benchmarks ran on), a large one's does. :func:`measure_serving` tries every split of the core
budget (slots × threads = cores, from :class:`fastinfer.CorePlan`: physical cores, capped by the
cgroup quota), runs ``fn`` on a full example batch from ``slots`` threads at once for a short time,
and keeps the split with the most items per second. Near-ties go to fewer slots: each batch then
finishes sooner, so latency is lower at the same throughput.

The result sets torch's thread count for the process (and the OMP/MKL variables) and gives the
batcher its ``max_concurrent_batches``; ``/readyz`` shows the measurement under ``"serving"``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from fastinfer.errors import ConfigError, RecompileError
from fastinfer.integrations._admission import (
    AdmissionLimits,
    batch_len,
    measure_admission,
    warn_if_miscounted,
)

if TYPE_CHECKING:
    from fastinfer.integrations.fastapi import FastInferService
    from fastinfer.pool import PinnedPool

__all__ = ["ServingPlan", "admission", "measure_serving", "pool_plan", "splits", "through_pool"]

logger = logging.getLogger("fastinfer.integrations.fastapi")

_TIE = 0.03  # within 3% of the best, fewer slots win (lower latency per batch)


@dataclass(frozen=True)
class ServingPlan:
    """What :func:`measure_serving` chose: ``slots`` batches at once, ``threads`` torch threads
    each, on ``cores`` cores, and the items/s it measured for every split it tried."""

    cores: int
    slots: int
    threads: int
    batch_size: int
    items_per_second: float
    measured: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    @property
    def batch_seconds(self) -> float:
        """Time of one batch when every slot is busy (what admission plans with)."""
        if self.items_per_second <= 0:
            return 0.0
        return self.slots * self.batch_size / self.items_per_second

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_seconds"] = self.batch_seconds
        return d


def splits(cores: int) -> list[tuple[int, int]]:
    """Every ``(slots, threads)`` with ``slots * threads == cores``, fewest slots first."""
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ConfigError(f"cores must be an int >= 1, got {cores!r}")
    return [(s, cores // s) for s in range(1, cores + 1) if cores % s == 0]


def _items_per_second(
    fn: Callable[[Any], Any], batch: Any, size: int, slots: int, seconds: float
) -> float:
    done = [0] * slots
    errors: list[BaseException] = []
    start = threading.Barrier(slots + 1)
    stop_at = [0.0]

    def work(i: int) -> None:
        start.wait()
        try:
            while time.perf_counter() < stop_at[0]:
                fn(batch)
                done[i] += 1
        except BaseException as exc:  # surfaced below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(slots)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(done) * size / elapsed if elapsed > 0 else 0.0


def measure_serving(
    fn: Callable[[Any], Any],
    example_batch: Any,
    *,
    batch_size: int,
    cores: int | None = None,
    slots: int | None = None,
    seconds: float = 0.5,
    set_threads: Callable[[int], Any] | None = None,
) -> ServingPlan:
    """Pick slots × threads for ``fn`` on ``cores`` cores by measuring each split.

    ``slots`` fixes the number of batch slots (its threads are ``cores // slots``; nothing is
    measured but the one split); ``seconds`` is the time per split (after one untimed call each).
    ``set_threads(n)`` applies a thread count (default :func:`fastinfer.configure_threads`).
    """
    from fastinfer import CorePlan, configure_threads

    apply = set_threads or (lambda n: configure_threads(n))
    budget = CorePlan.detect().core_budget if cores is None else cores
    options = splits(budget)
    if slots is not None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ConfigError(f"slots must be an int >= 1 or None, got {slots!r}")
        options = [(slots, max(1, budget // slots))]
    if not seconds > 0:
        raise ConfigError(f"seconds must be > 0, got {seconds!r}")
    warn_if_miscounted(example_batch, batch_size)
    measured: dict[str, float] = {}
    refused: dict[str, str] = {}
    for s, t in options:
        apply(t)
        try:
            fn(example_batch)  # one untimed call: lazy kernels, allocator growth, thread start-up
            measured[f"{s}x{t}"] = _items_per_second(fn, example_batch, batch_size, s, seconds)
        except RecompileError as exc:
            # A compiled model is compiled for the thread count it was warmed with (dynamo guards
            # on it): another count would recompile at serve time, so that split is not an option.
            refused[f"{s}x{t}"] = str(exc).splitlines()[0]
    if not measured:
        raise ConfigError(
            "no split of the cores could run fn: "
            + "; ".join(f"{k}: {v}" for k, v in refused.items())
            + ". Fix: compile the model with the thread count it will serve with (call "
            "svc.admission before compile_model, or pass max_concurrent_batches=<slots>)"
        )
    best = max(measured.values())
    chosen = next(  # fewest slots within _TIE of the best
        (s, t) for s, t in options if measured.get(f"{s}x{t}", -1.0) >= best * (1 - _TIE)
    )
    apply(chosen[1])
    reason = (
        "the only split asked for"
        if len(options) == 1
        else f"most items/s of {len(measured)} splits (fewer slots within {_TIE:.0%} of the best)"
    )
    if refused:
        reason += "; not tried: " + "; ".join(f"{k} ({v})" for k, v in refused.items())
    plan = ServingPlan(
        cores=budget,
        slots=chosen[0],
        threads=chosen[1],
        batch_size=batch_size,
        items_per_second=measured[f"{chosen[0]}x{chosen[1]}"],
        measured=measured,
        reason=reason,
    )
    logger.info(
        "serving plan: %d slot(s) x %d thread(s) on %d core(s), %.0f items/s measured (%s)",
        plan.slots,
        plan.threads,
        plan.cores,
        plan.items_per_second,
        ", ".join(f"{k}: {v:.0f}" for k, v in measured.items()),
    )
    return plan


def through_pool(pool: PinnedPool) -> Callable[[Any], Any]:
    """``pool`` as a blocking function of one batch (what the batcher's ``pool.run`` awaits)."""
    return lambda batch: pool.submit(batch).result()


def pool_plan(
    pool: PinnedPool, example_batch: Any, size: int, slots: int | Literal["auto"]
) -> ServingPlan:
    """The serving plan of a pool: its workers are the slots, measured through the pool."""
    if slots not in ("auto", pool.workers):
        raise ConfigError(
            f"max_concurrent_batches={slots!r} with a PinnedPool of {pool.workers} workers: the "
            "workers are the slots. Fix: leave it 'auto' (or pass pool.workers)"
        )
    threads = max((w.threads for w in pool.statistics().per_worker), default=1)
    plan = measure_serving(
        through_pool(pool), example_batch, batch_size=size, slots=pool.workers, cores=pool.workers,
        set_threads=lambda n: None,  # the workers' threads were set when they started
    )  # fmt: skip
    return replace(
        plan,
        cores=pool.workers * threads,
        threads=threads,
        reason=f"a PinnedPool: {pool.workers} worker process(es) x {threads} thread(s), "
        "measured through the pool with every worker busy",
    )


def admission(
    self: FastInferService,
    fn: Callable[[Any], Any] | PinnedPool,
    example_batch: Any,
    *,
    latency_target_ms: float,
    max_concurrent_batches: int | Literal["auto"] = "auto",
    batch_size: int | None = None,
    name: str = "model",
) -> AdmissionLimits:
    """Size a batcher from ``fn``'s measured cost on a full example batch: how many batches
    run at once and with how many torch threads, and how long its queue may be.

    ``max_concurrent_batches="auto"`` (the one knob) splits the core budget
    (:class:`fastinfer.CorePlan`) into slots × threads by measuring every split and keeps the
    fastest (``_sizing.py``); it sets torch's threads for the process. ``fn`` may instead be
    the :class:`fastinfer.PinnedPool` the batcher will feed (``DynamicBatcher(pool.run,
    ...)``): its workers are the slots (each pinned, with its own threads), and the cost is
    measured through the pool, every worker busy; nothing in this process is changed; and the
    batcher may also fill the pool's ``prefetch`` buffers (``workers x (1 + prefetch)`` batches
    at once, ``"buffered"`` in ``/readyz``), so no worker waits for this process between
    batches. The queue is then sized so that a request admitted last still finishes within
    ``latency_target_ms``. Returns ``{"max_concurrent_batches": n, "prefetch_batches": 0,
    "max_queue_size": q}`` for ``DynamicBatcher(..., **limits)``; the measurements show in
    ``/readyz`` under ``"serving"`` and ``"admission"``. With ``shed_at_door``, at most that queue plus what the
    batch slots run is let past the door at once; the next request is answered 503 before it
    is read. Call it in the setup function, once per batcher (the runs double as warm-up)."""
    from fastinfer.pool import PinnedPool

    size = batch_size if batch_size is not None else batch_len(example_batch)
    if isinstance(fn, PinnedPool):
        plan = pool_plan(fn, example_batch, size, max_concurrent_batches)
        call = through_pool(fn)
    else:
        slots = None if max_concurrent_batches == "auto" else max_concurrent_batches
        plan = measure_serving(fn, example_batch, batch_size=size, slots=slots)
        call = fn
    self._serving[name] = plan.to_dict()
    report = measure_admission(
        call,
        example_batch,
        latency_target_ms=latency_target_ms,
        max_concurrent_batches=plan.slots,
        batch_size=size,
        batch_seconds=plan.batch_seconds or None,
    )
    # A pool holds `prefetch` batches per worker ready behind the one it runs, so a worker
    # never waits on this process between batches: the batcher may dispatch that many more,
    # taken from the queue's share (they wait the same way, in the worker's pipe). They count
    # as slots, not as `prefetch_batches`: the fitted batch cost then includes their wait in
    # the pipe, which makes the adaptive policy wait for larger batches; counted from the slot
    # (prefetch_batches) it was measured 4-7% slower at 64 connections (benchmarks/README.md).
    buffered = fn.workers * fn.prefetch if isinstance(fn, PinnedPool) else 0
    queue = max(report.max_queue_size - buffered * size, size)
    concurrent = plan.slots + buffered
    limits = AdmissionLimits(
        max_concurrent_batches=concurrent, prefetch_batches=0, max_queue_size=queue
    )
    self._admission[name] = {**report.to_dict(), **limits, "buffered": buffered}
    if self.door is not None:  # at most what the batcher holds past the door at once
        self.door.limit = (self.door.limit or 0) + queue + size * concurrent
        self.door.floor += size * plan.slots  # never below what the slots run
        target = latency_target_ms / 1000
        self.door.target_seconds = min(target, self.door.target_seconds or target)
    logger.info("admission for %s: %s", name, report)
    return limits

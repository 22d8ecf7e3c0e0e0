"""``FastInferService.serve_model``: the measured serving path in one call.

On a multi-core machine the fastest way found to serve a model from FastAPI (``bench_peers.py``,
docs/fastapi.md "On several cores") is the model in :class:`fastinfer.PinnedPool` workers, one
single-thread process per physical core, fed by an adaptive :class:`fastinfer.DynamicBatcher` in
the server process, its limits measured through the pool. On one core, or where the model cannot
be rebuilt in a worker, the model runs in the server process with slots x threads measured.
:func:`serve_model` builds whichever applies, says which and why in ``/readyz``, and returns the
batcher.
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from fastinfer.errors import ConfigError
from fastinfer.integrations._admission import batch_len

if TYPE_CHECKING:
    from fastinfer.batching import DynamicBatcher
    from fastinfer.integrations.fastapi import FastInferService

__all__ = ["auto_call_timeout", "choose_workers", "serve_model"]

logger = logging.getLogger(__name__)


def choose_workers(
    init: Callable[[], Any], fn: Callable[[Any, Any], Any], workers: int | Literal["auto"]
) -> tuple[int, str]:
    """(worker processes, why): 0 means in the server process."""
    if workers != "auto":
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(
                f"workers must be 'auto', 0 (in the server process) or a number of worker "
                f"processes >= 1, got {workers!r}"
            )
        return workers, "workers=0: in the server process" if workers == 0 else (
            f"workers={workers}: {workers} pinned worker process(es)"
        )
    from fastinfer.pool import CorePlan

    cores = CorePlan.detect().default_workers()
    if cores < 2:
        return 0, f"auto: {cores} physical core: in the server process (a worker gains nothing)"
    for what, f in (("init", init), ("fn", fn)):
        try:
            pickle.dumps(f)
        except Exception:
            return 0, (
                f"auto: {what}={getattr(f, '__qualname__', f)!r} cannot be pickled for worker "
                "processes, so the model runs in the server process; define it at module level "
                "(or as functools.partial of a module-level function) to get one worker per core"
            )
    return cores, f"auto: {cores} physical cores: one pinned single-thread worker process each"


def auto_call_timeout(latency_target_ms: float, batch_seconds: float) -> float:
    """Seconds after which a batch is taken as stuck: 5 s, 10x the target, 50x a full batch."""
    return round(max(5.0, 10 * latency_target_ms / 1000, 50 * batch_seconds), 3)


def serve_model(
    svc: FastInferService,
    init: Callable[[], Any],
    fn: Callable[[Any, Any], Any],
    example_batch: Any,
    *,
    latency_target_ms: float,
    workers: int | Literal["auto"] = "auto",
    max_batch_size: int | None = None,
    max_wait_ms: float = 5.0,
    call_timeout: float | Literal["auto"] | None = "auto",
    name: str = "model",
    **batcher_options: Any,
) -> DynamicBatcher[Any, Any]:
    """The fastest measured serving path, built and sized: returns the (managed) batcher.

    ``init()`` builds the model's state (load, swap, compile); ``fn(state, batch)`` runs one
    batch. ``workers="auto"`` (the one knob): on a machine with 2+ physical cores, one
    :class:`fastinfer.PinnedPool` worker per core, pinned, one thread each, each running
    ``init`` once, fed by an adaptive :class:`fastinfer.DynamicBatcher` whose limits come
    from ``svc.admission`` through the pool; on one core, or when ``init``/``fn`` cannot be
    pickled (a lambda, a closure), ``init`` runs here and slots x threads are measured.
    ``workers=0`` forces the server process (a GPU model, one process owning the device);
    ``workers=n`` forces ``n`` processes. ``/readyz`` shows the choice and why under
    ``"serving"``. Call it from the setup function; ``batcher_options`` go to the batcher.

    ``call_timeout`` (seconds) is the longest one batch may run in a worker: past it the worker
    is killed and replaced, the batch's requests fail with ``WorkerTimeout`` (504), and the
    batcher retries the others of that batch apart from the one that hangs. ``"auto"``: the
    largest of 5 s, 10x the latency target and 50x the measured full-batch cost (a batch that
    slow is stuck, not slow); None: no limit. In the server process (``workers=0``) nothing can
    stop a running call, so it applies to workers only (the batcher's ``batch_timeout`` abandons
    a call that runs here). Every worker, a replacement included, runs ``fn`` on
    ``example_batch`` once before it takes calls (``PinnedPool(warmup=...)``), so no first call
    is a cold one."""
    from fastinfer.batching import DynamicBatcher
    from fastinfer.pool import PinnedPool
    from fastinfer.pool._pool import MAX_TIMEOUT

    if (
        call_timeout is not None
        and call_timeout != "auto"
        and not (
            isinstance(call_timeout, int | float)
            and not isinstance(call_timeout, bool)
            and 0 < call_timeout <= MAX_TIMEOUT
        )
    ):
        raise ConfigError(
            f"call_timeout must be 'auto', None (no limit) or seconds in (0, {MAX_TIMEOUT:g}], "
            f"got {call_timeout!r}"
        )
    processes, reason = choose_workers(init, fn, workers)
    size = max_batch_size if max_batch_size is not None else batch_len(example_batch)
    call: Callable[[Any], Any]
    if processes:
        with svc.phase("workers"):  # each worker runs init once, pinned, its threads set
            pool = svc.manage(
                # warmup: a replacement worker (after a crash or a timeout) starts warm too
                PinnedPool(init, fn, workers=processes, warmup=example_batch),
                name=f"{name}_pool",
                standard=False,
            )
            pool.wait_ready()  # a worker whose init failed: the measurement below raises why
        sized: Any = pool
        call = pool.run
    else:
        with svc.phase("load"):
            state = init()
        call = sized = functools.partial(fn, state)
    with svc.phase("measure"):  # a full batch's cost, through the workers (also the warm-up)
        limits = svc.admission(
            sized, example_batch, latency_target_ms=latency_target_ms, batch_size=size, name=name
        )
    serving = svc._serving.setdefault(name, {})
    serving.update(processes=processes, choice=reason)
    if processes:
        pool.timeout = (
            auto_call_timeout(latency_target_ms, serving.get("batch_seconds") or 0.0)
            if call_timeout == "auto"
            else call_timeout
        )
        serving["call_timeout_s"] = pool.timeout
    logger.info("serving %s: %s", name, reason)
    options = {"policy": "adaptive", **limits, **svc.batcher_hooks(), **batcher_options}
    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
        call, max_batch_size=size, max_wait_ms=max_wait_ms, **options
    )
    return svc.manage(batcher, name=name)

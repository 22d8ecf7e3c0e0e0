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

import difflib
import functools
import inspect
import logging
import math
import pickle
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from fastinfer.errors import BatchError, ConfigError, WorkerCrashed, WorkerStartupError
from fastinfer.integrations._admission import batch_len, fill_batch
from fastinfer.integrations._answers import marking_lone_crashes
from fastinfer.integrations._exporting import PoolWorkers, track

if TYPE_CHECKING:
    from fastinfer.batching import DynamicBatcher
    from fastinfer.integrations._admission import AdmissionLimits
    from fastinfer.integrations.fastapi import FastInferService
    from fastinfer.pool import PinnedPool

__all__ = ["auto_call_timeout", "check_splittable", "choose_workers", "serve_model"]

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
    """Seconds after which a batch is taken as stuck: 5 s, 10x the target, 50x a full batch;
    at most a week (``MAX_TIMEOUT``: longer cannot be waited on)."""
    from fastinfer.pool._pool import MAX_TIMEOUT

    return round(min(MAX_TIMEOUT, max(5.0, 10 * latency_target_ms / 1000, 50 * batch_seconds)), 3)


#: a call_timeout below this many measured full batches is refused (every call would time out)
MIN_TIMEOUT_BATCHES = 2.0

_NAME = re.compile(r"[A-Za-z0-9_:]+")


def _seconds(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _example_items(example_batch: Any) -> int:
    """How many items ``example_batch`` holds (a mapping: its values', which must agree)."""
    values = list(example_batch.values()) if isinstance(example_batch, Mapping) else [example_batch]
    try:
        counts = {batch_len(v) for v in values}
    except ConfigError:
        counts = set()
    if len(counts) == 1:
        return counts.pop()
    if isinstance(example_batch, Mapping) and not example_batch:
        return 0
    raise ConfigError(
        f"example_batch must be a batch as fn receives it, with items that can be counted (a "
        f"list, a tuple, a tensor, or a mapping of those that agree on the count), got "
        f"{type(example_batch).__name__} {_short(example_batch)}. Fix: pass a list of "
        "representative inputs"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_splittable(output: Any, size: int, collate: Any, name: str) -> None:
    """Raise the :class:`~fastinfer.BatchError` the batcher would raise at every batch when
    ``fn``'s output on the example batch of ``size`` items cannot be split into one result per
    item (the batcher's own rules: a list of one result per item; a tensor, array, dict or tuple
    batched on dim 0; a tuple of one plain value per item). A collator of the app's own is not
    checked (its ``split`` needs the context its ``collate`` made)."""
    from fastinfer.batching._collate import (
        PadCollate,
        StackCollate,
        is_tensor_or_array,
        split_output,
    )

    try:
        if collate is None:
            if isinstance(output, list) or (isinstance(output, tuple) and not output):
                split_output(list(output), size)
            elif isinstance(output, tuple):
                try:
                    split_output(output, size)
                except BatchError:
                    plain = not any(
                        isinstance(v, list | tuple | Mapping) or is_tensor_or_array(v)
                        for v in output
                    )
                    if not (plain and len(output) == size):  # one plain result per item
                        raise
            else:
                split_output(output, size)
        elif collate in ("stack", "pad") or isinstance(collate, StackCollate | PadCollate):
            split_output(output, size)
    except BatchError as exc:
        raise BatchError(
            f"serve_model({name!r}): fn's output on example_batch ({size} items) cannot be split "
            f"into one result per item, so every request would fail: {exc}. Fix fn to return one "
            "result per item: a list of them, or a tensor (or a dict/tuple of tensors) with the "
            "batch on dim 0"
        ) from None


def _call_timeout(
    call_timeout: float | Literal["auto"] | None,
    latency_target_ms: float,
    batch_seconds: float,
    size: int,
) -> float | None:
    """The longest one batch may run, from ``serve_model``'s ``call_timeout`` and the cost."""
    if call_timeout == "auto":
        return auto_call_timeout(latency_target_ms, batch_seconds)
    if call_timeout is not None and call_timeout < MIN_TIMEOUT_BATCHES * batch_seconds:
        raise ConfigError(
            f"call_timeout={call_timeout:g}s is below {MIN_TIMEOUT_BATCHES:g}x the measured "
            f"cost of one full batch ({batch_seconds:.3g}s for {size} items): every batch would "
            f"time out (and, in workers, restart its worker). Fix: raise call_timeout above "
            f"{MIN_TIMEOUT_BATCHES * batch_seconds:.3g}s, pass call_timeout='auto', or lower "
            "max_batch_size"
        )
    return call_timeout


def _check_batcher_options(
    options: dict[str, Any], size: int, max_wait_ms: float, call: Callable[[Any], Any]
) -> None:
    """Refuse a keyword DynamicBatcher does not take, or a value it refuses, before any worker
    starts (a slow ``init`` must not run before a typo is reported)."""
    from fastinfer.batching import DynamicBatcher

    if "config" in options:
        raise ConfigError(
            "serve_model builds the batcher's config itself: pass its options as keywords "
            "(policy=..., timeout=...), not config="
        )
    own = set(inspect.signature(serve_model).parameters) - {"svc", "batcher_options"}
    taken = set(inspect.signature(DynamicBatcher.__init__).parameters) - {"self", "fn", "config"}
    unknown = sorted(set(options) - taken)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, own | taken, 1)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise ConfigError(
            f"serve_model got unknown keyword argument(s) {', '.join(hints)}. Fix: use "
            f"serve_model's own ({', '.join(sorted(own))}) or DynamicBatcher's, which the "
            f"others go to ({', '.join(sorted(taken - own))})"
        )
    # A dry run: the batcher built here checks every value the way the real one will (nothing
    # starts until it is bound to a loop); the measured limits replace these placeholders.
    DynamicBatcher(
        call,
        max_batch_size=size,
        max_wait_ms=max_wait_ms,
        **{"policy": "adaptive", "max_concurrent_batches": 1, "max_queue_size": size, **options},
    )


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
    startup_timeout: float = 300.0,
    name: str = "model",
    labels: Mapping[str, object] | None = None,
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
    slow is stuck, not slow), at most a week; None: no limit. A number below twice the measured
    full-batch cost is refused (``ConfigError``) once measured: every batch would time out. In
    the server process (``workers=0``) nothing can stop a running call, so it becomes the
    batcher's ``batch_timeout`` (unless ``batch_timeout`` is passed): a call past it is given
    up, its thread abandoned, its batch's requests answered 504, later ones served.
    ``startup_timeout`` (seconds, default 300) is how long each worker's ``init`` may take.
    ``labels`` (``{"model": name}``) label the model's standard metrics, for a service of
    several models (each with its labels: see :meth:`FastInferService.manage`).

    The cost is measured on a full batch of ``max_batch_size`` items (default: the example's
    size): a smaller ``example_batch`` is filled by cycling its items (a larger one is cut), and
    the log and ``/readyz`` say so. Every worker, a replacement included, runs ``fn`` on that
    batch once before it takes calls (``PinnedPool(warmup=...)``), so no first call is a cold
    one. Every argument, ``batcher_options`` included, is checked before any worker starts;
    a bad one raises :class:`~fastinfer.ConfigError` naming it; an output of ``fn`` on the example
    batch that cannot be split per item fails with the batcher's :class:`~fastinfer.BatchError`.
    A request that alone crashed its worker is answered 500, not retryable (``_answers.py``)."""
    from fastinfer.batching import DynamicBatcher
    from fastinfer.pool._pool import MAX_TIMEOUT

    # Every argument is checked here, before the first worker starts: a slow init must not run
    # before a typo is reported.
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ConfigError(
            f"name must be letters, digits and '_' (it names the metrics fastinfer_<name>_*), "
            f"got {name!r}"
        )
    taken = {n for n, _ in svc._managed} | set(svc._serving) | set(svc._admission)
    if {name, f"{name}_pool"} & taken:
        raise ConfigError(
            f"a model named {name!r} is already served by this service; give each serve_model "
            "call its own name="
        )
    if not (_seconds(latency_target_ms) and 0 < latency_target_ms < math.inf):
        raise ConfigError(
            f"latency_target_ms must be a number of milliseconds > 0, got {latency_target_ms!r}"
        )
    if call_timeout not in (None, "auto") and not (
        _seconds(call_timeout) and 0 < call_timeout <= MAX_TIMEOUT
    ):
        raise ConfigError(
            f"call_timeout must be 'auto', None (no limit) or seconds in (0, {MAX_TIMEOUT:g}], "
            f"got {call_timeout!r}"
        )
    if not (_seconds(startup_timeout) and 0 < startup_timeout <= MAX_TIMEOUT):
        raise ConfigError(
            f"startup_timeout must be the seconds a worker's init may take, in "
            f"(0, {MAX_TIMEOUT:g}], got {startup_timeout!r}"
        )
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or max_batch_size < 1
    ):
        raise ConfigError(f"max_batch_size must be an int >= 1 or None, got {max_batch_size!r}")
    items = _example_items(example_batch)
    if items < 1:
        raise ConfigError(
            f"example_batch is empty ({type(example_batch).__name__} of 0 items): the batch "
            "cost is measured on it and every worker warms up on it. Fix: pass a few "
            "representative inputs (ideally max_batch_size of them)"
        )
    size = max_batch_size if max_batch_size is not None else items
    # The cost is measured (and every worker warmed) on a full batch of `size` items: an example
    # of another size would be timed as one and counted as the other, sizing the queue wrongly.
    try:
        batch = fill_batch(example_batch, size)
    except ConfigError as exc:
        raise ConfigError(
            f"example_batch has {items} item(s) but max_batch_size={size}, and {exc}. Fix: pass "
            f"an example_batch of {size} items (a list, a tuple or a tensor can be filled)"
        ) from None
    processes, reason = choose_workers(init, fn, workers)
    if not processes and "batch_timeout" in batcher_options and call_timeout not in ("auto", None):
        raise ConfigError(
            f"serve_model got call_timeout={call_timeout!r} and batch_timeout="
            f"{batcher_options['batch_timeout']!r}: in the server process (workers=0) both are "
            "the batcher's batch_timeout. Fix: pass one of them"
        )

    async def _pool_call(xs: Any) -> Any:  # stands for pool.run in the dry run
        return xs

    dry: Callable[[Any], Any] = _pool_call if processes else functools.partial(fn, None)
    _check_batcher_options(batcher_options, size, max_wait_ms, dry)
    hooks = svc.batcher_hooks(labels=labels)  # labels that do not fit: refused before a worker
    how = "its items cycled" if items < size else f"its first {size} items"
    if items != size:
        logger.info(
            "serving %s: example_batch has %d item(s), max_batch_size=%d: measuring and warming "
            "up on a batch of %d, %s",
            name,
            items,
            size,
            size,
            how,
        )
    try:
        call, limits, pool = _start_and_measure(
            svc, init, fn, batch, size, processes, latency_target_ms, startup_timeout, name,
            batcher_options.get("collate"),
        )  # fmt: skip
    except WorkerStartupError as exc:
        if "did not start within" not in str(exc):
            raise
        raise WorkerStartupError(
            f"{exc}. Fix: serve_model(..., startup_timeout=<seconds>) gives each worker's init "
            f"longer (it was {startup_timeout:g}s)"
        ) from exc
    serving = svc._serving.setdefault(name, {})
    serving.update(processes=processes, choice=reason)
    if items != size:
        serving["example_batch"] = (
            f"{items} item(s), measured as a batch of max_batch_size={size}: {how}"
        )
    batch_seconds = serving.get("batch_seconds") or 0.0
    if pool is not None:  # past it the worker is killed and replaced
        pool.timeout = _call_timeout(call_timeout, latency_target_ms, batch_seconds, size)
        serving["call_timeout_s"] = pool.timeout
    elif "batch_timeout" in batcher_options or batcher_options.get("run_in_thread") is False:
        # the app's own choice (a sync fn run inline on the loop cannot be given up)
        serving["call_timeout_s"] = batcher_options.get("batch_timeout")
    else:  # a call here cannot be stopped: the batcher gives it up (its thread is abandoned)
        timeout = _call_timeout(call_timeout, latency_target_ms, batch_seconds, size)
        batcher_options = {**batcher_options, "batch_timeout": timeout}
        serving["call_timeout_s"] = timeout
    logger.info("serving %s: %s", name, reason)
    if pool is not None and pool.cpus_shared_warning:  # another server process's pool
        serving["warning"] = pool.cpus_shared_warning
    options = {"policy": "adaptive", **limits, **hooks, **batcher_options}
    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
        call, max_batch_size=size, max_wait_ms=max_wait_ms, **options
    )
    managed = svc.manage(batcher, name=name, labels=labels)
    if pool is not None:  # the standard worker metrics (the dashboard's) follow this pool
        counts = track(svc.recorder, PoolWorkers(pool), name, True, labels)
        with svc._lock:  # unless shutdown closed the pool meanwhile (it would stay tracked)
            if not svc._stale() and any(obj is pool for _, obj in svc._managed):
                svc._registered.attach(pool, counts)
    return managed


def _start_and_measure(
    svc: FastInferService,
    init: Callable[[], Any],
    fn: Callable[[Any, Any], Any],
    batch: Any,
    size: int,
    processes: int,
    latency_target_ms: float,
    startup_timeout: float,
    name: str,
    collate: Any = None,
) -> tuple[Callable[[Any], Any], AdmissionLimits, PinnedPool | None]:
    """Start the workers (or run ``init`` here), check that ``fn``'s output on the example
    batch splits into one result per item, and measure a full batch: (call, limits, pool)."""
    from fastinfer.integrations._sizing import through_pool
    from fastinfer.pool import PinnedPool

    pool: PinnedPool | None = None
    call: Callable[[Any], Any]
    if processes:
        with svc.phase("workers"):  # each worker runs init once, pinned, its threads set
            pool = svc.manage(
                # warmup: a replacement worker (after a crash or a timeout) starts warm too
                PinnedPool(
                    init, fn, workers=processes, warmup=batch, startup_timeout=startup_timeout
                ),
                name=f"{name}_pool",
                standard=False,
            )
            pool.wait_ready()  # a worker whose init failed: the measurement below raises why
        sized: Any = pool
        once = through_pool(pool)

        def gave_up(pool: PinnedPool = pool) -> bool:
            s = pool.statistics()
            return bool(getattr(s, "gave_up", False) or s.closed)

        # the request a crash was isolated to is told not to send it again (_answers.py)
        call = marking_lone_crashes(pool.run, gave_up, WorkerCrashed)
    else:
        with svc.phase("load"):
            state = init()
        call = sized = once = functools.partial(fn, state)
    with svc.phase("measure"):  # a full batch's cost, through the workers (also the warm-up)
        # an output the batcher cannot split fails every request: fail the setup instead
        check_splittable(once(batch), size, collate, name)
        limits = svc.admission(
            sized, batch, latency_target_ms=latency_target_ms, batch_size=size, name=name
        )
    return call, limits, pool

"""The DynamicBatcher: the public object, loop binding, statistics and configuration.

Admission lives in ``_admission.py``, batch formation in ``_forming.py``, batch execution in
``_running.py``, closing in ``_lifecycle.py``; the state they share is declared in ``_core.py``;
the data options are a :class:`BatcherConfig` (``_config.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

from fastinfer._common.quantiles import summary
from fastinfer.batching._admission import Admission
from fastinfer.batching._bridge import HomeLost, discard, wait_async, wait_sync
from fastinfer.batching._collate import Collator, default_length, make_collator
from fastinfer.batching._config import BatcherConfig
from fastinfer.batching._core import CLOSED, CLOSING, OPEN, WINDOW
from fastinfer.batching._cost_model import ArrivalRate, CostModel
from fastinfer.batching._forming import Forming
from fastinfer.batching._lifecycle import Lifecycle
from fastinfer.batching._loop import Clock, Handle, LoopClock, LoopThread, UnboundClock
from fastinfer.batching._records import (
    DISPATCH_REASONS,
    BatcherStatistics,
    BatchRecord,
    RequestRecord,
)
from fastinfer.batching._request import DONE, QUEUED, BatchRun, Request
from fastinfer.batching._running import Running
from fastinfer.batching._threads import SlotPool
from fastinfer.errors import ConfigError, WouldBlockError

__all__ = ["DynamicBatcher"]

T = TypeVar("T")
R = TypeVar("R")

# Keyword defaults of DynamicBatcher: a keyword left at its default may go with config=.
_DEFAULTS: dict[str, Any] = {
    "max_concurrent_batches": 1,
    "prefetch_batches": 0,
    "policy": "fixed",
    "pad_to_preferred": False,
    "on_error": "isolate",
    "run_in_thread": True,
    "own_loop": False,
    "name": "DynamicBatcher",
}


class DynamicBatcher(Lifecycle, Forming, Running, Admission, Generic[T, R]):
    """Batch concurrent single-item requests into calls of ``fn`` on lists (or collated batches).

    ``fn(items) -> results`` gets a list of items (or, with ``collate``, one collated batch) and
    returns one result per item: a list, or a tensor/dict/tuple batched on dim 0. A sync ``fn``
    runs in a worker thread (the event loop never blocks); an async ``fn`` is awaited.

    Args:
        max_batch_size: most items in one call.
        max_wait_ms: longest time the oldest queued request waits for company while a slot is
            free (the adaptive policy's cap).
        max_concurrent_batches: executor slots; a batch is sealed only when one is free.
        prefetch_batches: batches ``fn`` may hold queued behind the ones it runs (a
            :class:`fastinfer.PinnedPool`'s ``workers x prefetch``), so a slot never waits for
            this loop between batches. Such a batch is sealed by the same policy, whole; its
            execution time is counted from when a slot frees (not its wait in ``fn``'s queue).
        max_queue_size: queued requests beyond which ``submit`` raises ``QueueFull`` at once
            (default unbounded).
        timeout: default per-request deadline in seconds (``submit(timeout=)`` overrides it).
        batch_timeout: longest one call of ``fn`` may take, in seconds (default None: no
            limit). A call past it is given up: an async ``fn`` is cancelled, a sync one's thread
            is abandoned and replaced; its callers get ``DeadlineExceeded`` and the slot serves
            the next batch. Set it above the slowest legitimate batch, a cold first call included.
        policy: ``"fixed"`` (wait up to ``max_wait_ms``) or ``"adaptive"`` (dispatch as soon as
            waiting no longer lowers expected latency, from an online fit of the batch cost and
            the arrival rate).
        latency_target_ms: admit a request only when its predicted latency meets the target
            (``QueueFull`` otherwise); an admitted request gets ``DeadlineExceeded`` rather than
            a late result. Admission plans for 95% of the target: the rest absorbs what the
            cost model cannot see (timer and thread wake-up jitter, the caller's own wake-up).
        preferred_batch_sizes: sizes ``fn`` is fast at (e.g. those a compiled model was warmed
            up for); batches are cut to the largest one that fits, or with ``pad_to_preferred``
            padded up to the next one by repeating the last item (its results are dropped).
        cost_fn, max_batch_cost: a per-item cost (e.g. tokens) and a budget per batch; the item
            that does not fit waits at the front of the queue (FIFO is kept).
        collate: ``None`` (``fn`` gets the list), ``"stack"``, ``"pad"``, or a collator such as
            ``PadCollate(pad_value=0, side="left")``.
        bucket_window: with this many oldest queued items, group items of similar length
            (``length_fn``) to cut padding; the oldest queued item is always in the next batch,
            so no item waits longer than under FIFO with batches of one.
        on_error: ``"isolate"`` (bisect a failed batch so only bad items fail, each with its own
            exception) or ``"fail_batch"`` (every caller gets a ``BatchError``).
        run_in_thread: run a sync ``fn`` in a worker thread (default) or inline on the loop
            (only for trivial ``fn``).
        own_loop: always run on a private event-loop thread (async callers on any loop bridge
            to it); by default the batcher binds to the first caller's loop.
        clock: a time source ``() -> seconds``, or an object with ``time()`` and
            ``call_at(when, callback)`` such as :class:`fastinfer.testing.ManualClock`.
        on_batch, on_request: callbacks receiving a :class:`BatchRecord` / :class:`RequestRecord`
            (on the batcher's loop; keep them cheap).

    Raises (from ``submit``): ``QueueFull``, ``DeadlineExceeded``, ``ClosedError``,
    ``BatchError``, or the exception ``fn`` raised for that item.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
        max_concurrent_batches: int = 1,
        prefetch_batches: int = 0,
        max_queue_size: int | None = None,
        timeout: float | None = None,
        batch_timeout: float | None = None,
        policy: Literal["fixed", "adaptive"] = "fixed",
        latency_target_ms: float | None = None,
        preferred_batch_sizes: Sequence[int] | None = None,
        pad_to_preferred: bool = False,
        cost_fn: Callable[[T], float] | None = None,
        max_batch_cost: float | None = None,
        collate: Literal["stack", "pad"] | Collator | None = None,
        bucket_window: int | None = None,
        length_fn: Callable[[T], int] | None = None,
        on_error: Literal["isolate", "fail_batch"] = "isolate",
        run_in_thread: bool = True,
        own_loop: bool = False,
        clock: Callable[[], float] | Clock | None = None,
        on_batch: Callable[[BatchRecord], Any] | None = None,
        on_request: Callable[[RequestRecord], Any] | None = None,
        name: str = "DynamicBatcher",
        config: BatcherConfig | None = None,
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"fn must be callable (items -> results), got {fn!r}")
        options: dict[str, Any] = {
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_concurrent_batches": max_concurrent_batches,
            "prefetch_batches": prefetch_batches,
            "max_queue_size": max_queue_size,
            "timeout": timeout,
            "batch_timeout": batch_timeout,
            "policy": policy,
            "latency_target_ms": latency_target_ms,
            "preferred_batch_sizes": None
            if preferred_batch_sizes is None
            else tuple(preferred_batch_sizes),
            "pad_to_preferred": pad_to_preferred,
            "max_batch_cost": max_batch_cost,
            "bucket_window": bucket_window,
            "on_error": on_error,
            "run_in_thread": run_in_thread,
            "own_loop": own_loop,
            "name": name,
        }
        if config is not None:
            if not isinstance(config, BatcherConfig):
                raise ConfigError(f"config must be a BatcherConfig, got {type(config).__name__}")
            given = {k for k, v in options.items() if v is not None and v != _DEFAULTS.get(k)}
            if given:
                raise ConfigError(
                    f"pass options either in config= or as keywords, not both (got {sorted(given)} "
                    "beside config=); use config.replace(...) to change a config"
                )
        else:
            if max_batch_size is None or max_wait_ms is None:
                raise ConfigError(
                    "DynamicBatcher needs max_batch_size and max_wait_ms (or config=BatcherConfig(...))"
                )
            config = BatcherConfig(**options)  # validates every value
        self._fn = fn
        call = getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
        self._apply_config(config)
        if config.batch_timeout is not None and not self._is_async and not config.run_in_thread:
            raise ConfigError(
                "batch_timeout cannot interrupt a sync fn that runs inline on the event loop "
                "(run_in_thread=False); use run_in_thread=True (the default) or drop batch_timeout"
            )
        if (cost_fn is None) != (config.max_batch_cost is None):
            raise ConfigError("cost_fn and max_batch_cost go together: pass both or neither")
        self._cost_fn = cost_fn
        self._collator = make_collator(collate)
        self._length_fn: Callable[[Any], int] = length_fn or default_length
        if clock is not None and not (callable(clock) or hasattr(clock, "call_at")):
            raise ConfigError(
                "clock must be a callable returning seconds or an object with time() and "
                f"call_at(when, callback), got {clock!r}"
            )
        self._clock_arg = clock
        self._on_batch = on_batch
        self._on_request = on_request

        self._state = OPEN
        self._bind_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._thread: LoopThread | None = None
        self._clock: Clock = UnboundClock()  # replaced when bound to a loop
        self._executor: SlotPool | None = None
        self._queues: dict[int, deque[Request]] = {}
        self._priorities: list[int] = []  # descending
        self._depth = 0
        self._queued_cost = 0.0
        self._in_flight = 0
        self._runs: dict[int, BatchRun] = {}
        self._batch_ids = 0
        self._timer: Handle | None = None
        self._timer_at: float | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._cost = CostModel()
        self._arrivals = ArrivalRate()
        self._counts = dict.fromkeys(
            ("submitted", "ok", "failed", "rejected", "expired", "cancelled"), 0
        )
        self._batches_run = 0
        self._padded_items = 0
        self._bisections = 0
        self._timed_out = 0
        self._aborted_batches = 0
        self._probes = 0
        self._probe_at = float("-inf")
        self._probe_backoff = 0.0
        self._reasons = dict.fromkeys(DISPATCH_REASONS, 0)
        self._sizes: dict[int, int] = {}
        self._waits: deque[float] = deque(maxlen=WINDOW)
        self._latencies: deque[float] = deque(maxlen=WINDOW)
        self._exec_times: deque[float] = deque(maxlen=WINDOW)
        self._callback_failed = False
        self._pid: int | None = None  # set when bound: a forked copy cannot use it
        self._shutting = False
        self._shut = concurrent.futures.Future[None]()

    # ---------------------------------------------------------------- configuration & state

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_wait_ms(self) -> float:
        return self._max_wait * 1000.0

    @property
    def max_concurrent_batches(self) -> int:
        return self._max_concurrent

    @property
    def closed(self) -> bool:
        return self._state != OPEN

    def configure(
        self,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
        max_concurrent_batches: int | None = None,
        prefetch_batches: int | None = None,
        max_queue_size: int | None = None,
        latency_target_ms: float | None = None,
    ) -> None:
        """Change limits at run time (thread-safe); queued requests see the new values at once.

        Values are validated as in :class:`BatcherConfig`; preferred batch sizes stay fixed.
        """
        changes = {
            k: v
            for k, v in {
                "max_batch_size": max_batch_size,
                "max_wait_ms": max_wait_ms,
                "max_concurrent_batches": max_concurrent_batches,
                "prefetch_batches": prefetch_batches,
                "max_queue_size": max_queue_size,
                "latency_target_ms": latency_target_ms,
            }.items()
            if v is not None
        }
        if (
            max_batch_size is not None
            and self._preferred
            and isinstance(max_batch_size, int)
            and self._preferred[-1] > max_batch_size > 0
        ):
            raise ConfigError(
                f"max_batch_size={max_batch_size} is below the largest preferred batch size "
                f"{self._preferred[-1]}; preferred sizes are fixed at construction"
            )
        config = self._config.replace(**changes)  # validates
        if (forked := self._forked_error()) is not None:
            raise forked

        def apply() -> None:
            if self._executor is not None:
                self._executor.resize(config.max_concurrent_batches)
            self._apply_config(config)
            if self._loop is not None and not self._loop.is_closed():
                self._schedule()

        self._run_on_loop(apply)

    def _apply_config(self, config: BatcherConfig) -> None:
        self._config = config
        self._max_batch_size = config.max_batch_size
        self._max_wait = config.max_wait_seconds
        self._max_concurrent = config.max_concurrent_batches
        self._prefetch = config.prefetch_batches
        self._max_queue_size = config.max_queue_size
        self._timeout = config.timeout
        self._batch_timeout = config.batch_timeout
        self._policy = config.policy
        self._target = config.latency_target_seconds
        self._preferred = list(config.preferred_batch_sizes or ())
        self._pad = config.pad_to_preferred
        self._max_cost = config.max_batch_cost
        self._bucket_window = config.bucket_window
        self._on_error = config.on_error
        self._run_in_thread = config.run_in_thread
        self._own_loop = config.own_loop
        self._name = config.name

    @property
    def config(self) -> BatcherConfig:
        """The batcher's current options (``configure()`` replaces it)."""
        return self._config

    def _run_on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if (
            loop is None
            or loop.is_closed()
            or not loop.is_running()
            or threading.get_ident() == self._loop_thread_id
        ):
            fn()
        else:
            done = concurrent.futures.Future[None]()

            def run() -> None:
                try:
                    fn()
                    done.set_result(None)
                except BaseException as e:  # pragma: no cover - validated before
                    done.set_exception(e)

            loop.call_soon_threadsafe(run)
            done.result()

    def statistics(self) -> BatcherStatistics:
        """A frozen snapshot of queue, outcomes, distributions and the current configuration."""
        sizes = dict(self._sizes)
        n_batches = sum(sizes.values())
        return BatcherStatistics(
            queue_depth=self._depth,
            batches_in_flight=self._in_flight,
            batches_run=self._batches_run,
            requests_submitted=self._counts["submitted"],
            requests_ok=self._counts["ok"],
            requests_failed=self._counts["failed"],
            requests_rejected=self._counts["rejected"],
            requests_expired=self._counts["expired"],
            requests_cancelled=self._counts["cancelled"],
            padded_items=self._padded_items,
            bisections=self._bisections,
            batches_timed_out=self._timed_out,
            batches_aborted=self._aborted_batches,
            abandoned_threads=0 if self._executor is None else self._executor.abandoned,
            cost_probes=self._probes,
            dispatch_reasons=dict(self._reasons),
            batch_size_counts=dict(sorted(sizes.items())),
            batch_size_mean=(sum(k * v for k, v in sizes.items()) / n_batches)
            if n_batches
            else 0.0,
            queue_wait_seconds=summary(list(self._waits)),
            request_latency_seconds=summary(list(self._latencies)),
            batch_execution_seconds=summary(list(self._exec_times)),
            cost_per_item_seconds=self._cost.a,
            cost_per_batch_seconds=self._cost.b,
            arrival_rate=self._arrivals.rate(self._clock.time()) if self._loop else 0.0,
            max_batch_size=self._max_batch_size,
            max_wait_ms=self._max_wait * 1000.0,
            max_concurrent_batches=self._max_concurrent,
            prefetch_batches=self._prefetch,
            closed=self._state == CLOSED,
        )

    def __repr__(self) -> str:
        state = {OPEN: "open", CLOSING: "closing", CLOSED: "closed"}[self._state]
        return (
            f"<{self._name} {state} max_batch_size={self._max_batch_size} "
            f"max_wait_ms={self._max_wait * 1000:g} policy={self._policy!r} "
            f"queued={self._depth} in_flight={self._in_flight}>"
        )

    # ---------------------------------------------------------------- loop binding

    def _idle(self) -> bool:
        return self._depth == 0 and self._in_flight == 0

    def _attach(self, loop: asyncio.AbstractEventLoop, thread_id: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None
        if self._depth or self._in_flight:  # stale work on a dead loop: its callers are gone
            for q in self._queues.values():
                for r in q:
                    if r.state == QUEUED:
                        r.state = DONE
                        self._count("cancelled", r, None)
            self._queues.clear()
            self._priorities.clear()
            self._depth, self._queued_cost, self._in_flight = 0, 0.0, 0
            for run in self._runs.values():
                run.finished = True
            self._runs.clear()
        self._loop = loop
        self._loop_thread_id = thread_id
        self._pid = os.getpid()
        clock = self._clock_arg
        if clock is not None and hasattr(clock, "call_at"):
            self._clock = clock  # type: ignore[assignment]
        else:
            self._clock = LoopClock(loop, clock)  # type: ignore[arg-type]

    def _bind_async(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Bind to the caller's loop if unbound; True when ``loop`` is the batcher's home.

        A home loop that is closed, or stopped while the batcher holds nothing (a pytest-asyncio
        session fixture's loop between tests, a loop kept for ``run_until_complete``), is left
        for the caller's. One that is stopped while it holds requests cannot run a new one:
        ``WouldBlockError`` says so, where a request sent there would wait forever."""
        home = self._loop
        if home is loop:
            return True
        with self._bind_lock:
            if self._state != OPEN:  # closed meanwhile: start no loop thread
                raise self._closed_error()
            home = self._loop
            stopped = home is not None and not home.is_closed() and not home.is_running()
            if stopped and not self._idle():
                raise WouldBlockError(
                    f"this {self._name} holds {self._depth} queued request(s) and "
                    f"{self._in_flight} running batch(es) on an event loop that is not running "
                    "(the loop it was first used on, stopped but not closed: a pytest-asyncio "
                    "session-scoped fixture's loop, a loop kept for run_until_complete), so a "
                    "request submitted now would wait for it forever. Fix: run that loop until "
                    "its requests finish (or `await batcher.aclose()` on it), create the batcher "
                    "on the loop that uses it, or pass own_loop=True"
                )
            if home is None or home.is_closed() or stopped:
                if self._own_loop:
                    self._start_own_loop()
                else:
                    self._attach(loop, threading.get_ident())
            return self._loop is loop

    def _start_own_loop(self) -> None:
        self._thread = LoopThread(f"fastinfer-{self._name}-loop")
        assert self._thread.thread.ident is not None
        self._attach(self._thread.loop, self._thread.thread.ident)

    def _bind_sync(self) -> asyncio.AbstractEventLoop:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with self._bind_lock:
            if self._state != OPEN:  # closed meanwhile: start no loop thread
                raise self._closed_error()
            home = self._loop
            if home is None or home.is_closed():
                self._start_own_loop()
            elif home is running and self._thread is not None and home is self._thread.loop:
                raise WouldBlockError(
                    f"submit_sync() was called on this {self._name}'s own loop thread (from an "
                    "on_batch/on_request callback, or code scheduled on that loop), where "
                    "blocking would stall every request it serves. Fix: `await batcher.submit("
                    "item)` in a task there, or call submit_sync from another thread"
                )
            elif home is running or not home.is_running():
                if not self._idle() and home is running:
                    raise WouldBlockError(
                        f"submit_sync() was called on the thread that runs this {self._name}'s "
                        "event loop while it holds requests; blocking here would deadlock. Use "
                        "`await batcher.submit(item)` in async code, or create the batcher with "
                        "own_loop=True"
                    )
                if not self._idle():
                    raise WouldBlockError(
                        f"the event loop this {self._name} is bound to is stopped (not closed) "
                        "and holds requests, which can only run on it; submit_sync() would wait "
                        "until someone runs it. Run that loop again (or `await "
                        "batcher.aclose()` on it), or create the batcher with own_loop=True"
                    )
                self._start_own_loop()  # idle: move to a private loop thread
        assert self._loop is not None
        return self._loop

    # ---------------------------------------------------------------- submitting

    async def submit(self, item: T, *, timeout: float | None = None, priority: int = 0) -> R:
        """Queue ``item`` and wait for its result.

        ``timeout`` (seconds) overrides the default deadline; a higher ``priority`` is served
        first (strict priority: lower levels wait while higher ones are queued). Cancelling the
        awaiting task removes a queued item (it never runs) or discards a running item's result.

        Raises:
            QueueFull: at once, when the queue is full or the latency target cannot be met
                (``retry_after`` says when to retry).
            DeadlineExceeded: the deadline passed first.
            ClosedError: the batcher is closed or closing; it is bound to another process (this
                one is a fork); or the loop it is bound to ended while the request waited.
            BatchError: ``fn`` broke its contract (e.g. returned the wrong number of results).
            WouldBlockError: called from inside this batcher's own ``fn``, or the loop it is
                bound to stopped while the request waited.
        """
        if (forked := self._forked_error()) is not None:
            raise forked
        if self._state != OPEN:
            raise self._closed_error()
        self._refuse_reentry("submit()")
        loop = asyncio.get_running_loop()
        if self._bind_async(loop):
            return await self._enqueue(item, timeout, priority)
        home = self._loop
        assert home is not None
        try:  # the home loop may end before it runs the request, or while it waits there
            coro = self._submit_home(item, timeout, priority)
            try:
                cf = asyncio.run_coroutine_threadsafe(coro, home)
            except RuntimeError:  # closed since _bind_async looked
                coro.close()
                raise HomeLost("closed") from None
            try:
                return await wait_async(cf, home, self._patience(timeout))
            except HomeLost:
                discard(coro, cf, home)
                raise
        except HomeLost as e:
            raise self._home_lost_error(e.how) from None

    def submit_sync(self, item: T, *, timeout: float | None = None, priority: int = 0) -> R:
        """Blocking twin of :meth:`submit`, safe from any thread (a Jupyter cell included).

        With no running home loop, the batcher starts its own loop thread. Raises
        ``WouldBlockError`` when called on the thread of a home loop that holds requests, on the
        batcher's own loop thread (an ``on_batch``/``on_request`` callback), or from inside this
        batcher's own ``fn``.
        """
        if (forked := self._forked_error()) is not None:
            raise forked
        if self._state != OPEN:
            raise self._closed_error()
        self._refuse_reentry("submit_sync()")
        loop = self._bind_sync()
        coro = self._submit_home(item, timeout, priority)
        try:
            cf = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed since _bind_sync (a concurrent close())
            coro.close()
            raise self._home_lost_error("closed") from None
        try:
            return wait_sync(cf, loop, self._patience(timeout))
        except HomeLost as e:  # the loop ended before it answered (a concurrent close())
            discard(coro, cf, loop)
            raise self._home_lost_error(e.how) from None
        except BaseException:
            cf.cancel()  # KeyboardInterrupt etc.: the queued item is withdrawn
            raise

    def _patience(self, timeout: float | None) -> float | None:
        """How long a request bridged to a stopped (not closed) home loop waits for it to run
        again: its own time limit, which a stopped loop's timers cannot enforce."""
        return timeout if timeout is not None else self._timeout

    async def _submit_home(self, item: T, timeout: float | None, priority: int) -> R:
        return await self._enqueue(item, timeout, priority)

"""The DynamicBatcher itself: queueing, batch formation, execution, error isolation, lifecycle."""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import functools
import inspect
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

from fastinfer._batching.collate import Collator, default_length, make_collator, split_output
from fastinfer._batching.loop import (
    Clock,
    Handle,
    LoopClock,
    LoopThread,
    UnboundClock,
    WouldBlockError,
)
from fastinfer._batching.model import ArrivalRate, CostModel, wait_threshold
from fastinfer._batching.records import (
    DISPATCH_REASONS,
    BatcherStatistics,
    BatchRecord,
    RequestRecord,
    summary,
)
from fastinfer.errors import BatchError, ClosedError, ConfigError, DeadlineExceeded, QueueFull

__all__ = ["DynamicBatcher"]

logger = logging.getLogger("fastinfer.batching")

T = TypeVar("T")
R = TypeVar("R")

_QUEUED, _RUNNING, _DONE = 0, 1, 2  # request states
_OPEN, _CLOSING, _CLOSED = 0, 1, 2  # batcher states
_WINDOW = 10_000  # samples kept for the distributions in statistics()
_DISCARD = object()
_HEADROOM = 0.95  # latency_target_ms: admission and dispatch plan for this share of the target


class _ContractError(Exception):
    """fn broke the result contract (wrong length, unsplittable output): fail, do not bisect."""


class _Request:
    __slots__ = (
        "arrival",
        "cost",
        "deadline",
        "future",
        "item",
        "length",
        "priority",
        "started",
        "state",
        "timer",
    )

    def __init__(self, item: Any, future: asyncio.Future[Any], arrival: float, priority: int):
        self.item = item
        self.future = future
        self.arrival = arrival
        self.priority = priority
        self.deadline: float | None = None
        self.cost = 1.0
        self.length = 0
        self.started: float | None = None
        self.state = _QUEUED
        self.timer: Handle | None = None


class _Started:
    """A first call of ``fn`` already running in the worker thread (see ``_start``)."""

    __slots__ = ("ctx", "future", "size", "t0")

    def __init__(self, future: asyncio.Future[Any], ctx: Any, size: int, t0: float) -> None:
        self.future, self.ctx, self.size, self.t0 = future, ctx, size, t0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _non_negative(name: str, value: Any, unit: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"{name} must be a number >= 0{unit}, got {value!r}")
    return float(value)


def _optional_positive(name: str, value: Any, unit: str = "") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be None or a number > 0{unit}, got {value!r}")
    return float(value)


class DynamicBatcher(Generic[T, R]):
    """Batch concurrent single-item requests into calls of ``fn`` on lists (or collated batches).

    ``fn(items) -> results`` gets a list of items (or, with ``collate``, one collated batch) and
    returns one result per item: a list, or a tensor/dict/tuple batched on dim 0. A sync ``fn``
    runs in a worker thread (the event loop never blocks); an async ``fn`` is awaited.

    Args:
        max_batch_size: most items in one call.
        max_wait_ms: longest time the oldest queued request waits for company while a slot is
            free (the adaptive policy's cap).
        max_concurrent_batches: executor slots; a batch is sealed only when one is free.
        max_queue_size: queued requests beyond which ``submit`` raises ``QueueFull`` at once
            (default unbounded).
        timeout: default per-request deadline in seconds (``submit(timeout=)`` overrides it).
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
        max_batch_size: int,
        max_wait_ms: float,
        max_concurrent_batches: int = 1,
        max_queue_size: int | None = None,
        timeout: float | None = None,
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
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"fn must be callable (items -> results), got {fn!r}")
        self._fn = fn
        call = getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
        self._max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self._max_wait = _non_negative("max_wait_ms", max_wait_ms, " (milliseconds)") / 1000.0
        self._max_concurrent = _positive_int("max_concurrent_batches", max_concurrent_batches)
        self._max_queue_size = (
            None if max_queue_size is None else _positive_int("max_queue_size", max_queue_size)
        )
        self._timeout = _optional_positive("timeout", timeout, " (seconds)")
        if policy not in ("fixed", "adaptive"):
            raise ConfigError(f"policy must be 'fixed' or 'adaptive', got {policy!r}")
        self._policy = policy
        target = _optional_positive("latency_target_ms", latency_target_ms, " (milliseconds)")
        self._target = None if target is None else target / 1000.0
        self._preferred: list[int] = []
        if preferred_batch_sizes is not None:
            sizes = sorted(
                {_positive_int("preferred_batch_sizes[i]", s) for s in preferred_batch_sizes}
            )
            if not sizes:
                raise ConfigError("preferred_batch_sizes must not be empty (or pass None)")
            if sizes[-1] > max_batch_size:
                raise ConfigError(
                    f"preferred_batch_sizes {sizes} has sizes above max_batch_size={max_batch_size}; "
                    "drop them or raise max_batch_size"
                )
            self._preferred = sizes
        if pad_to_preferred and not self._preferred:
            raise ConfigError("pad_to_preferred=True needs preferred_batch_sizes")
        self._pad = bool(pad_to_preferred)
        if (cost_fn is None) != (max_batch_cost is None):
            raise ConfigError("cost_fn and max_batch_cost go together: pass both or neither")
        self._cost_fn = cost_fn
        self._max_cost = _optional_positive("max_batch_cost", max_batch_cost)
        self._collator = make_collator(collate)
        if bucket_window is not None and _positive_int("bucket_window", bucket_window) < 2:
            raise ConfigError(f"bucket_window must be >= 2 items, got {bucket_window!r}")
        self._bucket_window = bucket_window
        self._length_fn: Callable[[Any], int] = length_fn or default_length
        if on_error not in ("isolate", "fail_batch"):
            raise ConfigError(f"on_error must be 'isolate' or 'fail_batch', got {on_error!r}")
        self._on_error = on_error
        self._run_in_thread = bool(run_in_thread)
        self._own_loop = bool(own_loop)
        if clock is not None and not (callable(clock) or hasattr(clock, "call_at")):
            raise ConfigError(
                "clock must be a callable returning seconds or an object with time() and "
                f"call_at(when, callback), got {clock!r}"
            )
        self._clock_arg = clock
        self._on_batch = on_batch
        self._on_request = on_request
        self._name = name

        self._state = _OPEN
        self._bind_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._thread: LoopThread | None = None
        self._clock: Clock = UnboundClock()  # replaced when bound to a loop
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queues: dict[int, deque[_Request]] = {}
        self._priorities: list[int] = []  # descending
        self._depth = 0
        self._queued_cost = 0.0
        self._in_flight = 0
        self._running_ends: dict[int, float] = {}
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
        self._reasons = dict.fromkeys(DISPATCH_REASONS, 0)
        self._sizes: dict[int, int] = {}
        self._waits: deque[float] = deque(maxlen=_WINDOW)
        self._latencies: deque[float] = deque(maxlen=_WINDOW)
        self._exec_times: deque[float] = deque(maxlen=_WINDOW)
        self._callback_failed = False

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
        return self._state != _OPEN

    def configure(
        self,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
        max_concurrent_batches: int | None = None,
        max_queue_size: int | None = None,
        latency_target_ms: float | None = None,
    ) -> None:
        """Change limits at run time (thread-safe); queued requests see the new values at once."""
        if max_batch_size is not None:
            _positive_int("max_batch_size", max_batch_size)
            if self._preferred and self._preferred[-1] > max_batch_size:
                raise ConfigError(
                    f"max_batch_size={max_batch_size} is below the largest preferred batch size "
                    f"{self._preferred[-1]}; preferred sizes are fixed at construction"
                )
        wait = None if max_wait_ms is None else _non_negative("max_wait_ms", max_wait_ms) / 1000
        if max_concurrent_batches is not None:
            _positive_int("max_concurrent_batches", max_concurrent_batches)
        if max_queue_size is not None:
            _positive_int("max_queue_size", max_queue_size)
        target = _optional_positive("latency_target_ms", latency_target_ms)

        def apply() -> None:
            if max_batch_size is not None:
                self._max_batch_size = max_batch_size
            if wait is not None:
                self._max_wait = wait
            if max_concurrent_batches is not None:
                if max_concurrent_batches > self._max_concurrent and self._executor is not None:
                    old, self._executor = self._executor, None
                    old.shutdown(wait=False)  # running calls finish; new ones use a larger pool
                self._max_concurrent = max_concurrent_batches
            if max_queue_size is not None:
                self._max_queue_size = max_queue_size
            if target is not None:
                self._target = target / 1000
            if self._loop is not None and not self._loop.is_closed():
                self._schedule()

        self._run_on_loop(apply)

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
            closed=self._state == _CLOSED,
        )

    def __repr__(self) -> str:
        state = {_OPEN: "open", _CLOSING: "closing", _CLOSED: "closed"}[self._state]
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
                    if r.state == _QUEUED:
                        r.state = _DONE
                        self._count("cancelled", r, None)
            self._queues.clear()
            self._priorities.clear()
            self._depth, self._queued_cost, self._in_flight = 0, 0.0, 0
            self._running_ends.clear()
        self._loop = loop
        self._loop_thread_id = thread_id
        clock = self._clock_arg
        if clock is not None and hasattr(clock, "call_at"):
            self._clock = clock  # type: ignore[assignment]
        else:
            self._clock = LoopClock(loop, clock)  # type: ignore[arg-type]

    def _bind_async(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Bind to the caller's loop if unbound; True when ``loop`` is the batcher's home."""
        home = self._loop
        if home is loop:
            return True
        with self._bind_lock:
            if self._loop is None or self._loop.is_closed():
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
            home = self._loop
            if home is None or home.is_closed():
                self._start_own_loop()
            elif home is running or not home.is_running():
                if not self._idle():
                    raise WouldBlockError(
                        f"submit_sync() was called on the thread that runs this {self._name}'s "
                        "event loop while it holds requests; blocking here would deadlock. Use "
                        "`await batcher.submit(item)` in async code, or create the batcher with "
                        "own_loop=True"
                    )
                self._start_own_loop()  # idle: move to a private loop thread
        assert self._loop is not None
        return self._loop

    # ---------------------------------------------------------------- submitting

    def _closed_error(self) -> ClosedError:
        if self._state == _CLOSING:
            return ClosedError(f"cannot submit to a {self._name} that is closing")
        return ClosedError(f"cannot submit to a closed {self._name}")

    async def submit(self, item: T, *, timeout: float | None = None, priority: int = 0) -> R:
        """Queue ``item`` and wait for its result.

        ``timeout`` (seconds) overrides the default deadline; a higher ``priority`` is served
        first (strict priority: lower levels wait while higher ones are queued). Cancelling the
        awaiting task removes a queued item (it never runs) or discards a running item's result.

        Raises:
            QueueFull: at once, when the queue is full or the latency target cannot be met
                (``retry_after`` says when to retry).
            DeadlineExceeded: the deadline passed first.
            ClosedError: the batcher is closed or closing.
            BatchError: ``fn`` broke its contract (e.g. returned the wrong number of results).
        """
        if self._state != _OPEN:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        if self._bind_async(loop):
            return await self._enqueue(item, timeout, priority)
        assert self._loop is not None
        cf = asyncio.run_coroutine_threadsafe(
            self._submit_home(item, timeout, priority), self._loop
        )
        return await asyncio.wrap_future(cf)

    def submit_sync(self, item: T, *, timeout: float | None = None, priority: int = 0) -> R:
        """Blocking twin of :meth:`submit`, safe from any thread (a Jupyter cell included).

        With no running home loop, the batcher starts its own loop thread. Raises
        ``WouldBlockError`` only when called on the thread of a home loop that holds requests.
        """
        if self._state != _OPEN:
            raise self._closed_error()
        loop = self._bind_sync()
        cf = asyncio.run_coroutine_threadsafe(self._submit_home(item, timeout, priority), loop)
        try:
            return cf.result()
        except BaseException:
            cf.cancel()  # KeyboardInterrupt etc.: the queued item is withdrawn
            raise

    async def _submit_home(self, item: T, timeout: float | None, priority: int) -> R:
        return await self._enqueue(item, timeout, priority)

    def _enqueue(self, item: Any, timeout: float | None, priority: int) -> asyncio.Future[Any]:
        if self._state != _OPEN:
            raise self._closed_error()
        if timeout is not None:
            _optional_positive("timeout", timeout, " (seconds)")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"priority must be an int (higher runs first), got {priority!r}")
        now = self._clock.time()
        self._arrivals.observe(now)
        self._counts["submitted"] += 1
        if self._max_queue_size is not None and self._depth >= self._max_queue_size:
            retry = self._retry_after(now)
            self._reject(now, priority)
            raise QueueFull(
                f"{self._name} queue is full ({self._depth} requests waiting, "
                f"max_queue_size={self._max_queue_size}); retry after ~{retry * 1000:.0f} ms",
                retry_after=retry,
            )
        if self._target is not None:
            predicted = self._predict_latency(now, self._depth + 1)
            plan = self._target * _HEADROOM
            if predicted is not None and predicted > plan:
                retry = max(predicted - plan, self._cost.predict(1))
                self._reject(now, priority)
                raise QueueFull(
                    f"{self._name} would miss latency_target_ms={self._target * 1000:g}: predicted "
                    f"latency {predicted * 1000:.1f} ms with {self._depth} requests waiting (over "
                    f"the {plan * 1000:.3g} ms it plans for, {_HEADROOM:.0%} of the target); retry after "
                    f"~{retry * 1000:.0f} ms",
                    retry_after=retry,
                )
        assert self._loop is not None
        try:
            cost = float(self._cost_fn(item)) if self._cost_fn is not None else 1.0
            length = self._length_fn(item) if self._bucket_window is not None else 0
        except BaseException:
            self._counts["failed"] += 1
            raise
        fut: asyncio.Future[Any] = self._loop.create_future()
        req = _Request(item, fut, now, priority)
        req.cost, req.length = cost, length
        limit = timeout if timeout is not None else self._timeout
        deadline = None if limit is None else now + limit
        if self._target is not None:
            deadline = now + self._target if deadline is None else min(deadline, now + self._target)
        if deadline is not None:
            req.deadline = deadline
            req.timer = self._clock.call_at(
                deadline, functools.partial(self._on_loop, self._expire, req)
            )
        fut.add_done_callback(functools.partial(self._future_done, req))
        q = self._queues.get(priority)
        if q is None:
            q = self._queues[priority] = deque()
            self._priorities = sorted(self._queues, reverse=True)
        q.append(req)
        self._depth += 1
        self._queued_cost += cost
        self._schedule()
        return fut

    def _reject(self, now: float, priority: int) -> None:
        self._counts["rejected"] += 1
        self._emit_request(RequestRecord("rejected", 0.0, None, None, priority))

    def _retry_after(self, now: float) -> float:
        if self._cost.ready:
            free = self._slot_free_in(now)
            return free + self._cost.predict(self._effective_max())
        return max(self._max_wait, 0.001)

    def _slot_free_in(self, now: float) -> float:
        if self._in_flight < self._max_concurrent or not self._running_ends:
            return 0.0
        return max(0.0, min(self._running_ends.values()) - now)

    def _predict_latency(self, now: float, position: int) -> float | None:
        if not self._cost.ready:
            return None
        cap = self._effective_max()
        batches = math.ceil(position / cap)
        rounds = math.ceil(batches / self._max_concurrent)
        last = position - (batches - 1) * cap
        return (
            self._slot_free_in(now)
            + (rounds - 1) * self._cost.upper(cap)
            + self._cost.upper(last if rounds == 1 else cap)
        )

    # ---------------------------------------------------------------- resolution paths

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Timer callbacks may come from a foreign-thread clock: always run them on the loop."""
        if threading.get_ident() == self._loop_thread_id:
            fn(*args)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _count(self, outcome: str, req: _Request, batch_size: int | None) -> None:
        self._counts[outcome] += 1
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        if self._on_request is not None:
            now = self._clock.time()
            wait = None if req.started is None else req.started - req.arrival
            self._emit_request(
                RequestRecord(outcome, now - req.arrival, wait, batch_size, req.priority)
            )

    def _emit_request(self, record: RequestRecord) -> None:
        if self._on_request is not None:
            self._callback(self._on_request, record)

    def _callback(self, cb: Callable[[Any], Any], record: Any) -> None:
        try:
            cb(record)
        except Exception:
            if not self._callback_failed:
                self._callback_failed = True
                logger.exception("%s callback %r raised (logged once; ignored)", self._name, cb)

    def _unqueue(self, req: _Request) -> None:
        req.state = _DONE
        self._depth -= 1
        self._queued_cost -= req.cost

    def _future_done(self, req: _Request, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            return
        if req.state == _QUEUED:
            self._unqueue(req)
            self._count("cancelled", req, None)
            self._schedule()
        elif req.state == _RUNNING:
            req.state = _DONE  # its result will be discarded
            self._count("cancelled", req, None)

    def _expire(self, req: _Request) -> None:
        req.timer = None
        if req.state == _DONE or req.future.done():
            return
        now = self._clock.time()
        if req.state == _QUEUED:
            self._unqueue(req)
            msg = f"request waited {(now - req.arrival) * 1000:.1f} ms in the queue and passed its deadline"
        else:
            req.state = _DONE
            msg = f"request passed its deadline after {(now - req.arrival) * 1000:.1f} ms while its batch was running; the result is discarded"
        self._count("expired", req, None)
        req.future.set_exception(DeadlineExceeded(msg))
        self._schedule()

    def _resolve(self, req: _Request, value: Any, batch_size: int) -> None:
        if req.state != _RUNNING or req.future.done():
            return  # cancelled or expired while running: discard
        req.state = _DONE
        now = self._clock.time()
        self._latencies.append(now - req.arrival)
        if isinstance(value, BaseException):
            self._count("failed", req, batch_size)
            req.future.set_exception(value)
        else:
            self._count("ok", req, batch_size)
            req.future.set_result(value)

    # ---------------------------------------------------------------- batch formation

    def _effective_max(self) -> int:
        if self._pad:
            return min(self._max_batch_size, self._preferred[-1])
        return self._max_batch_size

    def _oldest(self) -> _Request | None:
        oldest = None
        for p in self._priorities:
            q = self._queues[p]
            while q and q[0].state != _QUEUED:
                q.popleft()
            if q and (oldest is None or q[0].arrival < oldest.arrival):
                oldest = q[0]
        return oldest

    def _schedule(self, notify: bool = True) -> None:
        """Dispatch while a slot is free and the policy says go; else arm the one timer."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        now = self._clock.time()
        wake: float | None = None
        while self._depth > 0 and self._in_flight < self._max_concurrent:
            reason, wake = self._decide(now)
            if reason is None:
                break
            reqs = self._take(now)
            if reqs:
                self._launch(reqs, reason, now)
            wake = None
        if wake is None or self._depth == 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, None
        elif wake != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = wake
            self._timer = self._clock.call_at(
                wake, functools.partial(self._on_loop, self._on_timer)
            )
        if notify:
            self._notify_drained()

    def _notify_drained(self) -> None:
        if self._state != _OPEN and self._idle():
            for w in self._drain_waiters:
                if not w.done():
                    w.set_result(None)
            self._drain_waiters.clear()

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        self._schedule()

    def _decide(self, now: float) -> tuple[str | None, float | None]:
        if self._state != _OPEN:
            return "idle", None  # draining: nothing more can arrive
        if self._depth >= self._effective_max():
            return "full", None
        if self._max_cost is not None and self._queued_cost >= self._max_cost:
            return "full", None
        if self._max_wait <= 0:
            return "idle", None
        oldest = self._oldest()
        if oldest is None:
            return None, None
        wake = oldest.arrival + self._max_wait
        if now >= wake:
            return "wait_expired", None
        ready = self._cost.ready
        if self._target is not None and ready:
            latest = oldest.arrival + self._target * _HEADROOM - self._cost.upper(self._depth)
            if now >= latest:
                return ("adaptive" if self._policy == "adaptive" else "wait_expired"), None
            wake = min(wake, latest)
        if self._policy == "adaptive":
            if not ready:
                return "adaptive", None  # cold start: run now and learn the cost
            rate = self._arrivals.rate(now)
            if self._depth >= wait_threshold(rate, self._cost.a, self._cost.b):
                return "adaptive", None
            # Re-decide when the next arrival is overdue: the rate estimate will have dropped
            # (a closed-loop caller never sends more while it waits for us).
            overdue = self._arrivals.overdue_at()
            if overdue is not None and overdue > now:
                wake = min(wake, overdue)
        return None, wake

    def _take(self, now: float) -> list[_Request]:
        cap = self._effective_max()
        window = max(cap, self._bucket_window or 0)
        cands: list[_Request] = []
        for p in self._priorities:
            for r in self._queues[p]:
                if r.state != _QUEUED:
                    continue
                if r.future.done():  # cancelled; its done-callback has not run yet
                    self._unqueue(r)
                    self._count("cancelled", r, None)
                    continue
                cands.append(r)
                if len(cands) >= window:
                    break
            if len(cands) >= window:
                break
        if self._bucket_window is not None and len(cands) > cap:
            cands = self._bucket(cands, cap)
        else:
            cands = cands[:cap]
        if self._max_cost is not None:
            total, kept = 0.0, list[_Request]()
            for r in cands:
                if kept and total + r.cost > self._max_cost:
                    break  # it waits at the front: FIFO is kept
                kept.append(r)
                total += r.cost
            cands = kept
        if self._preferred and not self._pad and cands:
            i = bisect.bisect_right(self._preferred, len(cands))
            if i:
                cands = cands[: self._preferred[i - 1]]
        if cands and self._cost.ready:
            cands = self._shed_hopeless(cands, now)
        for r in cands:
            self._unqueue(r)
            r.state = _RUNNING
            r.started = now
        self._compact()
        return cands

    def _shed_hopeless(self, cands: list[_Request], now: float) -> list[_Request]:
        """Expire items that cannot finish before their deadline: running them is wasted work."""
        done_at = now + self._cost.upper(len(cands))
        keep = [r for r in cands if r.deadline is None or r.deadline >= done_at]
        for r in cands:
            if r.deadline is not None and r.deadline < done_at:
                self._unqueue(r)
                self._count("expired", r, None)
                r.future.set_exception(
                    DeadlineExceeded(
                        f"request dropped after {(now - r.arrival) * 1000:.1f} ms: its batch is "
                        f"predicted to finish {(done_at - r.deadline) * 1000:.1f} ms past its deadline"
                    )
                )
        return keep

    def _bucket(self, cands: list[_Request], cap: int) -> list[_Request]:
        """Pick ``cap`` of the windowed candidates with the least padding, always with the oldest."""
        lengths = [r.length for r in cands]
        order = sorted(range(len(cands)), key=lambda i: (lengths[i], i))
        pos = order.index(0)
        prefix = [0]
        for i in order:
            prefix.append(prefix[-1] + lengths[i])
        best: tuple[float, int] | None = None
        best_start = 0
        for start in range(max(0, pos - cap + 1), min(pos, len(order) - cap) + 1):
            end = start + cap
            waste = lengths[order[end - 1]] * cap - (prefix[end] - prefix[start])
            key = (waste, sum(order[start:end]))
            if best is None or key < best:
                best, best_start = key, start
        chosen = sorted(order[best_start : best_start + cap])
        return [cands[i] for i in chosen]

    def _compact(self) -> None:
        for p in list(self._priorities):
            q = self._queues[p]
            while q and q[0].state != _QUEUED:
                q.popleft()
            if len(q) > 64 and len(q) > 2 * self._depth:  # bucketing leaves holes
                self._queues[p] = deque(r for r in q if r.state == _QUEUED)

    # ---------------------------------------------------------------- running batches

    def _launch(self, reqs: list[_Request], reason: str, now: float) -> None:
        assert self._loop is not None
        self._in_flight += 1
        self._reasons[reason] += 1
        self._batch_ids += 1
        bid = self._batch_ids
        if self._cost.ready:
            self._running_ends[bid] = now + self._cost.predict(len(reqs))
        else:
            self._running_ends[bid] = now
        for r in reqs:
            self._waits.append(now - r.arrival)
        # A sync fn starts in its worker thread now, not when the task first runs: the thread
        # gets going while this loop turn wakes the previous batch's callers.
        started = self._start(reqs)
        task = self._loop.create_task(self._run_batch(bid, reqs, reason, now, started))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._batch_task_done, bid, reqs))

    def _batch_task_done(self, bid: int, reqs: list[_Request], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if bid not in self._running_ends:
            return  # _run_batch's finally ran: every request is resolved
        # Cancelled before its first step (the loop shut down): its finally never ran.
        self._running_ends.pop(bid)
        self._in_flight -= 1
        for r in reqs:
            self._resolve(
                r, BatchError(f"{self._name}: the batch was cancelled before it ran"), len(reqs)
            )
        self._schedule()  # the slot is free again, as at the end of _run_batch

    async def _run_batch(
        self, bid: int, reqs: list[_Request], reason: str, started: float, call: _Started | None
    ) -> None:
        outcomes: list[Any] = []
        padded = self._padded_size(len(reqs))
        try:
            outcomes = await self._execute(reqs, call)
        finally:
            if len(outcomes) != len(reqs):  # interrupted (loop shutting down): still resolve all
                outcomes = [
                    BatchError(f"{self._name}: the batch was interrupted before it finished")
                    for _ in reqs
                ]
            end = self._clock.time()
            self._in_flight -= 1
            self._running_ends.pop(bid, None)
            # Seal and start the next batch before waking this batch's callers: their wake-ups
            # queue behind the new batch's first step, so the executor never idles for them.
            self._schedule(notify=False)
            failed = 0
            for r, o in zip(reqs, outcomes):
                if o is _DISCARD:
                    o = BatchError(f"{self._name}: request was not run")  # pragma: no cover
                failed += isinstance(o, BaseException)
                self._resolve(r, o, len(reqs))
            self._batches_run += 1
            self._sizes[len(reqs)] = self._sizes.get(len(reqs), 0) + 1
            self._padded_items += padded - len(reqs)
            self._exec_times.append(end - started)
            if self._on_batch is not None:
                waits = tuple(started - r.arrival for r in reqs)
                self._callback(
                    self._on_batch,
                    BatchRecord(len(reqs), padded, reason, waits, end - started, failed),
                )
            self._notify_drained()  # after the callers are resolved: aclose() returns last

    def _padded_size(self, n: int) -> int:
        if not self._pad:
            return n
        i = bisect.bisect_left(self._preferred, n)
        return self._preferred[i] if i < len(self._preferred) else n

    async def _execute(self, reqs: list[_Request], call: _Started | None) -> list[Any]:
        try:
            return await self._call(reqs, call)
        except _ContractError as e:
            return [BatchError(str(e)) for _ in reqs]
        except Exception as e:
            if len(reqs) == 1:
                return [e]
            if self._on_error == "fail_batch":
                out = []
                for _ in reqs:
                    err = BatchError(
                        f"{self._name}: fn raised {type(e).__name__}: {e} for a batch of "
                        f"{len(reqs)} items (on_error='fail_batch'; on_error='isolate' fails only "
                        "the items that cause it)"
                    )
                    err.__cause__ = e
                    out.append(err)
                return out
            self._bisections += 1
            results: dict[int, Any] = {}
            live = [r for r in reqs if not r.future.done()]
            mid = len(live) // 2
            if mid == 0:
                await self._isolate(live, results)
            else:
                await self._isolate(live[:mid], results)
                await self._isolate(live[mid:], results)
            return [results.get(id(r), _DISCARD) for r in reqs]

    async def _isolate(self, group: list[_Request], results: dict[int, Any]) -> None:
        group = [r for r in group if not r.future.done()]  # gone callers need no answer
        if not group:
            return
        try:
            values = await self._call(group)
        except _ContractError as e:
            values = [BatchError(str(e)) for _ in group]
        except Exception as e:
            if len(group) == 1:
                values = [e]
            else:
                mid = len(group) // 2
                await self._isolate(group[:mid], results)
                await self._isolate(group[mid:], results)
                return
        for r, v in zip(group, values):
            results[id(r)] = v

    def _prepare(self, group: list[_Request]) -> tuple[Any, Any, int]:
        """``fn``'s argument for ``group`` (padded to a preferred size, collated), its context."""
        items = [r.item for r in group]
        size = self._padded_size(len(items))
        if size > len(items):
            items.extend([items[-1]] * (size - len(items)))
        if self._collator is None:
            return items, None, size
        batch, ctx = self._collator.collate(items)
        return batch, ctx, size

    def _start(self, group: list[_Request]) -> _Started | None:
        """Hand a sync fn its batch in the worker thread at once (``None``: the task calls it)."""
        if self._is_async or not self._run_in_thread:
            return None
        assert self._loop is not None
        try:
            arg, ctx, size = self._prepare(group)
            t0 = self._clock.time()
            future = self._loop.run_in_executor(self._pool(), self._fn, arg)
        except Exception:
            return None  # the task tries again and hands the error to the callers like any other
        # If the batch task never runs (its loop shuts down first), nobody awaits this future:
        # read its outcome here so that asyncio does not log an unretrieved exception.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return _Started(future, ctx, size, t0)

    async def _call(self, group: list[_Request], call: _Started | None = None) -> list[Any]:
        n = len(group)
        if call is None:
            arg, ctx, size = self._prepare(group)
            t0 = self._clock.time()
            output = await self._invoke(arg)
        else:
            ctx, size, t0 = call.ctx, call.size, call.t0
            output = await call.future
            if inspect.isawaitable(output):
                output = await output
        results: Sequence[Any]
        if self._collator is not None:
            try:
                results = self._collator.split(output, ctx, size)
            except BatchError as e:
                raise _ContractError(f"{self._name}: {e}") from None
            if len(results) != size:
                raise _ContractError(
                    f"{self._name}: the collator split fn's output into {len(results)} results for "
                    f"a batch of {size} items"
                )
        else:
            results = self._split_plain(output, size)
        self._cost.observe(size, self._clock.time() - t0)
        return list(results[:n])

    def _split_plain(self, output: Any, size: int) -> Sequence[Any]:
        if isinstance(output, list | tuple):
            if len(output) != size:
                raise _ContractError(
                    f"{self._name}: fn returned {len(output)} results for a batch of {size} items; "
                    "it must return exactly one result per item, in order"
                )
            return output
        try:
            return split_output(output, size)
        except BatchError as e:
            raise _ContractError(f"{self._name}: {e}") from None

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._max_concurrent, thread_name_prefix=f"fastinfer-{self._name}"
            )
        return self._executor

    async def _invoke(self, arg: Any) -> Any:
        if self._is_async:
            result = await self._fn(arg)
        elif self._run_in_thread:
            assert self._loop is not None
            result = await self._loop.run_in_executor(self._pool(), self._fn, arg)
        else:
            result = self._fn(arg)
        if inspect.isawaitable(result):
            result = await result
        return result

    # ---------------------------------------------------------------- lifecycle

    async def aclose(self, *, cancel_pending: bool = False) -> None:
        """Stop accepting requests, then finish queued and running work (or, with
        ``cancel_pending=True``, fail queued requests with ``ClosedError``). Idempotent."""
        if self._loop is None or self._loop.is_closed():
            self._finish_close()
            return
        if self._loop is asyncio.get_running_loop():
            await self._aclose_home(cancel_pending)
        else:
            cf = asyncio.run_coroutine_threadsafe(self._aclose_home(cancel_pending), self._loop)
            await asyncio.wrap_future(cf)
        self._finish_close()

    def close(self, *, cancel_pending: bool = False) -> None:
        """Blocking :meth:`aclose`, for sync code. On the batcher's own running loop use
        ``await aclose()`` instead (``WouldBlockError``)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._finish_close()
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:
            raise WouldBlockError(
                f"close() was called on the thread running this {self._name}'s event loop, "
                "where blocking would deadlock; use `await batcher.aclose()` (or `async with`)"
            )
        if not loop.is_running():
            if not self._idle():
                raise WouldBlockError(
                    f"{self._name} holds requests on an event loop that is not running; run "
                    "`await batcher.aclose()` on that loop"
                )
            self._state = _CLOSED
            self._finish_close()
            return
        asyncio.run_coroutine_threadsafe(self._aclose_home(cancel_pending), loop).result()
        self._finish_close()

    async def _aclose_home(self, cancel_pending: bool) -> None:
        if self._state == _OPEN:
            self._state = _CLOSING
        if cancel_pending:
            for p in self._priorities:
                for r in self._queues[p]:
                    if r.state == _QUEUED and not r.future.done():
                        self._unqueue(r)
                        self._count("cancelled", r, None)
                        r.future.set_exception(
                            ClosedError(
                                f"the {self._name} was closed with cancel_pending=True before "
                                "this request ran"
                            )
                        )
        self._schedule()
        while not self._idle():
            assert self._loop is not None
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        self._state = _CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None

    def _finish_close(self) -> None:
        self._state = _CLOSED
        if self._executor is not None:
            # Drained: every call has returned, so the idle workers exit at once.
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.stop()

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> DynamicBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""State shared by the parts of a DynamicBatcher, and how a request is resolved (private).

:class:`DynamicBatcher` is assembled from this core, :class:`~._forming.Forming` (when to seal a
batch and which items go in) and :class:`~._running.Running` (running ``fn`` on a batch, isolating
failures). Every attribute is declared here, once, with its type.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from fastinfer.batching._collate import Collator
from fastinfer.batching._config import BatcherConfig
from fastinfer.batching._cost_model import ArrivalRate, CostModel
from fastinfer.batching._loop import Clock, Handle, LoopThread
from fastinfer.batching._records import BatchRecord, RequestRecord
from fastinfer.batching._request import DONE, QUEUED, RUNNING, BatchRun, Request
from fastinfer.batching._threads import SlotPool
from fastinfer.errors import BatchError, ClosedError, DeadlineExceeded, WouldBlockError

__all__ = ["CLOSED", "CLOSING", "HEADROOM", "IN_FN", "OPEN", "WINDOW", "BatcherCore", "stop_error"]

logger = logging.getLogger("fastinfer.batching")

OPEN, CLOSING, CLOSED = 0, 1, 2  # batcher states
WINDOW = 10_000  # samples kept for the distributions in statistics()
HEADROOM = 0.95  # latency_target_ms: admission and dispatch plan for this share of the target

#: The batcher whose async ``fn`` this task is running: ``submit()`` to it from there would wait
#: for a slot that the caller itself holds (a sync ``fn`` is recognised by its worker thread).
IN_FN: contextvars.ContextVar[object] = contextvars.ContextVar("fastinfer_in_fn", default=None)


def stop_error(
    name: str, who: str, e: StopIteration | StopAsyncIteration, *, returned: bool = False
) -> BatchError:
    """The ``BatchError`` a caller gets instead of ``e`` (the original is its ``__cause__``).

    asyncio refuses to raise ``StopIteration`` into a future (the batch never resolved), and a
    ``StopAsyncIteration`` at a caller's ``await`` would silently end an async iterator around it.
    """
    kind = type(e).__name__
    if returned:
        what = f"{who} returned a {kind} instance ({e!r}) as this item's result"
        fix = "return another exception instance (e.g. a ValueError) for an item it cannot answer"
    elif isinstance(e, StopIteration):
        what = f"{who} raised {e!r}, typically next() on an exhausted iterator"
        fix = f"give next() a default (next(it, None)) or catch StopIteration inside {who}"
    else:
        what = f"{who} raised {e!r}, typically __anext__() on an exhausted async iterator"
        fix = f"give anext() a default (anext(it, None)) or catch StopAsyncIteration inside {who}"
    why = (
        "asyncio cannot raise a StopIteration into a caller's future"
        if isinstance(e, StopIteration)
        else "raised at a caller's await it would silently end an async iterator around it"
    )
    err = BatchError(
        f"{name}: {what}; {why}, so it comes as this BatchError (the original is its "
        f"__cause__). Fix: {fix}"
    )
    err.__cause__ = e
    return err


class BatcherCore:
    """Declared state of a batcher and the request resolution paths."""

    # configuration (see BatcherConfig; times in seconds here)
    _config: BatcherConfig
    _fn: Callable[[Any], Any]
    _is_async: bool
    _max_batch_size: int
    _max_wait: float
    _max_concurrent: int
    _prefetch: int  # batches fn queues behind the running ones (a pool's prefetch)
    _max_queue_size: int | None
    _timeout: float | None
    _batch_timeout: float | None
    _policy: Literal["fixed", "adaptive"]
    _target: float | None
    _preferred: list[int]
    _pad: bool
    _cost_fn: Callable[[Any], float] | None
    _max_cost: float | None
    _collator: Collator | None
    _bucket_window: int | None
    _length_fn: Callable[[Any], int]
    _on_error: str
    _run_in_thread: bool
    _own_loop: bool
    _clock_arg: Any
    _on_batch: Callable[[BatchRecord], Any] | None
    _on_request: Callable[[RequestRecord], Any] | None
    _name: str
    # state
    _state: int
    _bind_lock: threading.Lock
    _loop: asyncio.AbstractEventLoop | None
    _loop_thread_id: int | None
    _thread: LoopThread | None
    _clock: Clock
    _executor: SlotPool | None
    _queues: dict[int, deque[Request]]
    _priorities: list[int]
    _depth: int
    _queued_cost: float
    _in_flight: int
    _runs: dict[int, BatchRun]  # batches holding a slot
    _batch_ids: int
    _timer: Handle | None
    _timer_at: float | None
    _drain_waiters: list[asyncio.Future[None]]
    _tasks: set[asyncio.Task[None]]
    _cost: CostModel
    _arrivals: ArrivalRate
    _counts: dict[str, int]
    _batches_run: int
    _padded_items: int
    _bisections: int
    _timed_out: int  # batches given up after batch_timeout
    _aborted_batches: int  # calls of fn that raised a BaseException (contained)
    _probes: int  # requests run although the cost model said they could not make it
    _probe_at: float  # no new probe before this time (backs off while probes confirm the cost)
    _probe_backoff: float
    _reasons: dict[str, int]
    _sizes: dict[int, int]
    _waits: deque[float]
    _latencies: deque[float]
    _exec_times: deque[float]
    _callback_failed: bool
    _pid: int | None  # the process whose loop and threads the batcher is bound to
    _shutting: bool  # a closer is stopping the executor and the loop thread
    _shut: concurrent.futures.Future[None]  # ... and it has finished

    # implemented by the parts
    def _schedule(self, notify: bool = True) -> None:
        raise NotImplementedError

    def _notify_drained(self) -> None:
        raise NotImplementedError

    def _launch(self, reqs: list[Request], reason: str, now: float) -> None:
        raise NotImplementedError

    def _effective_max(self) -> int:
        raise NotImplementedError

    def _give_up(self, run: BatchRun, error: Callable[[], BaseException], outcome: str) -> None:
        raise NotImplementedError

    def _idle(self) -> bool:
        return self._depth == 0 and self._in_flight == 0

    def _may_probe(self, now: float) -> bool:
        """A request the cost model calls hopeless may run as a probe: none is running, and the
        backoff (while probes keep confirming the estimate) has passed."""
        return now >= self._probe_at and not any(run.probe for run in self._runs.values())

    def _closed_error(self) -> ClosedError:
        if self._state == CLOSING:
            return ClosedError(f"cannot submit to a {self._name} that is closing")
        return ClosedError(f"cannot submit to a closed {self._name}")

    def _forked_error(self) -> ClosedError | None:
        """An error when this process is a fork of the one the batcher is bound to (None if not):
        the copy's loop thread and worker threads do not run here, so a request would wait for
        good (its loop even reads as running)."""
        pid = self._pid
        if pid is None or pid == os.getpid():
            return None
        return ClosedError(
            f"this {self._name} belongs to process {pid}, where it was bound to an event loop and "
            f"threads; this process ({os.getpid()}) is a fork of it, where they do not run, so a "
            "request would wait for good. Fix: create one DynamicBatcher per process, after the "
            "fork (e.g. in the app's lifespan or the worker's startup), or fork before its first use"
        )

    def _refuse_reentry(self, what: str) -> None:
        """``WouldBlockError`` when called from inside this batcher's own ``fn``: a request (or a
        close, which waits for the running batches) would wait for the call that is waiting."""
        inside = IN_FN.get() is self or (
            self._executor is not None and self._executor.owns_current_thread()
        )
        if not inside:
            return
        if what.startswith("submit"):
            why = (
                "the item would wait for a batch slot that this very call holds, a deadlock until "
                "its timeout. Fix: call the model directly inside fn, or submit to another "
                "DynamicBatcher"
            )
        else:
            why = (
                "closing waits for the running batches to finish, this very call of fn among "
                "them: a deadlock. Fix: close the batcher outside fn, once its requests returned "
                "(fn may set a flag or an Event that the code which closes it waits for)"
            )
        raise WouldBlockError(f"{what} was called from inside this {self._name}'s own fn: {why}")

    def _home_lost_error(self, how: str) -> Exception:
        """What a caller waiting on the home loop gets when that loop ended first (see _bridge)."""
        if self._state != OPEN:
            return self._closed_error()  # closed meanwhile: its loop thread was stopped
        fix = (
            "Fix: close the batcher before that loop ends (`await batcher.aclose()` on it, e.g. at "
            "the end of the lifespan or of the asyncio.run() that uses it), or create it with "
            "own_loop=True to run it on its own loop thread"
        )
        if how == "stopped":
            return WouldBlockError(
                f"the event loop this {self._name} is bound to (the first loop that used it) "
                "stopped, not closed, while this request waited on it, so it would wait until "
                f"someone runs that loop again. {fix}"
            )
        return ClosedError(
            f"the event loop this {self._name} was bound to (the first loop that used it) ended "
            "while this request waited on it (its asyncio.run() returned, or it was closed), so "
            f"the request was dropped. {fix}"
        )

    # ---------------------------------------------------------------- resolution paths

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Timer callbacks may come from a foreign-thread clock: always run them on the loop."""
        if threading.get_ident() == self._loop_thread_id:
            fn(*args)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _count(self, outcome: str, req: Request, batch_size: int | None) -> None:
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

    def _unqueue(self, req: Request) -> None:
        req.state = DONE
        self._depth -= 1
        self._queued_cost -= req.cost

    def _future_done(self, req: Request, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            return
        if req.state == QUEUED:
            self._unqueue(req)
            self._count("cancelled", req, None)
            self._schedule()
        elif req.state == RUNNING:
            req.state = DONE  # its result will be discarded
            self._count("cancelled", req, None)

    def _expire(self, req: Request) -> None:
        req.timer = None
        if req.state == DONE or req.future.done():
            return
        now = self._clock.time()
        if req.state == QUEUED:
            self._unqueue(req)
            msg = f"request waited {(now - req.arrival) * 1000:.1f} ms in the queue and passed its deadline"
        else:
            req.state = DONE
            msg = f"request passed its deadline after {(now - req.arrival) * 1000:.1f} ms while its batch was running; the result is discarded"
        self._count("expired", req, None)
        req.future.set_exception(DeadlineExceeded(msg))
        self._schedule()

    def _fail(self, req: Request, error: BaseException, outcome: str, batch_size: int) -> None:
        """Fail a running request whose batch is given up (timed out, or closing timed out)."""
        if req.state != RUNNING or req.future.done():
            return
        req.state = DONE
        self._count(outcome, req, batch_size)
        req.future.set_exception(error)

    def _resolve(self, req: Request, value: Any, batch_size: int) -> None:
        """Hand a running request its outcome (an exception instance fails it). Never raises: a
        batch's callers are resolved in a loop, and one that cannot be must not strand the rest.
        """
        if req.state != RUNNING or req.future.done():
            return  # cancelled or expired while running: discard
        req.state = DONE
        now = self._clock.time()
        self._latencies.append(now - req.arrival)
        failed = isinstance(value, BaseException)
        if isinstance(value, StopIteration | StopAsyncIteration):  # fn returned one
            value = stop_error(self._name, "fn", value, returned=True)
        elif isinstance(value, asyncio.CancelledError):
            # returned, not raised: raised at the caller's await it would read as the caller's
            # own task being cancelled
            cause, value = (
                value,
                BatchError(
                    f"{self._name}: fn returned a CancelledError instance as this item's result; "
                    "return another exception instance (e.g. a ValueError) for an item it cannot answer"
                ),
            )
            value.__cause__ = cause
        self._count("failed" if failed else "ok", req, batch_size)
        try:
            if failed:
                req.future.set_exception(value)
            else:
                req.future.set_result(value)
        except Exception as e:
            if req.future.done():
                return  # resolved meanwhile (an on_request callback cancelled its caller)
            err = BatchError(
                f"{self._name}: could not hand this request its {'error' if failed else 'result'} "
                f"(a {type(value).__name__}): {type(e).__name__}: {e}"
            )
            err.__cause__ = e
            req.future.set_exception(err)

"""The worker threads that run a sync ``fn``, and how a hung call is abandoned (private).

A ``ThreadPoolExecutor`` cannot give up on a call: its thread stays taken until ``fn`` returns,
and the interpreter joins it at exit, so one hung call wedges the batcher and then the process'
shutdown. :class:`SlotPool` runs each call on one of its daemon threads; a call that passed its
batch timeout is *abandoned*: its thread is left to finish on its own (the result is dropped) and
a fresh thread takes its place, so later batches run. Abandoned threads still running are bounded
(``max_abandoned``): past that, no replacement starts until one of them returns, because a model
that hangs on every call must not grow threads without end.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Aborted", "Call", "SlotPool"]

logger = logging.getLogger("fastinfer.batching")


class Aborted(Exception):
    """fn raised a BaseException that is not a cancellation (``SystemExit``, ``KeyboardInterrupt``,
    ``GeneratorExit``...): contained to its batch (every caller gets a ``BatchError``), not
    bisected, never re-raised into the event loop. A worker thread hands it over wrapped: a
    ``GeneratorExit`` raised out of an awaited future would break the coroutine awaiting it."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


class _Worker:
    __slots__ = ("abandoned", "thread")

    def __init__(self) -> None:
        self.abandoned = False
        self.thread: threading.Thread | None = None


class Call:
    """One call of ``fn`` handed to the pool: its future, and the worker that runs it."""

    __slots__ = ("arg", "fn", "future", "worker")

    def __init__(self, fn: Callable[[Any], Any], arg: Any) -> None:
        self.fn, self.arg = fn, arg
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.worker: _Worker | None = None


class SlotPool:
    """Daemon threads running one :class:`Call` each at a time; see the module docstring."""

    def __init__(self, size: int, name: str, *, max_abandoned: int) -> None:
        self._name = name
        self._work: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: set[_Worker] = set()
        self._abandoned: set[_Worker] = set()  # still running a call nobody waits for
        self._local = threading.local()
        self._ids = itertools.count()
        self._wanted = 0
        self._closed = False
        self._warned = False
        self.max_abandoned = max_abandoned
        self.resize(size)

    @property
    def abandoned(self) -> int:
        """Abandoned calls whose thread has not returned yet."""
        return len(self._abandoned)

    def owns_current_thread(self) -> bool:
        """True on one of this pool's threads (that is, inside ``fn``)."""
        return getattr(self._local, "mine", False)

    def resize(self, size: int) -> None:
        """Grow to ``size`` live threads (never shrinks: an idle thread costs nothing)."""
        with self._lock:
            self._wanted = max(self._wanted, size)
            while len(self._live) < self._wanted and not self._closed:
                self._spawn()

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Call:
        call = Call(fn, arg)
        self._work.put(call)
        return call

    def abandon(self, call: Call) -> None:
        """Give up on ``call``: a queued call never runs; a running one's thread is replaced."""
        with self._lock:
            if call.future.cancel():
                return  # not started: a worker will skip it
            w = call.worker
            if w is None or w.abandoned or call.future.done():
                return
            w.abandoned = True
            self._live.discard(w)
            self._abandoned.add(w)
            if len(self._abandoned) <= self.max_abandoned:
                if not self._closed:
                    self._spawn()
            elif not self._warned:
                self._warned = True
                logger.error(
                    "%s: %d calls of fn passed batch_timeout and still run in their threads; no "
                    "thread replaces the next one until one returns (logged once)",
                    self._name,
                    len(self._abandoned),
                )

    def shutdown(self, *, wait: bool) -> None:
        """Stop the live threads once the calls queued so far ran; abandoned ones are not waited
        for (they are daemon threads: they cannot hold up the interpreter's exit either)."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for _ in live:
            self._work.put(None)
        if wait:
            for w in live:
                if w.thread is not None and w.thread is not threading.current_thread():
                    w.thread.join()

    # ------------------------------------------------------------------------- the threads

    def _spawn(self) -> None:  # with self._lock held
        w = _Worker()
        name = f"fastinfer-{self._name}_{next(self._ids)}"
        w.thread = threading.Thread(target=self._run, args=(w,), name=name, daemon=True)
        self._live.add(w)
        w.thread.start()

    def _run(self, w: _Worker) -> None:
        self._local.mine = True
        while True:
            call = self._work.get()
            if call is None:
                return
            call.worker = w  # before it runs: abandon() finds the worker of a running call
            if not call.future.set_running_or_notify_cancel():
                continue
            try:
                result = call.fn(call.arg)
            except Exception as e:
                call.future.set_exception(e)
            except BaseException as e:  # SystemExit & co. go to the batch, not to this thread
                call.future.set_exception(Aborted(e))
            else:
                call.future.set_result(result)
                result = None
            call = None  # hold no batch while idle
            if w.abandoned:
                with self._lock:
                    self._abandoned.discard(w)
                    while len(self._live) < self._wanted and not self._closed:
                        self._spawn()
                return

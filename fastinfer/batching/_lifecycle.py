"""Closing a batcher: drain (or cancel) queued work, stop the executor and the loop thread."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from typing import TYPE_CHECKING

from fastinfer.batching._bridge import HomeLost, discard, wait_async, wait_closed
from fastinfer.batching._core import CLOSED, CLOSING, OPEN, BatcherCore
from fastinfer.batching._request import QUEUED
from fastinfer.errors import ClosedError, ConfigError, WouldBlockError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Lifecycle"]


def _check_timeout(timeout: object) -> None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 <= timeout < math.inf
    ):
        raise ConfigError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")


class Lifecycle(BatcherCore):
    """``aclose()`` / ``close()`` and the context managers."""

    async def aclose(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests, then finish queued and running work (or, with
        ``cancel_pending=True``, fail queued requests with ``ClosedError``). Idempotent.

        ``timeout`` (seconds, on the batcher's clock; default None: wait for everything) bounds
        the wait: what is left then fails with ``ClosedError``: queued requests, and running
        batches, which are given up as after ``batch_timeout`` (an async ``fn`` is cancelled, a
        sync one's thread abandoned), so a hung ``fn`` cannot hold the close up for good.
        """
        if self._forked_copy_closed("aclose()", timeout):
            return
        while True:  # again when the home loop ends before it ran the close (another closer)
            loop = self._loop
            if loop is None or loop.is_closed():
                self._finish_close()
                return
            if not loop.is_running():
                self._close_stopped_home()
                return
            if loop is asyncio.get_running_loop():
                await self._aclose_home(cancel_pending, timeout)
                break
            coro = self._aclose_home(cancel_pending, timeout)
            try:
                cf = asyncio.run_coroutine_threadsafe(coro, loop)
            except RuntimeError:  # closed since we looked
                coro.close()
                continue
            try:
                await wait_async(cf, loop, _close_patience(timeout))
                break
            except HomeLost:
                discard(coro, cf, loop)
        self._finish_close()

    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Blocking :meth:`aclose` (same ``cancel_pending`` and ``timeout``), for sync code.
        Idempotent, from any number of threads at once: each returns once the batcher is closed.
        On the batcher's own running loop use ``await aclose()`` instead (``WouldBlockError``,
        unless it is already closed: then it returns at once), and never inside its ``fn``."""
        if self._forked_copy_closed("close()", timeout):
            return
        while True:  # again when the home loop ends before it ran the close (another closer)
            loop = self._loop
            if loop is None or loop.is_closed():
                self._finish_close()
                return
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is running:
                if self._state == CLOSED:
                    return  # already closed and drained: nothing to wait for (idempotent)
                raise WouldBlockError(
                    f"close() was called on the thread running this {self._name}'s event loop, "
                    "where blocking would deadlock; use `await batcher.aclose()` (or `async with`)"
                )
            if not loop.is_running():
                self._close_stopped_home()
                return
            coro = self._aclose_home(cancel_pending, timeout)
            try:
                cf = asyncio.run_coroutine_threadsafe(coro, loop)
            except RuntimeError:  # closed since we looked
                coro.close()
                continue
            closed = wait_closed(cf, self._shut, loop, _close_patience(timeout))
            discard(coro, cf, loop)
            if closed:
                break
        self._finish_close()

    def _forked_copy_closed(self, what: str, timeout: float | None) -> bool:
        """Checks shared by close() and aclose(); True when this is a forked child's copy, now
        marked closed (the parent's loop and threads are not ours to stop)."""
        _check_timeout(timeout)
        if self._forked_error() is not None:
            self._state = CLOSED
            return True
        if self._state != CLOSED:
            self._refuse_reentry(what)
        return False

    def _close_stopped_home(self) -> None:
        """Close on a stopped (not closed) home loop: nothing to drain when idle; what it holds
        can only finish on that loop."""
        if not self._idle():
            raise WouldBlockError(
                f"{self._name} holds requests on an event loop that is not running; run "
                "`await batcher.aclose()` on that loop"
            )
        self._finish_close()

    async def _aclose_home(self, cancel_pending: bool, timeout: float | None) -> None:
        if self._state == OPEN:
            self._state = CLOSING
        if cancel_pending:
            self._fail_queued(f"the {self._name} was closed with cancel_pending=True")
        self._schedule()
        timer = None
        if timeout is not None and not self._idle():
            if timeout == 0:
                self._close_expired(timeout)
            else:
                timer = self._clock.call_at(
                    self._clock.time() + timeout,
                    functools.partial(self._on_loop, self._close_expired, timeout),
                )
        try:
            while not self._idle():
                assert self._loop is not None
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._drain_waiters.append(waiter)
                await waiter
        finally:
            if timer is not None:
                timer.cancel()
        self._state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None

    def _fail_queued(self, why: str) -> None:
        for p in list(self._priorities):
            for r in list(self._queues.get(p, ())):
                if r.state == QUEUED and not r.future.done():
                    self._unqueue(r)
                    self._count("cancelled", r, None)
                    r.future.set_exception(ClosedError(f"{why} before this request ran"))

    def _close_expired(self, timeout: float) -> None:
        """The close timeout passed: fail what is queued, give up the running batches."""
        why = f"the {self._name} was closed with timeout={timeout:g} s"
        self._fail_queued(why)
        for run in list(self._runs.values()):
            self._give_up(
                run,
                lambda: ClosedError(f"{why} before this request's batch finished"),
                "cancelled",
            )
        self._schedule()

    def _finish_close(self) -> None:
        """Stop the worker threads and the loop thread, once, however many closers come: the
        first does it, a later one returns when it has (unless it runs on one of those threads,
        which the first may be joining)."""
        with self._bind_lock:
            self._state = CLOSED
            first, self._shutting = not self._shutting, True
        if first:
            try:
                if self._executor is not None:
                    # Drained: every call has returned (or was abandoned): the workers exit at once.
                    self._executor.shutdown(wait=True)
                    self._executor = None
                if self._thread is not None:
                    self._thread.stop()
                    self._thread = None
            finally:
                self._shut.set_result(None)
            return
        executor = self._executor
        if threading.get_ident() != self._loop_thread_id and not (
            executor is not None and executor.owns_current_thread()
        ):
            self._shut.result()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_patience(timeout: float | None) -> float:
    """How long a close handed to a stopped (not closed) home loop waits for it to run again
    before looking at the batcher afresh (idle: closed at once; holding requests: an error)."""
    return timeout if timeout is not None else 1.0

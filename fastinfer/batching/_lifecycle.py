"""Closing a batcher: drain (or cancel) queued work, stop the executor and the loop thread."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastinfer.batching._core import CLOSED, CLOSING, OPEN, BatcherCore
from fastinfer.batching._request import QUEUED
from fastinfer.errors import ClosedError, WouldBlockError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Lifecycle"]


class Lifecycle(BatcherCore):
    """``aclose()`` / ``close()`` and the context managers."""

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
            self._state = CLOSED
            self._finish_close()
            return
        asyncio.run_coroutine_threadsafe(self._aclose_home(cancel_pending), loop).result()
        self._finish_close()

    async def _aclose_home(self, cancel_pending: bool) -> None:
        if self._state == OPEN:
            self._state = CLOSING
        if cancel_pending:
            for p in self._priorities:
                for r in self._queues[p]:
                    if r.state == QUEUED and not r.future.done():
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
        self._state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None

    def _finish_close(self) -> None:
        self._state = CLOSED
        if self._executor is not None:
            # Drained: every call has returned, so the idle workers exit at once.
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

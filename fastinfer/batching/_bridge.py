"""Waiting for work handed to the batcher's home loop from another thread (private).

A request or a close that another thread or event loop hands to the home loop
(``run_coroutine_threadsafe``) resolves only if that loop runs it. A loop can end first:
``asyncio.run()`` returning cancels its tasks, a loop left stopped never runs them, and a
concurrent ``close()`` stops the batcher's own loop thread, dropping what was scheduled on it.
These waits watch the home loop and raise :class:`HomeLost` then, where the hand-off's future
would never resolve and its caller would wait for good.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Coroutine
from typing import Any

__all__ = [
    "POLL_SECONDS",
    "HomeLost",
    "Watch",
    "discard",
    "wait_async",
    "wait_closed",
    "wait_sync",
    "withdraw",
]

POLL_SECONDS = 0.1  # how often a waiting caller looks whether the home loop still runs


class HomeLost(Exception):
    """The home loop ended before it finished the hand-off (private: never reaches a caller).

    ``how``: ``"closed"`` (the loop is closed), ``"cancelled"`` (the loop cancelled it while
    shutting down, as ``asyncio.run()`` does) or ``"stopped"`` (stopped, not closed, for longer
    than the request's own time limit: it would wait until someone runs the loop again)."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class Watch:
    """Says when a home loop is gone: closed, or stopped for longer than ``patience`` seconds
    (the request's own time limit; None: never given up for being stopped). A loop that
    ``run_until_complete`` drives step by step is stopped between steps, for as long as the code
    between them runs: a request waiting there is served at the next step, as before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, patience: float | None = None) -> None:
        self.loop = loop
        self.patience = patience
        self._stopped_since: float | None = None

    def gone(self) -> str | None:
        if self.loop.is_closed():
            return "closed"
        if self.loop.is_running():
            self._stopped_since = None
            return None
        now = time.monotonic()
        if self._stopped_since is None:
            self._stopped_since = now
        if self.patience is not None and now - self._stopped_since >= self.patience:
            return "stopped"
        return None


def withdraw(cf: concurrent.futures.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
    """Cancel a hand-off that a stopped loop may still run when it runs again (a request then
    never costs a forward pass); a closed loop runs nothing, and cancelling would only make the
    future's callback fail on it."""
    if not loop.is_closed():
        cf.cancel()


def discard(
    coro: Coroutine[Any, Any, Any],
    cf: concurrent.futures.Future[Any],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Close a hand-off's coroutine that a closed loop dropped before it finished (so Python
    does not warn that it was never awaited); one that may still run is left alone."""
    if loop.is_closed() and not cf.done():
        try:
            coro.close()
        except (RuntimeError, ValueError):  # pragma: no cover - running after all
            pass


def wait_sync(
    cf: concurrent.futures.Future[Any],
    loop: asyncio.AbstractEventLoop,
    patience: float | None = None,
) -> Any:
    """``cf.result()``, or :class:`HomeLost` when ``loop`` ends first (for a blocking caller;
    ``patience``: see :class:`Watch`)."""
    watch = Watch(loop, patience)
    while True:
        try:
            return cf.result(timeout=POLL_SECONDS)
        except concurrent.futures.CancelledError:
            raise HomeLost("cancelled") from None  # only the home loop cancels it
        except concurrent.futures.TimeoutError:
            if cf.done():
                raise  # the outcome itself (DeadlineExceeded is a TimeoutError)
        how = watch.gone()
        if how is not None:
            withdraw(cf, loop)
            raise HomeLost(how)


def wait_closed(
    cf: concurrent.futures.Future[Any],
    closed: concurrent.futures.Future[None],
    loop: asyncio.AbstractEventLoop,
    patience: float | None = None,
) -> bool:
    """Wait for ``cf`` (a close scheduled on ``loop``) or for ``closed`` (another closer finished).

    True when either is done (``cf``'s error, if any, is raised); False when ``loop`` ended first
    without running ``cf`` (``patience``: see :class:`Watch`): the caller looks again."""
    watch = Watch(loop, patience)
    while True:
        done, _ = concurrent.futures.wait(
            (cf, closed), timeout=POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if cf in done:
            if cf.cancelled():
                return closed.done()  # the loop cancelled it while shutting down
            cf.result()
            return True
        if done:
            return True
        if watch.gone() is not None:
            return False


async def wait_async(
    cf: concurrent.futures.Future[Any],
    loop: asyncio.AbstractEventLoop,
    patience: float | None = None,
) -> Any:
    """``await`` the outcome of ``cf`` (run on ``loop``) from another event loop, or raise
    :class:`HomeLost` when ``loop`` ends first (``patience``: see :class:`Watch`). Cancelling the
    caller withdraws ``cf``."""
    here = asyncio.get_running_loop()
    out: asyncio.Future[Any] = here.create_future()

    def copy(f: concurrent.futures.Future[Any]) -> None:  # on the caller's loop
        if out.done():
            return
        if f.cancelled():
            out.set_exception(HomeLost("cancelled"))  # the caller did not: its home loop did
        elif (error := f.exception()) is not None:
            out.set_exception(error)
        else:
            out.set_result(f.result())

    def resolved(f: concurrent.futures.Future[Any]) -> None:  # in the thread that resolved it
        try:
            here.call_soon_threadsafe(copy, f)
        except RuntimeError:  # pragma: no cover - the caller's loop is closed: nobody waits
            pass

    watch = Watch(loop, patience)
    timer: asyncio.TimerHandle

    def look() -> None:
        nonlocal timer
        how = watch.gone()
        if how is None:
            timer = here.call_later(POLL_SECONDS, look)
        elif not out.done():
            out.set_exception(HomeLost(how))

    timer = here.call_later(POLL_SECONDS, look)
    cf.add_done_callback(resolved)
    try:
        return await out
    except asyncio.CancelledError:
        withdraw(cf, loop)  # the caller left: withdraw the request
        raise
    except HomeLost:
        withdraw(cf, loop)
        raise
    finally:
        timer.cancel()

"""Clocks and the private event-loop thread of a DynamicBatcher."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Clock", "Handle", "LoopClock", "LoopThread", "UnboundClock"]

SETTLE_SECONDS = 0.1  # a stopped loop thread waits this long for cancelled tasks to end


class Handle(Protocol):
    def cancel(self) -> Any: ...


class Clock(Protocol):
    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle: ...


class LoopClock:
    def __init__(self, loop: asyncio.AbstractEventLoop, source: Callable[[], float] | None) -> None:
        self._loop = loop
        self._source = source
        self.time: Callable[[], float] = source or loop.time

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        if self._source is None:
            return self._loop.call_at(when, callback)
        return self._loop.call_later(max(0.0, when - self._source()), callback)


class UnboundClock:
    def time(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        raise RuntimeError("not bound to an event loop")  # pragma: no cover - never armed unbound


class LoopThread:
    """The batcher's own event loop in a daemon thread (for ``submit_sync`` callers)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.loop.call_soon(ready.set)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self._settle())
        finally:
            self.loop.close()

    @staticmethod
    async def _settle() -> None:
        """Stopped (the batcher closed): run what other threads scheduled meanwhile (a second
        ``close()``, a ``submit_sync`` racing the close) so that each gets its answer (closed)
        instead of being dropped with the loop; cancel what is left (a given-up async ``fn``)."""
        for _ in range(3):
            await asyncio.sleep(0)
        rest = asyncio.all_tasks() - {asyncio.current_task()}
        for task in rest:
            task.cancel()
        if rest:
            await asyncio.wait(rest, timeout=SETTLE_SECONDS)

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join()

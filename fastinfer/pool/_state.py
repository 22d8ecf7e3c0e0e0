"""A PinnedPool's lifecycle (private): the state its thread holds instead of the pool, the
finalizer that closes a pool nobody references, and the Futures its calls return.

The pool's thread holds only a :class:`State` (the ``_supervisor`` half, plus what callers use),
never the :class:`PinnedPool`, so a pool dropped without ``close()`` is collected while its thread
runs; its finalizer (:func:`dropped`) then tells the thread to close it. The garbage collector runs
finalizers inside any allocation of any thread, so the finalizer only sets a flag and writes a byte
to a non-blocking socket; the thread does the rest (the queued and running calls finish, the
workers stop, the CPUs' claim is released).

A pool belongs to the process that created it: its thread and workers do not cross a fork, and
every use from a forked child is refused (``State.owner``).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from fastinfer.errors import ClosedError, WorkerCrashed, WouldBlockError
from fastinfer.pool._slots import Call, down_error
from fastinfer.pool._supervisor import Supervisor

__all__ = ["PoolFuture", "State", "dropped", "dumper", "live"]

_dumps_fn: Callable[[Any], bytes] | None = None


def dumper() -> Callable[[Any], bytes]:
    """The message encoder (tensors by value); made once: it imports torch (1-2 s cold), which
    the pool does when it starts, not on a caller's first submit (an event loop's thread)."""
    global _dumps_fn
    if _dumps_fn is None:
        from fastinfer.pool._wire import make_dumps

        _dumps_fn = make_dumps()
    return _dumps_fn


class State(Supervisor):
    """A pool's state and its thread's work (``_supervisor``): all but the PinnedPool itself."""

    _owner: int  # the pid of the process that created the pool: only it can use the pool

    def _dumps(self, call: Call) -> bytes:
        return dumper()(("call", call.id, call.kind, call.args))

    def _wake(self) -> None:
        try:  # a non-blocking socket: never waits (the finalizer calls this)
            self._wake_w.send(b"x")
        except OSError:  # full: the thread wakes anyway; closed: it has ended
            pass

    def check_owner(self) -> None:
        """Raise :class:`ClosedError` in a process forked from the pool's. Call it before taking
        a lock: one that another thread held at the fork stays held in the child."""
        if os.getpid() != self._owner:
            raise ClosedError(
                f"this PinnedPool belongs to process {self._owner}, which created it, and this "
                f"process ({os.getpid()}) is a fork of it: a pool's thread and workers do not "
                "cross a fork, so a call sent from here would never be answered. Create the pool "
                "in each process, after the fork: in the app's lifespan or setup, not at import "
                "(gunicorn --preload, multiprocessing's 'fork' start method and os.fork() fork "
                "after import)"
            )

    def _refused(self) -> WorkerCrashed | None:
        """Why a call made now fails at once (the pool gave up, or no worker is up and the next
        restart waits), or None; raises :class:`ClosedError` after :meth:`close`. Lock held."""
        down = down_error(self._workers, self._gave_up, self._gave_up_tb)
        if down is None and self._closing:
            raise ClosedError("cannot submit to a closed PinnedPool")
        return down

    def _failed(
        self, fut: concurrent.futures.Future[Any], error: WorkerCrashed
    ) -> concurrent.futures.Future[Any]:
        with self._lock:
            self._counts["failed"] += 1
        fut.set_running_or_notify_cancel()
        fut.set_exception(error)
        return fut


live: weakref.WeakSet[State] = weakref.WeakSet()  # the pools of this process (their states)


def dropped(s: State) -> None:
    """The finalizer of a PinnedPool that nobody references and that was not closed: its thread
    closes it. Runs inside any allocation of any thread: sets a flag and writes to a non-blocking
    socket, takes no lock and never waits."""
    if s._owner != os.getpid() or s._closing:
        return  # a forked child's copy (the pool is its parent's), or one that gave up
    s._abandoned = True
    s._wake()
    warnings.warn(
        f"unclosed PinnedPool with {len(s._workers)} worker(s): its thread closes it now (its "
        "queued and running calls finish); call pool.close() or use `with PinnedPool(...)`",
        ResourceWarning,
        stacklevel=3,  # past weakref's finalize: where the last reference went, usually
    )


@atexit.register
def _release_claims_at_exit() -> None:
    """The CPUs of pools still open at exit (their workers die with this process), released in
    the main thread (not by a finalizer)."""
    for s in list(live):
        if s._owner == os.getpid():
            s._claim.release()


class PoolFuture(concurrent.futures.Future[Any]):
    """A call's Future. Done-callbacks run on the pool's thread, which delivers every result:
    waiting there for a result not yet delivered would wait for itself, stalling the whole pool
    until the timeout (or forever), so :meth:`result` and :meth:`exception` raise
    :class:`WouldBlockError` at once instead."""

    def __init__(self, thread: threading.Thread) -> None:
        super().__init__()
        self._pool_thread = thread

    def result(self, timeout: float | None = None) -> Any:
        self._not_on_pool_thread()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._not_on_pool_thread()
        return super().exception(timeout)

    def _not_on_pool_thread(self) -> None:
        if threading.current_thread() is self._pool_thread and not self.done():
            raise WouldBlockError(
                "waiting for a PinnedPool call's result on the pool's own thread (a Future's "
                "done-callback, on_call or on_worker_report runs there) would deadlock: that "
                "thread delivers the result. Do not block there: chain with "
                "fut.add_done_callback(...), or wait in another thread or with `await pool.run()`"
            )

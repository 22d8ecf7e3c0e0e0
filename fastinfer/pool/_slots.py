"""A PinnedPool's worker slots (private): their state, how a worker process is ended, and the
restart policy after crashes.

A slot whose workers keep crashing is restarted with backoff: the first two crashes in a row are
replaced at once (a crash, and the crash of its ``idempotent=True`` retry), each further one waits
twice as long as the last, up to a cap. While no worker is up and the next restart waits, calls
fail at once with :class:`WorkerCrashed` instead of queueing behind it to crash the next worker.
A slot whose replacement fails to start ``START_TRIES`` times in a row is given up; when every
slot is, the pool has given up and every call fails saying why.

A worker is ended without the pool's thread waiting for it (:func:`end`): it is killed,
its socket is no longer read, and what follows (its calls failed, its restart) runs once the
loop sees its exit. One whose connection broke while its process lives on gets ``LINK_GRACE_S``
to exit by itself first (a dying process closes its socket a moment before it is seen to exit).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastinfer.errors import WorkerCrashed, WorkerStartupError
from fastinfer.pool._link import Link
from fastinfer.pool._plan import WorkerCores

__all__ = [
    "EXIT_POLL_S",
    "LINK_GRACE_S",
    "START_TRIES",
    "Call",
    "Worker",
    "count_crash",
    "down_error",
    "end",
    "gave_up_error",
    "kill_if_due",
    "one_line",
    "reap",
    "reap_ended",
    "shutdown_workers",
    "startup_error",
]

# Restart delay after the 3rd crash in a row of one slot, doubling with each further one, and its
# cap. A call that succeeds on the slot clears the count, and so does a worker that served for
# _CRASH_QUIET_S before it crashed.
_RESTART_BACKOFF_S = (1.0, 30.0)
_FREE_RESTARTS = 2  # crashes in a row replaced at once: a crash, then its idempotent retry's
_CRASH_QUIET_S = 60.0
START_TRIES = 3  # failed starts in a row (after the pool started) before a slot is given up
LINK_GRACE_S = 1.0  # a worker whose socket closed while it runs on: killed after this
EXIT_POLL_S = 0.5  # how often a worker's exit is polled where the OS has no pidfd
_CAUSE_CHARS = 300  # the longest one-line cause put in an error message


class Call:
    __slots__ = ("args", "data", "fut", "id", "kind", "queued", "retries", "started", "submitted")

    def __init__(self, call_id: int, kind: str, args: Any, fut: concurrent.futures.Future[Any]):
        self.id, self.kind, self.args, self.fut = call_id, kind, args, fut
        self.data: bytes | None = None
        self.retries = 0
        self.submitted = self.queued = time.monotonic()
        self.started = 0.0


class Worker:
    def __init__(self, index: int, cores: WorkerCores):
        self.index, self.cores = index, cores
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: Link | None = None  # the socket and the exit watch of the current process
        self.state = "new"  # new -> starting -> ready -> dead (-> backoff) -> starting; failed
        self.calls: collections.deque[Call] = collections.deque()  # head is running
        self.pid: int | None = None
        self.info: dict[str, Any] = {}
        self.deadline = 0.0  # startup deadline
        self.first_ready = 0.0
        self.ready_at = 0.0  # when the current process became ready
        self.idle_since = 0.0
        self.busy = 0.0
        self.ok = self.failed = self.restarts = self.start_failures = 0
        self.crashes = 0  # crashes in a row (no call succeeded in between)
        self.last_crash = ""  # how the last one ended
        self.restart_at = 0.0  # when a slot in backoff restarts
        self.start_error = ""  # why the last start failed (one line)
        self.start_traceback: str | None = None  # the worker's traceback of that failure
        # Being ended (state "ending"): what runs once its exit is seen, when it is killed (inf:
        # it was), and how it ended when the pool killed it after the grace.
        self.end_then: Callable[[str], None] | None = None
        self.kill_at = math.inf
        self.end_how: str | None = None
        self.lat: collections.deque[float] = collections.deque(maxlen=2048)


def count_crash(w: Worker, where: str, now: float) -> float:
    """Count a crash of ``w`` (described by ``where``); the seconds its restart waits (0: now)."""
    quiet = now - w.ready_at >= _CRASH_QUIET_S  # it served a while: not a crash loop
    w.crashes = 1 if quiet else w.crashes + 1
    w.last_crash = where
    if w.crashes <= _FREE_RESTARTS:
        return 0.0
    first, cap = _RESTART_BACKOFF_S
    return float(min(cap, first * 2.0 ** (w.crashes - _FREE_RESTARTS - 1)))


def one_line(text: str, limit: int = _CAUSE_CHARS) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def startup_error(message: str, tb: str | None) -> WorkerStartupError:
    """The error ``PinnedPool(...)`` raises: ``message`` (one line: the cause) first, then the
    worker's traceback, also kept as ``worker_traceback`` (None when the start failed otherwise)."""
    text = message if tb is None else f"{message}\n\nThe worker's traceback:\n{tb}"
    error = WorkerStartupError(text)
    error.worker_traceback = tb  # type: ignore[attr-defined]
    return error


def gave_up_error(reason: str, tb: str | None = None) -> WorkerCrashed:
    """The error of every call once the pool gave up: ``reason`` is one line (it reaches HTTP
    clients); the last failed start's traceback is ``worker_traceback`` (and in the log)."""
    error = WorkerCrashed(
        f"the PinnedPool gave up and runs no more calls: {reason}. Fix what stops init() and "
        "build a new pool (restart the service)"
    )
    error.worker_traceback = tb  # type: ignore[attr-defined]
    return error


def down_error(
    workers: Sequence[Worker], gave_up: str | None, gave_up_tb: str | None = None
) -> WorkerCrashed | None:
    """The error for a call made now, when the pool gave up or no worker is up and the next
    restart waits (backoff); None when a call can wait for a worker."""
    if gave_up is not None:
        return gave_up_error(gave_up, gave_up_tb)
    if any(w.state not in ("backoff", "failed") for w in workers):
        return None  # one is up, starting or about to
    waiting = [w for w in workers if w.state == "backoff"]
    if not waiting:
        return None
    soonest = min(waiting, key=lambda w: w.restart_at)
    wait = max(0.0, soonest.restart_at - time.monotonic())
    crashed = "; ".join(f"worker {w.index}: {w.crashes} crashes in a row" for w in waiting)
    error = WorkerCrashed(
        f"the PinnedPool's workers keep crashing ({crashed}; the last: {soonest.last_crash}), "
        f"so no worker is running and the next restart is in {wait:.1f}s; this call was not "
        "run. Retry after that; if every call crashes its worker, see the log for the cause"
    )
    error.retry_after = wait  # type: ignore[attr-defined]  # read by the HTTP layer
    return error


def kill(w: Worker) -> None:
    if w.link is not None:  # else it was reaped already
        w.link.kill()


def end(w: Worker, then: Callable[[str], None], *, wait: bool = False) -> None:
    """End ``w``'s process without waiting for it: SIGKILL it now (``wait``: once
    ``LINK_GRACE_S`` pass, see :func:`kill_if_due`), read its socket no more (state "ending"),
    and call ``then(how it ended)`` once its exit is seen (the pool's loop watches it:
    :func:`reap_ended`); at once when it has exited already."""
    if w.link is None or w.link.exited():
        then(reap(w))
        return
    if not wait:
        kill(w)
    w.state, w.end_then, w.end_how = "ending", then, None
    w.kill_at = time.monotonic() + LINK_GRACE_S if wait else math.inf


def kill_if_due(w: Worker, now: float) -> None:
    """Kill ``w``, being ended, once its grace is over (its socket closed, yet it runs on)."""
    if now >= w.kill_at:
        kill(w)
        w.kill_at = math.inf
        w.end_how = (
            f"lost its connection to the pool while its process ran on, and was killed after "
            f"{LINK_GRACE_S:g}s"
        )


def reap_ended(w: Worker) -> None:
    """The exit of ``w``, being ended, was seen: reap it, then go on as :func:`end` was told."""
    then, w.end_then = w.end_then, None
    how = reap(w)
    if w.end_how is not None and how == "was killed by SIGKILL":
        how = w.end_how  # the pool's own kill: say why
    if then is not None:
        then(how)


def reap(w: Worker, wait_s: float = 10.0) -> str:
    """Close ``w``'s connection, wait for its process (killing it after ``wait_s``), kill what is
    left of its process group, and describe how it ended."""
    link, w.link = w.link, None
    code = None
    if w.proc is not None:
        if link is not None and not link.wait_exit(wait_s):
            link.kill()  # the link, not kill(w): w.link is None already
            link.wait_exit(60.0)
        if link is not None:
            # Processes it started and left in its group (a forked child holding its socket and
            # pinned to its cores): killed now, while the unreaped leader keeps the group id this
            # pool's (without a pidfd the leader may be reaped already; a pid is not handed out
            # again before the pid counter wraps).
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)
            except OSError:  # none left (ESRCH), or not ours to signal
                pass
        code = w.proc.wait()
    if link is not None:
        link.close()
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def shutdown_workers(workers: Sequence[Worker], *, kill_all: bool) -> None:
    """Stop the workers at close: a ready one is asked to close and given 5 s to finish, the
    others (``kill_all``: every one) are killed: a replacement still in ``init()`` holds no call
    and its ``init()`` would be thrown away, and one being ended is killed already or now."""
    from multiprocessing.reduction import ForkingPickler

    for w in workers:
        if kill_all or w.state in ("starting", "ending"):
            kill(w)  # reap() kills what it started in its process group too
        elif w.link is not None and w.state == "ready":
            w.link.send(bytes(ForkingPickler.dumps(("close",))))
    end = time.monotonic() + 5.0
    # Let queued bytes (a start's setup, then "close") reach workers still reading them.
    while time.monotonic() < end:
        behind = [
            w.link
            for w in workers
            if w.link is not None and w.link.wants_write and not w.link.exited()
        ]
        if not behind:
            break
        with selectors.PollSelector() as sel:
            for link in behind:
                sel.register(link.sock, selectors.EVENT_WRITE)
            sel.select(min(EXIT_POLL_S, max(0.0, end - time.monotonic())))
        for link in behind:
            link.flush()
    for w in workers:
        if w.proc is not None:
            reap(w, wait_s=end - time.monotonic())
        if w.state != "failed":
            w.state = "stopped"

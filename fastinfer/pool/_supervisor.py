"""The pool's own thread: starts, feeds, watches and restarts the worker processes (private).

Everything here runs on one thread per pool (the children's ``PR_SET_PDEATHSIG`` is tied to it):
it spawns workers by path, dispatches queued calls to the least loaded ready worker, reads their
answers, enforces call timeouts and startup deadlines, and turns a worker's death into failed (or,
with ``idempotent=True``, retried) calls and a restart.

A death is seen from the process itself (a pidfd, see ``_link``), not only from EOF on its socket,
which a child the worker forked can hold open. Each worker leads its own process group, so what
it leaves behind (such a child, holding the old socket and pinned to the same cores) is killed
when it ends, before its replacement starts.

Restarts after crashes in a row wait (backoff), and a pool whose slots all failed to restart gives
up: see ``_slots``. The thread never waits for one worker: a worker to end is killed and its exit
watched from the loop (``_slots.end``), and a call past its timeout is failed only after its answer was
looked for, so time this thread spent elsewhere is not charged to another worker's call.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastinfer.errors import WorkerCrashed, WorkerError, WorkerTimeout
from fastinfer.pool._claims import CpuClaim
from fastinfer.pool._link import Link, Watched, watch
from fastinfer.pool._plan import CorePlan, Split, cpus_str
from fastinfer.pool._records import CallRecord
from fastinfer.pool._slots import (
    EXIT_POLL_S,
    START_TRIES,
    Call,
    Worker,
    count_crash,
    down_error,
    end,
    gave_up_error,
    kill_if_due,
    one_line,
    reap_ended,
    shutdown_workers,
    startup_error,
)
from fastinfer.pool._threads import THREAD_VARS
from fastinfer.pool._wire import remote_error

__all__ = ["Supervisor"]

logger = logging.getLogger("fastinfer.pool")

_WORKER_ENTRY = Path(__file__).with_name("_worker.py")
# Each worker leads a process group of its own (also keeps a terminal's Ctrl+C, meant for the
# parent, from reaching the workers mid-call): ``process_group`` is Python 3.11+.
_OWN_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
)


class Supervisor:
    """What a pool's thread works on (declared here): a PinnedPool holds one, and its thread holds
    only this, never the PinnedPool, so a pool nobody references is collected, and closed."""

    plan: CorePlan
    split: Split
    timeout: float | None
    idempotent: bool
    prefetch: int
    _pin: bool
    _threads: int | None
    _interop: int | None
    _numa: str
    _env: dict[str, str]
    _on_report: Callable[[int, Any], None] | None
    _on_call: Callable[[CallRecord], None] | None
    _startup_timeout: float
    _warms: bool  # workers run fn on a warm-up batch after init
    _setup: bytes
    _notes: list[str]
    _lock: threading.Lock
    _changed: threading.Condition
    _pending: collections.deque[Call]
    _workers: list[Worker]
    _closing: bool
    _closed: bool
    _counts: collections.Counter[str]
    _started: threading.Event
    _startup_error: BaseException | None
    _gave_up: str | None  # why every slot was given up (one line)
    _gave_up_tb: str | None  # the worker's traceback of the last failed start, if any
    _wake_r: socket.socket
    _wake_w: socket.socket
    _claim: CpuClaim  # the pool's CPUs: released once its workers are stopped
    _abandoned: bool  # set by the finalizer of a PinnedPool dropped unclosed: close it

    def _dumps(self, call: Call) -> bytes:
        raise NotImplementedError

    def _note(self, text: str) -> None:
        with self._lock:
            if text not in self._notes:
                self._notes.append(text)

    def _spawn(self, w: Worker) -> None:
        """Start (or restart) worker ``w`` on its cores. Runs on the pool thread only, so the
        children's PR_SET_PDEATHSIG is tied to a thread that lives as long as the pool."""
        threads = self._threads or w.cores.threads
        numa_node = None
        if self._numa != "off" and len(self.plan.nodes) > 1:
            if len(w.cores.nodes) == 1:
                numa_node = w.cores.nodes[0]
            else:
                self._note(f"worker {w.index} spans NUMA nodes {w.cores.nodes}: not bound")
        cfg = {
            "parent_pid": os.getpid(),
            "worker": w.index,
            "cpus": list(w.cores.cpus) if self._pin else None,
            "threads": threads,
            "interop": self._interop,
            "numa_node": numa_node,
            "numa_mode": self._numa,
        }
        env = {**os.environ, **self._env}
        for name in THREAD_VARS:
            env[name] = str(threads)
        parent, child = socket.socketpair()  # a fresh pair per process: never a dead one's
        try:
            w.proc = subprocess.Popen(
                [sys.executable, str(_WORKER_ENTRY), str(child.fileno()), json.dumps(cfg)],
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                **_OWN_GROUP,
            )
        except OSError as exc:  # out of memory or pids: a start failure, not a pool failure
            parent.close()
            w.proc, w.link, w.state = None, None, "starting"
            self._start_failed(w, f"cannot start worker {w.index}: {exc}")
            return
        finally:
            child.close()
        w.link = Link(parent, w.proc)
        w.pid = w.proc.pid
        w.state = "starting"
        w.info = {}
        w.deadline = time.monotonic() + self._startup_timeout
        w.link.send(self._setup)  # if it died at once, its exit reports it

    def _run(self) -> None:
        try:
            for w in self._workers:
                self._spawn(w)
            self._loop()
        except BaseException as exc:  # a bug here must not hang callers
            logger.exception("PinnedPool thread failed")
            why = f"the pool's thread failed: {exc!r}"
            self._fail_everything(lambda: WorkerError(why))
            if not self._started.is_set():
                self._startup_error = WorkerError(why)
                self._started.set()
        finally:
            shutdown_workers(self._workers, kill_all=self._startup_error is not None)
            self._claim.release()
            with self._changed:
                self._closed = True
                self._closing = True
                self._changed.notify_all()
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self) -> None:
        with selectors.PollSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            self._serve(sel)

    def _serve(self, sel: selectors.BaseSelector) -> None:
        watched: Watched = {}
        while True:
            if self._abandoned and not self._closing:  # dropped unclosed: close() it here
                with self._changed:
                    self._closing = True
            # Housekeeping first, so every state change (including ones made while spawning)
            # is acted on before the thread sleeps.
            if not self._started.is_set():
                states = {w.state for w in self._workers}
                if self._startup_error is not None or states == {"ready"}:
                    self._started.set()
                if self._startup_error is not None:
                    return
            self._dispatch()
            with self._lock:
                idle = (
                    self._closing and not self._pending and all(not w.calls for w in self._workers)
                )
                gave_up = self._gave_up
                down = bool(self._pending) and down_error(self._workers, None) is not None
            if gave_up is not None:
                self._fail_everything(functools.partial(gave_up_error, gave_up, self._gave_up_tb))
                return
            if down:  # queued behind a restart that waits: fail them now, not when it comes
                self._fail_pending_while_down()
            if idle and self._started.is_set():
                return

            with self._lock:
                links = [(w, w.link) for w in self._workers if w.link is not None]
                deadline = self._next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if any(link.exit_fd is None for _, link in links):
                timeout = EXIT_POLL_S if timeout is None else min(timeout, EXIT_POLL_S)
            watch(sel, watched, [(w, link, w.state != "ending") for w, link in links])
            events = sel.select(timeout)
            exited = []
            for key, mask in events:
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                w, link, what = key.data
                if what == "exit":  # the pidfd: handled once the sockets have been read
                    exited.append((w, link))
                elif w.link is link and w.state != "ending":
                    if mask & selectors.EVENT_WRITE:
                        link.flush()
                    if mask & selectors.EVENT_READ:
                        self._receive(w, link)
            exited += [(w, link) for w, link in links if link.exit_fd is None and link.exited()]
            for w, link in exited:
                if w.link is link and w.state == "ending":
                    reap_ended(w)
                elif w.link is link:
                    # What it sent before dying (a result, an init error) counts; then its exit.
                    self._receive(w, link, ended=True)
            self._check_deadlines()

    def _receive(self, w: Worker, link: Link, *, ended: bool = False) -> None:
        """Handle the messages ``w`` has sent, then its exit at EOF (or ``ended``: the process
        has exited, and a child it forked may hold its socket open, so no EOF may ever come)."""
        messages, eof = link.receive(everything=ended)
        for raw in messages:
            if w.link is not link or w.state == "ending":
                return  # a message showed the worker dead (and it was restarted, or is ended)
            self._on_message(w, raw)
        if (eof or ended) and w.link is link and w.state != "ending":
            self._on_exit(w, wait=not ended)

    def _next_deadline(self) -> float | None:
        ds = [w.deadline for w in self._workers if w.state == "starting"]
        ds += [w.restart_at for w in self._workers if w.state == "backoff"]
        ds += [w.kill_at for w in self._workers if w.state == "ending" and w.kill_at < math.inf]
        if self.timeout is not None:
            ds += [
                w.calls[0].started + self.timeout
                for w in self._workers
                if w.calls and w.state == "ready"
            ]
        return min(ds) if ds else None

    def _late(self, w: Worker, now: float) -> bool:
        """``w``'s running call is past its timeout and its answer is not waiting to be read
        (this thread may have been busy elsewhere when it came: that is not the call's time)."""
        if self.timeout is None or w.state != "ready" or not w.calls:
            return False
        if now < w.calls[0].started + self.timeout:
            return False
        if w.link is not None:
            self._receive(w, w.link)
        return w.state == "ready" and bool(w.calls) and now >= w.calls[0].started + self.timeout

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.state == "ending":
                kill_if_due(w, now)
            elif w.state == "backoff" and now >= w.restart_at:
                if self._closing and not self._pending:
                    w.state = "dead"  # closing: no restart is needed
                else:
                    with self._lock:
                        w.restarts += 1
                    self._spawn(w)
            elif w.state == "starting" and now >= w.deadline:
                self._start_failed(
                    w, f"worker {w.index} did not start within {self._startup_timeout:g}s"
                )
            elif self._late(w, now):
                assert self.timeout is not None
                call = w.calls.popleft()
                self._requeue(w)
                self._counts["timeouts"] += 1
                self._finish(
                    w,
                    call,
                    "timeout",
                    error=WorkerTimeout(
                        f"call ran past its timeout of {self.timeout:g}s on worker {w.index} "
                        f"(pid {w.pid}, cpus {cpus_str(w.cores.cpus)}); the worker was replaced"
                    ),
                )
                end(w, functools.partial(self._restart, w))

    def _on_message(self, w: Worker, raw: bytes) -> None:
        from multiprocessing.reduction import ForkingPickler

        try:
            msg = ForkingPickler.loads(raw)
        except Exception as exc:
            gone = isinstance(exc, (OSError, EOFError)) and (w.link is None or w.link.exited())
            if w.state != "ready" or not w.calls or gone:
                # A result whose shared-memory handles cannot be fetched because the worker died
                # between sending and our fetching, or a garbled start: a crash of that call.
                logger.warning(
                    "PinnedPool: cannot read a message from worker %d", w.index, exc_info=True
                )
                self._on_exit(w)
                return
            # A healthy worker's answer that this process cannot rebuild (a class it cannot
            # import, a reduce it cannot call): that call fails; the worker is fine and keeps its
            # place, and the call, which did run, is never retried.
            call = w.calls.popleft()
            if w.calls:
                w.calls[0].started = time.monotonic()
            error = WorkerError(
                f"the answer of worker {w.index} (pid {w.pid}) to this call cannot be rebuilt in "
                f"this process ({type(exc).__name__}: {exc}); return types that import the same "
                "way in the parent (module-level classes, plain data, tensors)"
            )
            self._finish(w, call, "failed", error=error)
            return
        kind = msg[0]
        if kind == "ready":
            w.state, w.info = "ready", msg[1]
            w.start_failures = 0
            now = time.monotonic()
            w.idle_since = now
            w.ready_at = now
            if not w.first_ready:
                w.first_ready = now
            for note in w.info.get("notes", []):
                self._note(f"worker {w.index}: {note}")
            with self._changed:
                self._changed.notify_all()
        elif kind == "init_error":
            what = "init() or its warm-up call" if self._warms else "init()"
            tb = msg[1]
            cause = msg[2] if len(msg) > 2 else (tb.strip().splitlines() or ["?"])[-1]
            self._start_failed(w, f"worker {w.index}'s {what} raised {one_line(cause)}", tb=tb)
        elif kind in ("ok", "err"):
            if not w.calls or w.calls[0].id != msg[1]:
                logger.error("PinnedPool: worker %d answered an unknown call %r", w.index, msg[1])
                return
            w.crashes = 0  # it survived a call: whatever crashed it before is not every call
            call = w.calls.popleft()
            if w.calls:  # the prefetched call starts now
                w.calls[0].started = time.monotonic()
            if kind == "ok":
                _, _, result, exec_s, has_report, report = msg
                self._finish(w, call, "ok", result=result, execution=exec_s)
            else:
                _, _, blob, tb, described, exec_s, has_report, report = msg
                where = f"worker {w.index} (pid {w.pid})"
                failure = remote_error(blob, tb, described, where)
                self._finish(w, call, "failed", error=failure, execution=exec_s)
            if has_report and self._on_report is not None:
                try:
                    self._on_report(w.index, report)
                except Exception:
                    logger.exception("PinnedPool: on_worker_report raised")

    def _finish(
        self,
        w: Worker,
        call: Call,
        outcome: Literal["ok", "failed", "crashed", "timeout"],
        *,
        result: Any = None,
        error: BaseException | None = None,
        execution: float | None = None,
    ) -> None:
        now = time.monotonic()
        service = now - call.started
        with self._lock:
            w.busy += service
            w.idle_since = now
            w.lat.append(service)
            if outcome == "ok":
                w.ok += 1
                self._counts["ok"] += 1
            else:
                w.failed += 1
                self._counts["failed"] += 1
        if error is None:
            call.fut.set_result(result)
        else:
            call.fut.set_exception(error)
        if self._on_call is not None:
            rec = CallRecord(
                w.index,
                outcome,
                call.started - call.queued,
                service,
                execution,
                now - call.submitted,
            )
            try:
                self._on_call(rec)
            except Exception:
                logger.exception("PinnedPool: on_call raised")

    def _on_exit(self, w: Worker, *, wait: bool = False) -> None:
        """The worker died (its exit was seen), or must: its socket closed (EOF, ``wait``: it may
        still run, so it gets ``LINK_GRACE_S`` to exit before it is killed), or it sent what
        cannot be read (killed now). Once it is gone, its calls fail (or are retried) and it
        restarts, or its start failed."""
        starting = w.state == "starting"

        def then(how: str) -> None:
            if starting:
                self._start_failed(w, f"worker {w.index} {how} during startup")
            else:
                self._crashed(w, how)

        end(w, then, wait=wait)

    def _crashed(self, w: Worker, how: str) -> None:
        """``w``, ended, held calls (or could have): a crash of the call it ran."""
        call = w.calls.popleft() if w.calls else None
        self._requeue(w)
        self._counts["crashes"] += 1
        where = f"worker {w.index} (pid {w.pid}, cpus {cpus_str(w.cores.cpus)}) {how}"
        now = time.monotonic()
        with self._lock:  # decided before the call fails, so its caller sees the backoff
            delay = count_crash(w, where, now)
            if delay > 0:
                w.state, w.restart_at = "backoff", now + delay
        then = f"in {delay:.3g}s ({w.crashes} crashes in a row)" if delay else "on the same cores"
        logger.warning("PinnedPool: %s; restarting it %s", where, then)
        if call is not None:
            if self.idempotent and call.retries == 0 and not self._closed:
                call.retries += 1
                self._counts["retries"] += 1
                try:
                    # Handles are single-use: pickle again, copying the caller's tensors afresh
                    # (the worker that died may have changed its copy in place).
                    call.data = self._dumps(call)
                    with self._lock:
                        self._pending.appendleft(call)
                except Exception as exc:
                    self._finish(
                        w, call, "crashed", error=WorkerCrashed(f"{where}; retry failed: {exc}")
                    )
            else:
                again = " (it had been retried once already)" if call.retries else ""
                self._finish(
                    w, call, "crashed", error=WorkerCrashed(f"{where} while running a call{again}")
                )
        if delay == 0:
            self._restart(w)

    def _requeue(self, w: Worker) -> None:
        """Put a dead worker's prefetched calls back at the front of the queue. They never
        started (the worker runs calls in order and their predecessor never answered), and the
        worker never read them, so their shared-memory handles are still unused."""
        with self._lock:
            while w.calls:
                call = w.calls.pop()
                call.started = 0.0
                self._pending.appendleft(call)

    def _restart(self, w: Worker, how: str = "") -> None:
        """Start ``w`` again (it has been ended and reaped), unless the pool is closing idle."""
        w.state = "dead"
        if self._closing and not self._pending:
            return
        with self._lock:
            w.restarts += 1
        self._spawn(w)

    def _start_failed(self, w: Worker, message: str, *, tb: str | None = None) -> None:
        """``w`` failed to start: ``message`` is one line (it reaches callers, and HTTP clients
        through them), ``tb`` the worker's traceback (logged, and kept for operators). A process
        still there is ended first (killed; this goes on once it is reaped)."""
        if w.link is not None:
            end(w, lambda how: self._start_failed(w, message, tb=tb))
            return
        if not self._started.is_set():
            if self._startup_error is None:
                self._startup_error = startup_error(message, tb)
            w.state = "failed"
            return
        w.start_failures += 1
        w.start_error, w.start_traceback = message, tb
        logger.error("PinnedPool: %s%s", message, f"\nThe worker's traceback:\n{tb}" if tb else "")
        if w.start_failures >= START_TRIES:
            logger.error(
                "PinnedPool: worker %d failed to start %d times; giving up on it",
                w.index,
                START_TRIES,
            )
            with self._changed:
                w.state = "failed"
                if all(x.state == "failed" for x in self._workers):
                    self._gave_up = (
                        f"every worker failed to start {START_TRIES} times in a row after a "
                        f"crash; the last error: {w.start_error}"
                    )
                    self._gave_up_tb = w.start_traceback
                    logger.error("PinnedPool: gave up: %s", self._gave_up)
                self._changed.notify_all()
            return
        self._restart(w)

    def _fail_pending_while_down(self) -> None:
        """Fail the queued calls with :func:`down_error` (workers change state only on this
        thread, so it holds for them all)."""
        with self._lock:
            calls = list(self._pending)
            self._pending.clear()
            errors = [  # one each
                down_error(self._workers, self._gave_up, self._gave_up_tb) for _ in calls
            ]
        for call, error in zip(calls, errors):
            if error is not None and (
                call.fut.running() or call.fut.set_running_or_notify_cancel()
            ):
                with self._lock:
                    self._counts["failed"] += 1
                call.fut.set_exception(error)

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                free = [
                    w for w in self._workers if w.state == "ready" and len(w.calls) <= self.prefetch
                ]
                if not free or not self._pending:
                    return
                call = self._pending.popleft()
                # least loaded: fewest calls held, then the longest idle (or longest running)
                w = min(
                    free,
                    key=lambda w: (
                        len(w.calls),
                        w.calls[0].started if w.calls else w.idle_since,
                        w.index,
                    ),
                )
            # a retried call is already running; a fresh one may have been cancelled meanwhile
            if not call.fut.running() and not call.fut.set_running_or_notify_cancel():
                self._counts["cancelled"] += 1
                continue
            if not w.calls:
                call.started = time.monotonic()
            w.calls.append(call)
            assert call.data is not None and w.link is not None
            # Never blocks: what the socket cannot take now goes when the worker reads. If the
            # worker died, its exit is seen next and the call fails (or is retried) with the crash.
            w.link.send(call.data)

    def _fail_everything(self, error: Callable[[], WorkerError]) -> None:
        """Fail every queued and running call, each with an exception of its own."""
        with self._lock:
            calls = list(self._pending)
            self._pending.clear()
            self._closing = True
        for w in self._workers:
            calls.extend(w.calls)
            w.calls.clear()
        for call in calls:
            if not call.fut.done() and (
                call.fut.running() or call.fut.set_running_or_notify_cancel()
            ):
                call.fut.set_exception(error())

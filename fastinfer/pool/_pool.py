"""Core pinning: a topology-aware plan, thread configuration and a pinned worker-process pool.

- :class:`CorePlan` reads the CPUs this process may use (affinity, cpuset), their physical cores,
  SMT siblings, sockets and NUMA nodes from sysfs, and the cgroup CPU quota; ``plan.split(n)``
  gives ``n`` workers disjoint physical cores and a thread count each.
- :func:`configure_threads` sets torch's intra/inter-op threads and OMP/MKL variables together
  for the single-process case.
- :class:`PinnedPool` runs ``fn(state, batch)`` in worker processes that pin themselves *before*
  importing torch, share tensors through shared memory, survive crashes and hangs, and never
  outlive the parent.

::

    pool = PinnedPool(load_model, predict, workers=2)
    y = pool.submit(x).result()          # or: y = await pool.run(x)
    pool.close()

See docs/pool.md.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import json
import logging
import os
import pickle
import signal
import socket
import statistics as _stats
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal

from fastinfer._topology import (
    THREAD_VARS,
    Core,
    CorePlan,
    Split,
    ThreadSettings,
    WorkerCores,
    configure_threads,
    cpus_str,
)
from fastinfer.errors import (
    ClosedError,
    ConfigError,
    WorkerCrashed,
    WorkerError,
    WorkerStartupError,
    WorkerTimeout,
)

__all__ = [
    "CallRecord",
    "Core",
    "CorePlan",
    "PinnedPool",
    "PoolStatistics",
    "Split",
    "ThreadSettings",
    "WorkerCores",
    "WorkerStatistics",
    "configure_threads",
    "worker_state",
]

logger = logging.getLogger(__name__)

_WORKER_ENTRY = Path(__file__).with_name("_pool_worker.py")
_worker_state: Any = None  # set inside a worker process after init()
_dumps_fn: Callable[[Any], bytes] | None = None


def worker_state() -> Any:
    """Inside a :class:`PinnedPool` worker: the object its ``init()`` returned (None elsewhere).

    Functions submitted Executor-style (``pool.submit(func, *args)``) use it to reach the model.
    """
    return _worker_state


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallRecord:
    """One finished call, for ``on_call=`` (e.g. a metrics recorder). Seconds."""

    worker: int
    outcome: Literal["ok", "failed", "crashed", "timeout", "cancelled"]
    queue_wait: float
    service: float  # dispatch to result, as seen by the parent (includes transport)
    execution: float | None  # fn() alone, measured in the worker
    latency: float  # submit to result


@dataclass(frozen=True)
class WorkerStatistics:
    """One worker slot. Latencies are the parent-side service times of recent calls (seconds)."""

    worker: int
    pid: int | None
    alive: bool
    state: str
    cpus: tuple[int, ...]
    threads: int
    in_flight: int
    calls_ok: int
    calls_failed: int
    restarts: int
    busy_ratio: float
    latency_count: int
    latency_mean: float
    latency_p50: float
    latency_p95: float
    latency_p99: float
    latency_max: float


@dataclass(frozen=True)
class PoolStatistics:
    """A frozen snapshot of a :class:`PinnedPool` (names map to the ``fastinfer_*`` metrics)."""

    workers: int
    workers_alive: int
    worker_restarts_total: int
    queue_depth: int
    calls_in_flight: int
    requests_ok: int
    requests_failed: int
    requests_cancelled: int
    crashes: int
    timeouts: int
    retries: int
    busy_ratio: float
    queue_per_worker: dict[int, int]
    busy_ratio_per_worker: dict[int, float]
    per_worker: tuple[WorkerStatistics, ...]
    foreign_load_warning: str | None
    notes: tuple[str, ...]
    closed: bool


class _Call:
    __slots__ = ("args", "data", "fut", "id", "kind", "queued", "retries", "started", "submitted")

    def __init__(self, call_id: int, kind: str, args: Any, fut: concurrent.futures.Future[Any]):
        self.id, self.kind, self.args, self.fut = call_id, kind, args, fut
        self.data: bytes | None = None
        self.retries = 0
        self.submitted = self.queued = time.monotonic()
        self.started = 0.0


class _Worker:
    def __init__(self, index: int, cores: WorkerCores):
        self.index, self.cores = index, cores
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.state = "new"  # new -> starting -> ready -> dead/failed
        self.calls: collections.deque[_Call] = collections.deque()  # head is running
        self.pid: int | None = None
        self.info: dict[str, Any] = {}
        self.deadline = 0.0  # startup deadline
        self.first_ready = 0.0
        self.idle_since = 0.0
        self.busy = 0.0
        self.ok = self.failed = self.restarts = self.start_failures = 0
        self.lat: collections.deque[float] = collections.deque(maxlen=2048)


def _remote_error(exc: BaseException | None, tb: str) -> BaseException:
    if exc is None:
        return WorkerError(f"the call failed in the worker:\n{tb}")
    exc.__cause__ = _RemoteTraceback(tb)
    return exc


class _RemoteTraceback(Exception):
    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def _sample_cpu_load(cpus: Sequence[int], interval: float = 0.25) -> dict[int, float]:
    """Per-CPU utilisation (percent) over ``interval`` seconds."""
    import psutil  # lazily: importing psutil after torch costs ~80 ms (its namedtuples)

    per = psutil.cpu_percent(interval=interval, percpu=True)
    return {c: per[c] for c in cpus if c < len(per)}


def _foreign_load_message(load: Mapping[int, float], threshold: float) -> str | None:
    busy = {c: p for c, p in sorted(load.items()) if p >= threshold}
    if not busy:
        return None
    shown = ", ".join(f"cpu{c} {p:.0f}%" for c, p in busy.items())
    return (
        f"the pool's CPUs are busy with foreign load before it started ({shown}); pinning "
        "assumes the cores are the pool's own, and a pinned worker sharing a core with another "
        "process can lose to an unpinned one. Move the other load, use fewer workers, or pass "
        "pin=False."
    )


_NUMA_MODES = ("off", "preferred", "bind")


class PinnedPool(concurrent.futures.Executor):
    """Worker processes pinned to disjoint physical cores, each serving ``fn(state, batch)``.

    Each worker pins itself (``sched_setaffinity``), sets OMP/MKL variables and torch's thread
    count *before* importing torch, then calls ``init()`` once and serves calls one at a time.
    Calls wait in one queue and go to the next free worker (least loaded). Tensors in arguments
    and results travel through shared memory, not pickled bytes.

    Args:
        init: zero-argument, picklable (module-level) function returning the worker's state
            (load the model here).
        fn: picklable ``fn(state, batch) -> result``.
        workers: number of workers (default: :meth:`CorePlan.default_workers`).
        plan: a :class:`CorePlan` (default: :meth:`CorePlan.detect`).
        timeout: seconds a call may run; past it the call fails with :class:`WorkerTimeout` and
            its worker is replaced. None: no limit.
        idempotent: retry a call once on another worker when its worker crashed.
        pin: False leaves workers unpinned (for comparisons); threads are still set.
        threads: threads per worker (default: the plan's, physical cores ÷ workers).
        interop_threads: torch inter-op threads per worker (default 1).
        smt: pin to SMT siblings too and count them as threads.
        numa: "preferred" or "bind" binds each worker's memory to its NUMA node when the machine
            has several (a no-op, with a note in statistics, on one node).
        env: extra environment for the workers, applied before torch is imported (e.g.
            ``{"TORCHINDUCTOR_CACHE_DIR": path}`` so all workers share one compile cache).
        worker_report: picklable ``worker_report(state) -> payload`` run in the worker after a call
            (at most every ``report_interval`` seconds); ``on_worker_report(worker, payload)``
            receives it in the parent (on the pool's thread: keep it quick).
        on_call: receives a :class:`CallRecord` for every finished call.
        startup_timeout: seconds a worker may take to become ready.
        load_warning_threshold: per-CPU utilisation (%) of foreign load that triggers the
            busy-cores warning at start; None skips the check.
        prefetch: calls sent to a worker ahead of the one it runs (default 1), so it never
            waits for the parent between calls; 0 sends one call at a time.

    Raises :class:`WorkerStartupError` (with the worker's traceback) when a worker fails to start.
    """

    def __init__(
        self,
        init: Callable[[], Any],
        fn: Callable[[Any, Any], Any],
        *,
        workers: int | None = None,
        plan: CorePlan | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        start_method: str = "spawn",
        pin: bool = True,
        threads: int | None = None,
        interop_threads: int | None = 1,
        smt: bool = False,
        numa: Literal["off", "preferred", "bind"] = "off",
        env: Mapping[str, str] | None = None,
        worker_report: Callable[[Any], Any] | None = None,
        report_interval: float = 0.0,
        on_worker_report: Callable[[int, Any], None] | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        startup_timeout: float = 300.0,
        load_warning_threshold: float | None = 50.0,
        prefetch: int = 1,
    ) -> None:
        if start_method != "spawn":
            raise ConfigError(
                f"start_method={start_method!r} is not supported: PinnedPool always starts fresh "
                "interpreters ('spawn'); forking a process whose torch threads exist can deadlock"
            )
        for name, f in (("init", init), ("fn", fn), ("worker_report", worker_report)):
            if f is None and name == "worker_report":
                continue
            if not callable(f):
                raise ConfigError(f"{name} must be callable, got {f!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if not startup_timeout > 0:
            raise ConfigError(f"startup_timeout must be > 0, got {startup_timeout!r}")
        if numa not in _NUMA_MODES:
            raise ConfigError(f"numa must be one of {_NUMA_MODES}, got {numa!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be an int >= 1 or None, got {threads!r}")
        if interop_threads is not None and (
            not isinstance(interop_threads, int) or interop_threads < 1
        ):
            raise ConfigError(
                f"interop_threads must be an int >= 1 or None, got {interop_threads!r}"
            )
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ConfigError(f"prefetch must be an int >= 0, got {prefetch!r}")
        if report_interval < 0:
            raise ConfigError(f"report_interval must be >= 0, got {report_interval!r}")
        env = dict(env or {})
        bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ConfigError(f"env must map str to str; bad entries: {bad}")
        blobs = {}
        for name, f in (("init", init), ("fn", fn), ("report", worker_report)):
            try:
                blobs[name] = None if f is None else pickle.dumps(f)
            except Exception as exc:
                raise ConfigError(
                    f"{name}={f!r} cannot be pickled for the worker processes ({exc}); use a "
                    "module-level function (or functools.partial of one), not a lambda or a "
                    "nested function"
                ) from exc

        self.plan = plan if plan is not None else CorePlan.detect()
        n = self.plan.default_workers() if workers is None else workers
        self.split = self.plan.split(n, smt=smt)
        self.timeout = timeout
        self.idempotent = idempotent
        self._pin, self._threads, self._interop = pin, threads, interop_threads
        self._numa, self._env = numa, env
        self._on_report, self._on_call = on_worker_report, on_call
        self._startup_timeout = startup_timeout
        self.prefetch = prefetch
        import multiprocessing.spawn

        prep = multiprocessing.spawn.get_preparation_data("fastinfer-pool-worker")
        # The workers share our authkey (as multiprocessing's spawn does) so they can fetch
        # shared-memory tensor handles from our resource sharer and we from theirs.
        prep["authkey"] = bytes(prep["authkey"])
        self._setup = pickle.dumps(
            {
                "prep": prep,
                "init": blobs["init"],
                "fn": blobs["fn"],
                "report": blobs["report"],
                "report_interval": report_interval,
            }
        )
        self._notes: list[str] = list(self.split.notes)
        if numa != "off" and len(self.plan.nodes) < 2:
            self._notes.append(f"numa={numa!r} ignored: this machine has one NUMA node")
        self.foreign_load_warning: str | None = None
        if load_warning_threshold is not None:
            cpus = sorted({c for w in self.split for c in w.cpus})
            msg = _foreign_load_message(_sample_cpu_load(cpus), load_warning_threshold)
            if msg:
                self.foreign_load_warning = msg
                logger.warning("PinnedPool: %s", msg)

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a worker became ready / failed
        self._pending: collections.deque[_Call] = collections.deque()
        self._workers = [_Worker(i, wc) for i, wc in enumerate(self.split)]
        self._ids = itertools.count()
        self._closing = False
        self._closed = False
        self._counts = collections.Counter[str]()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="fastinfer-pool", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    # ---------------------------------------------------------------- public API

    @property
    def workers(self) -> int:
        """Number of worker slots."""
        return len(self._workers)

    def submit(self, x: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(state, x)`` on the next free worker; returns a Future. Thread-safe.

        With a callable first argument it follows the :class:`~concurrent.futures.Executor`
        protocol instead, running ``x(*args, **kwargs)`` in a worker (that is what
        ``loop.run_in_executor(pool, func, *args)`` calls; ``worker_state()`` gives the state).
        Raises :class:`ClosedError` after :meth:`close`.
        """
        if callable(x):
            kind, payload = "exec", (x, args, kwargs)
        elif args or kwargs:
            raise ConfigError(
                "submit(x) takes one batch for fn(state, x); to run a function in a worker pass "
                f"a callable first (got {type(x).__name__} with extra arguments)"
            )
        else:
            kind, payload = "fn", x
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                raise ClosedError("cannot submit to a closed PinnedPool")
            call = _Call(next(self._ids), kind, payload, fut)
        try:
            # Pickle here, on the caller's thread: tensors move to shared memory (one copy the
            # first time a tensor is sent, none after) and only a handle is sent.
            call.data = self._dumps(call)
        except Exception as exc:
            raise ConfigError(f"cannot send this {kind} call to a worker: {exc}") from exc
        with self._lock:
            if self._closing:
                raise ClosedError("cannot submit to a closed PinnedPool")
            self._pending.append(call)
        self._wake()
        return fut

    async def run(self, x: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``await pool.run(x)``: :meth:`submit` for asyncio code."""
        return await asyncio.wrap_future(self.submit(x, *args, **kwargs))

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker is ready (after start or restarts). False on timeout.

        Calls never need this (they queue while a worker restarts); it is for tests, health
        checks and benchmarks that want the whole pool. Returns False at once if the pool is
        closed or a worker slot gave up restarting.
        """

        def settled() -> bool:
            states = {w.state for w in self._workers}
            return states == {"ready"} or self._closing or "failed" in states

        with self._changed:
            self._changed.wait_for(settled, timeout)
            return {w.state for w in self._workers} == {"ready"} and not self._closing

    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting calls, finish the queued and running ones, stop the workers and join.

        ``cancel_pending=True`` cancels queued calls instead of running them. Idempotent.
        """
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            if cancel_pending:
                keep: collections.deque[_Call] = collections.deque()
                while self._pending:
                    call = self._pending.popleft()
                    if call.fut.cancel():
                        self._counts["cancelled"] += 1
                    else:  # already running (re-queued after a crash): it still gets a result
                        keep.append(call)
                self._pending = keep
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The :class:`~concurrent.futures.Executor` spelling of :meth:`close`."""
        if wait:
            self.close(cancel_pending=cancel_futures)
        else:
            self.close(cancel_pending=cancel_futures, timeout=0)

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot: workers alive, restarts, queue per worker, busy share, latencies."""
        now = time.monotonic()
        with self._lock:
            per = []
            for w in self._workers:
                lat = sorted(w.lat)
                up = now - w.first_ready if w.first_ready else 0.0
                head = w.calls[0] if w.calls else None
                busy = w.busy + (now - head.started if head else 0.0)
                per.append(
                    WorkerStatistics(
                        worker=w.index,
                        pid=w.pid,
                        alive=w.state == "ready",
                        state=w.state,
                        cpus=tuple(w.info.get("affinity") or w.cores.cpus),
                        threads=int(w.info.get("threads", self._threads or w.cores.threads)),
                        in_flight=len(w.calls),
                        calls_ok=w.ok,
                        calls_failed=w.failed,
                        restarts=w.restarts,
                        busy_ratio=min(1.0, busy / up) if up > 0 else 0.0,
                        latency_count=len(lat),
                        latency_mean=_stats.fmean(lat) if lat else 0.0,
                        latency_p50=_quantile(lat, 0.5),
                        latency_p95=_quantile(lat, 0.95),
                        latency_p99=_quantile(lat, 0.99),
                        latency_max=lat[-1] if lat else 0.0,
                    )
                )
            alive = [p for p in per if p.alive]
            return PoolStatistics(
                workers=len(per),
                workers_alive=len(alive),
                worker_restarts_total=sum(p.restarts for p in per),
                queue_depth=len(self._pending),
                calls_in_flight=sum(p.in_flight for p in per),
                requests_ok=self._counts["ok"],
                requests_failed=self._counts["failed"],
                requests_cancelled=self._counts["cancelled"],
                crashes=self._counts["crashes"],
                timeouts=self._counts["timeouts"],
                retries=self._counts["retries"],
                busy_ratio=_stats.fmean(p.busy_ratio for p in per) if per else 0.0,
                queue_per_worker={p.worker: p.in_flight for p in per},
                busy_ratio_per_worker={p.worker: p.busy_ratio for p in per},
                per_worker=tuple(per),
                foreign_load_warning=self.foreign_load_warning,
                notes=tuple(self._notes),
                closed=self._closed,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return f"<PinnedPool {state} workers={len(self._workers)}>"

    # ---------------------------------------------------------------- internals

    def _dumps(self, call: _Call) -> bytes:
        global _dumps_fn
        if _dumps_fn is None:
            from fastinfer._pool_worker import make_dumps

            _dumps_fn = make_dumps()
        return _dumps_fn(("call", call.id, call.kind, call.args))

    def _note(self, text: str) -> None:
        with self._lock:
            if text not in self._notes:
                self._notes.append(text)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _spawn(self, w: _Worker) -> None:
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
        parent, child = socket.socketpair()
        try:
            w.proc = subprocess.Popen(
                [sys.executable, str(_WORKER_ENTRY), str(child.fileno()), json.dumps(cfg)],
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:  # out of memory or pids: a start failure, not a pool failure
            parent.close()
            w.proc, w.conn, w.state = None, None, "starting"
            self._start_failed(w, f"cannot start worker {w.index}: {exc}", reaped=True)
            return
        finally:
            child.close()
        w.conn = Connection(parent.detach())
        w.pid = w.proc.pid
        w.state = "starting"
        w.info = {}
        w.deadline = time.monotonic() + self._startup_timeout
        try:
            w.conn.send_bytes(self._setup)
        except OSError:
            pass  # it died at once; the EOF path reports it

    def _run(self) -> None:
        try:
            for w in self._workers:
                self._spawn(w)
            self._loop()
        except BaseException as exc:  # a bug here must not hang callers
            logger.exception("PinnedPool thread failed")
            self._fail_everything(WorkerError(f"the pool's thread failed: {exc!r}"))
            if not self._started.is_set():
                self._startup_error = WorkerError(f"the pool's thread failed: {exc!r}")
                self._started.set()
        finally:
            self._shutdown_workers()
            with self._changed:
                self._closed = True
                self._closing = True
                self._changed.notify_all()
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self) -> None:
        while True:
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
                no_workers = all(w.state == "failed" for w in self._workers)
            if no_workers:
                self._fail_everything(
                    WorkerCrashed("every PinnedPool worker failed to restart; see the log")
                )
                return
            if idle and self._started.is_set():
                return

            with self._lock:
                conns = {w.conn: w for w in self._workers if w.conn is not None}
                deadline = self._next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([*conns, self._wake_r], timeout)
            if self._wake_r in ready:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            for conn in ready:
                if conn is self._wake_r:
                    continue
                w = conns[conn]  # type: ignore[index]
                try:
                    raw = conn.recv_bytes()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self._on_exit(w)
                    continue
                self._on_message(w, raw)
            self._check_deadlines()

    def _next_deadline(self) -> float | None:
        ds = [w.deadline for w in self._workers if w.state == "starting"]
        if self.timeout is not None:
            ds += [w.calls[0].started + self.timeout for w in self._workers if w.calls]
        return min(ds) if ds else None

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.state == "starting" and now >= w.deadline:
                self._kill(w)
                self._start_failed(
                    w, f"worker {w.index} did not start within {self._startup_timeout:g}s"
                )
            elif self.timeout is not None and w.calls and now >= w.calls[0].started + self.timeout:
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
                self._kill(w)
                self._restart(w)

    def _on_message(self, w: _Worker, raw: bytes) -> None:
        from multiprocessing.reduction import ForkingPickler

        try:
            msg = ForkingPickler.loads(raw)
        except Exception:
            # A result whose shared-memory handles cannot be fetched (the worker died between
            # sending and our fetching): treat as a crash of that call.
            logger.warning(
                "PinnedPool: cannot read a message from worker %d", w.index, exc_info=True
            )
            self._kill(w)
            self._on_exit(w)
            return
        kind = msg[0]
        if kind == "ready":
            w.state, w.info = "ready", msg[1]
            w.start_failures = 0
            now = time.monotonic()
            w.idle_since = now
            if not w.first_ready:
                w.first_ready = now
            for note in w.info.get("notes", []):
                self._note(f"worker {w.index}: {note}")
            with self._changed:
                self._changed.notify_all()
        elif kind == "init_error":
            self._kill(w)
            self._start_failed(w, f"worker {w.index}'s init() raised:\n{msg[1]}")
        elif kind in ("ok", "err"):
            if not w.calls or w.calls[0].id != msg[1]:
                logger.error("PinnedPool: worker %d answered an unknown call %r", w.index, msg[1])
                return
            call = w.calls.popleft()
            if w.calls:  # the prefetched call starts now
                w.calls[0].started = time.monotonic()
            if kind == "ok":
                _, _, result, exec_s, has_report, report = msg
                self._finish(w, call, "ok", result=result, execution=exec_s)
            else:
                _, _, exc, tb, exec_s, has_report, report = msg
                self._finish(w, call, "failed", error=_remote_error(exc, tb), execution=exec_s)
            if has_report and self._on_report is not None:
                try:
                    self._on_report(w.index, report)
                except Exception:
                    logger.exception("PinnedPool: on_worker_report raised")

    def _finish(
        self,
        w: _Worker,
        call: _Call,
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

    def _kill(self, w: _Worker) -> None:
        if w.proc is not None and w.proc.poll() is None:
            try:
                w.proc.kill()
            except OSError:
                pass

    def _reap(self, w: _Worker) -> str:
        """Close the connection, wait for the process, and describe how it ended."""
        if w.conn is not None:
            w.conn.close()
            w.conn = None
        code = None
        if w.proc is not None:
            try:
                code = w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                code = w.proc.wait()
        if code is None:
            return "ended"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def _on_exit(self, w: _Worker) -> None:
        """The worker's connection hit EOF: it died (or exited during startup)."""
        how = self._reap(w)
        if w.state == "starting":
            self._start_failed(w, f"worker {w.index} {how} during startup", reaped=True)
            return
        call = w.calls.popleft() if w.calls else None
        self._requeue(w)
        self._counts["crashes"] += 1
        where = f"worker {w.index} (pid {w.pid}, cpus {cpus_str(w.cores.cpus)}) {how}"
        logger.warning("PinnedPool: %s; restarting it on the same cores", where)
        if call is not None:
            if self.idempotent and call.retries == 0 and not self._closed:
                call.retries += 1
                self._counts["retries"] += 1
                try:
                    call.data = self._dumps(call)  # handles are single-use: pickle again
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
        self._restart(w, reaped=True)

    def _requeue(self, w: _Worker) -> None:
        """Put a dead worker's prefetched calls back at the front of the queue. They never
        started (the worker runs calls in order and their predecessor never answered), and the
        worker never read them, so their shared-memory handles are still unused."""
        with self._lock:
            while w.calls:
                call = w.calls.pop()
                call.started = 0.0
                self._pending.appendleft(call)

    def _restart(self, w: _Worker, *, reaped: bool = False) -> None:
        if not reaped:
            self._reap(w)
        w.state = "dead"
        if self._closing and not self._pending:
            return
        with self._lock:
            w.restarts += 1
        self._spawn(w)

    def _start_failed(self, w: _Worker, message: str, *, reaped: bool = False) -> None:
        if not reaped:
            self._reap(w)
        if not self._started.is_set():
            if self._startup_error is None:
                self._startup_error = WorkerStartupError(message)
            w.state = "failed"
            return
        w.start_failures += 1
        logger.error("PinnedPool: %s", message)
        if w.start_failures >= 3:
            logger.error("PinnedPool: worker %d failed to start 3 times; giving up on it", w.index)
            w.state = "failed"
            with self._changed:
                self._changed.notify_all()
            return
        self._restart(w, reaped=True)

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
            assert call.data is not None
            try:
                assert w.conn is not None
                w.conn.send_bytes(call.data)
            except OSError:
                pass  # it died; EOF follows and the call fails (or is retried) with the crash

    def _fail_everything(self, error: WorkerError) -> None:
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
                call.fut.set_exception(error)

    def _shutdown_workers(self) -> None:
        from multiprocessing.reduction import ForkingPickler

        for w in self._workers:
            if self._startup_error is not None:
                self._kill(w)  # a failed start: do not wait for the others' init()
            elif w.conn is not None and w.state in ("ready", "starting"):
                try:
                    w.conn.send_bytes(bytes(ForkingPickler.dumps(("close",))))
                except OSError:
                    pass
        end = time.monotonic() + 5.0
        for w in self._workers:
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
            if w.conn is not None:
                w.conn.close()
                w.conn = None
            if w.state != "failed":
                w.state = "stopped"


def _quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

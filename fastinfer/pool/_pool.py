"""PinnedPool: worker processes pinned to disjoint physical cores, each serving ``fn(state, item)``."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import os
import pickle
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from fastinfer._common.quantiles import summary
from fastinfer.errors import ConfigError, InvalidInput, WouldBlockError
from fastinfer.pool._claims import CpuClaim
from fastinfer.pool._plan import CorePlan
from fastinfer.pool._records import CallRecord, PoolStatistics, WorkerStatistics
from fastinfer.pool._slots import Call, Worker
from fastinfer.pool._state import PoolFuture, State, dropped, dumper, live

__all__ = ["MAX_TIMEOUT", "PinnedPool"]

logger = logging.getLogger("fastinfer.pool")


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

#: Longest timeout accepted (a week): longer is no limit (None), and inf would break wait().
MAX_TIMEOUT = 7 * 24 * 3600.0


class PinnedPool:
    """Worker processes pinned to disjoint physical cores, each serving ``fn(state, batch)``.

    Each worker pins itself (``sched_setaffinity``), sets OMP/MKL variables and torch's thread
    count *before* importing torch, then calls ``init()`` once and serves calls one at a time.
    Calls wait in one queue and go to the next free worker (least loaded). Tensors in arguments
    and results travel by value through shared memory, not pickled bytes: ``fn`` changing its
    input in place never changes the caller's tensor.

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
            (at most every ``report_interval_seconds``); ``on_worker_report(worker, payload)``
            receives it in the parent (on the pool's thread: keep it quick).
        on_call: receives a :class:`CallRecord` for every finished call.
        startup_timeout: seconds a worker may take to become ready.
        load_warning_threshold: per-CPU utilisation (%) of foreign load that triggers the
            busy-cores warning at start; None skips the check.
        prefetch: calls sent to a worker ahead of the one it runs (default 1), so it never
            waits for the parent between calls; 0 sends one call at a time.
        warmup: a picklable batch each worker runs through ``fn`` once after ``init``, before it
            reports ready (its result dropped; an error fails the start like one in ``init``):
            every worker, a replacement after a crash or a timeout included, takes its first call
            warm, so a lazy first call (kernel selection, a compile) never meets ``timeout``.

    Raises :class:`WorkerStartupError` (with the worker's traceback) when a worker fails to start.

    A pool dropped without :meth:`close` is closed by its thread (with a ``ResourceWarning``). It
    belongs to the process that created it: in a forked child its methods raise
    :class:`ClosedError`. Done-callbacks of its Futures run on its thread: they must not block.
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
        pin: bool = True,
        threads: int | None = None,
        interop_threads: int | None = 1,
        smt: bool = False,
        numa: Literal["off", "preferred", "bind"] = "off",
        env: Mapping[str, str] | None = None,
        worker_report: Callable[[Any], Any] | None = None,
        report_interval_seconds: float = 0.0,
        on_worker_report: Callable[[int, Any], None] | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        startup_timeout: float = 300.0,
        load_warning_threshold: float | None = 50.0,
        prefetch: int = 1,
        warmup: Any = None,
    ) -> None:
        for name, f in (("init", init), ("fn", fn), ("worker_report", worker_report)):
            if f is None and name == "worker_report":
                continue
            if not callable(f):
                raise ConfigError(f"{name} must be callable, got {f!r}")
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ConfigError(
                f"timeout must be > 0 seconds (at most a week) or None, got {timeout!r}"
            )
        if not 0 < startup_timeout <= MAX_TIMEOUT:
            raise ConfigError(
                f"startup_timeout must be > 0 seconds (at most a week), got {startup_timeout!r}"
            )
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
        if not report_interval_seconds >= 0:
            raise ConfigError(
                f"report_interval_seconds must be >= 0, got {report_interval_seconds!r}"
            )
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

        try:
            blobs["warmup"] = None if warmup is None else pickle.dumps(warmup)
        except Exception as exc:
            raise ConfigError(f"warmup cannot be pickled for the worker processes ({exc})") from exc

        # Everything the pool's thread needs lives in ``s``, never in ``self``: the thread holds
        # only ``s``, so a pool nobody references is collected and its finalizer closes it.
        s = self._s = State()
        s._owner = os.getpid()
        s._abandoned = False
        self.plan = s.plan = plan if plan is not None else CorePlan.detect()
        n = self.plan.default_workers() if workers is None else workers
        self.split = s.split = self.plan.split(n, smt=smt)
        s.timeout, s.idempotent, s.prefetch = timeout, idempotent, prefetch
        s._pin, s._threads, s._interop = pin, threads, interop_threads
        s._numa, s._env = numa, env
        s._on_report, s._on_call = on_worker_report, on_call
        s._startup_timeout = startup_timeout
        s._warms = warmup is not None
        import multiprocessing.spawn

        prep = multiprocessing.spawn.get_preparation_data("fastinfer-pool-worker")
        # The workers share our authkey (as multiprocessing's spawn does) so they can fetch
        # shared-memory tensor handles from our resource sharer and we from theirs.
        prep["authkey"] = bytes(prep["authkey"])
        s._setup = pickle.dumps(
            {
                "prep": prep,
                "init": blobs["init"],
                "fn": blobs["fn"],
                "report": blobs["report"],
                "report_interval": report_interval_seconds,
                "warmup": blobs["warmup"],
            }
        )
        s._notes = list(self.split.notes)
        if numa != "off" and len(self.plan.nodes) < 2:
            s._notes.append(f"numa={numa!r} ignored: this machine has one NUMA node")
        self.foreign_load_warning: str | None = None
        if load_warning_threshold is not None:
            cpus = sorted({c for w in self.split for c in w.cpus})
            msg = _foreign_load_message(_sample_cpu_load(cpus), load_warning_threshold)
            if msg:
                self.foreign_load_warning = msg
                logger.warning("PinnedPool: %s", msg)
        # Pinned cores another server process's pool holds too (uvicorn --workers 2): say so.
        # Released by the pool's thread once the workers are stopped (and by close()).
        s._claim = CpuClaim({c for w in self.split for c in w.cpus} if pin else ())
        self.cpus_shared_warning: str | None = s._claim.warning()
        if self.cpus_shared_warning:
            s._notes.append(self.cpus_shared_warning)
            logger.warning("PinnedPool: %s", self.cpus_shared_warning)

        s._lock = threading.Lock()
        s._changed = threading.Condition(s._lock)  # a worker became ready / failed
        s._pending = collections.deque()
        s._workers = [Worker(i, wc) for i, wc in enumerate(self.split)]
        self._ids = itertools.count()
        s._closing = False
        s._closed = False
        s._counts = collections.Counter()
        s._started = threading.Event()
        s._startup_error = None
        s._gave_up = None
        s._gave_up_tb = None
        s._wake_r, s._wake_w = socket.socketpair()
        s._wake_r.setblocking(False)
        s._wake_w.setblocking(False)
        self._thread = threading.Thread(target=s._run, name="fastinfer-pool", daemon=True)
        self._thread.start()
        live.add(s)
        self._finalizer = weakref.finalize(self, dropped, s)
        self._finalizer.atexit = False  # at exit: _state releases the claim
        try:
            dumper()  # while the workers start: a first submit from an event loop imports nothing
            s._started.wait()
        except BaseException:  # interrupted (Ctrl+C): nobody gets this pool; its thread closes it
            self._finalizer.detach()
            s._abandoned = True
            s._wake()
            raise
        if s._startup_error is not None:
            self._finalizer.detach()
            self._thread.join()
            s._claim.release()
            raise s._startup_error

    @property
    def timeout(self) -> float | None:
        """Seconds a call may run (None: no limit); may be changed while the pool runs."""
        return self._s.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._s.timeout = value

    @property
    def idempotent(self) -> bool:
        """A call whose worker crashed is retried once on another worker."""
        return self._s.idempotent

    @idempotent.setter
    def idempotent(self, value: bool) -> None:
        self._s.idempotent = value

    @property
    def prefetch(self) -> int:
        """Calls sent to a worker ahead of the one it runs."""
        return self._s.prefetch

    @prefetch.setter
    def prefetch(self, value: int) -> None:
        self._s.prefetch = value

    # ---------------------------------------------------------------- public API

    @property
    def workers(self) -> int:
        """Number of worker slots."""
        return len(self._s._workers)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun (or the pool gave up), and in a process forked from
        the pool's: it takes no more calls."""
        return self._s._closing or os.getpid() != self._s._owner

    def submit(self, item: Any, /) -> concurrent.futures.Future[Any]:
        """Run ``fn(state, item)`` on the next free worker; returns a Future. Thread-safe.

        ``item`` is data for ``fn`` whatever its type (a callable item included); to run another
        function in a worker use :meth:`submit_call`. Raises :class:`ClosedError` after
        :meth:`close`, :class:`InvalidInput` for data nested too deeply to send (a client's JSON
        can be), :class:`ConfigError` for another ``item`` that cannot be pickled. While no worker is up and the next restart waits (its workers keep
        crashing), or after the pool gave up restarting them, the Future fails at once with
        :class:`WorkerCrashed` saying why.
        """
        return self._submit("fn", item)

    def submit_call(
        self, func: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Run ``func(*args, **kwargs)`` in a worker (``worker_state()`` gives its state)."""
        if not callable(func):
            raise ConfigError(f"submit_call needs a callable first, got {type(func).__name__}")
        return self._submit("call", (func, args, kwargs))

    def _submit(self, kind: str, payload: Any) -> concurrent.futures.Future[Any]:
        self._s.check_owner()
        s = self._s
        fut: concurrent.futures.Future[Any] = PoolFuture(self._thread)
        with s._lock:
            down = s._refused()
            call = Call(next(self._ids), kind, payload, fut)
        if down is not None:
            return s._failed(fut, down)
        try:
            # Pickle here, on the caller's thread: a large tensor is copied (one memcpy) into a
            # fresh shared-memory segment that only this call holds, so the worker gets a copy,
            # not the caller's memory, and only a handle is sent.
            call.data = s._dumps(call)
        except RecursionError as exc:  # data nested too deep (a client's JSON can be): its input
            what = "item" if kind == "fn" else "call's arguments"
            raise InvalidInput(
                f"cannot send this {what} ({type(payload).__name__}) to a worker: it is nested "
                f"too deeply to pickle ({type(exc).__name__}: {exc}); limit the nesting depth of "
                "the input (validate it, e.g. with a fixed-shape request model) or flatten it"
            ) from exc
        except Exception as exc:
            what = "item" if kind == "fn" else "call"
            raise ConfigError(f"cannot send this {what} to a worker: {exc}") from exc
        with s._lock:
            down = s._refused()
            if down is None:
                s._pending.append(call)
        if down is not None:
            return s._failed(fut, down)
        s._wake()
        return fut

    async def run(self, item: Any, /) -> Any:
        """``await pool.run(item)``: :meth:`submit` for asyncio code."""
        return await asyncio.wrap_future(self.submit(item))

    async def run_call(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``await pool.run_call(func, *args)``: :meth:`submit_call` for asyncio code."""
        return await asyncio.wrap_future(self.submit_call(func, *args, **kwargs))

    def executor(self) -> concurrent.futures.Executor:
        """This pool as a :class:`concurrent.futures.Executor` whose ``submit(func, *args)`` runs
        ``func`` in a worker: for ``loop.run_in_executor(pool.executor(), func, *args)`` and
        ``pool.executor().map(func, items)``. Shutting it down closes the pool."""
        return _PoolExecutor(self)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker is ready (after start or restarts). False on timeout.

        Calls never need this (they queue while a worker restarts); it is for tests, health
        checks and benchmarks that want the whole pool. Returns False at once if the pool is
        closed or a worker slot gave up restarting. On the pool's own thread (a done-callback)
        it raises :class:`WouldBlockError` rather than wait: that thread starts the workers.
        """
        self._s.check_owner()
        s = self._s

        def settled() -> bool:
            states = {w.state for w in s._workers}
            return states == {"ready"} or s._closing or "failed" in states

        with s._changed:
            if threading.current_thread() is self._thread and not settled():
                raise WouldBlockError(
                    "wait_ready() was called on the PinnedPool's own thread (in a Future's "
                    "done-callback, on_call or on_worker_report), which starts the workers it "
                    "would wait for; check pool.statistics() there instead"
                )
            s._changed.wait_for(settled, timeout)
            return {w.state for w in s._workers} == {"ready"} and not s._closing

    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting calls, finish the queued and running ones, stop the workers and join.

        ``cancel_pending=True`` cancels queued calls instead of running them. Idempotent. On
        the pool's own thread it does not wait (the thread finishes the close); in a process
        forked from the pool's it does nothing (the pool, its thread and workers are the parent's).
        """
        s = self._s
        if os.getpid() != s._owner:
            return
        self._finalizer.detach()
        drop: list[Call] = []
        with s._changed:
            s._closing = True
            s._changed.notify_all()
            if cancel_pending:
                # Running ones (re-queued after a crash) stay and still get a result.
                drop = [call for call in s._pending if not call.fut.running()]
                s._pending = collections.deque(c for c in s._pending if c.fut.running())
        # Cancelled outside the lock: a cancelled Future runs its done-callbacks at once, here,
        # and one that uses the pool (submit, statistics()) would deadlock on the lock.
        cancelled = sum(call.fut.cancel() for call in drop)
        if cancelled:
            with s._lock:
                s._counts["cancelled"] += cancelled
        s._wake()
        s._claim.release()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> PinnedPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, *, cancel_pending: bool = False) -> None:
        """:meth:`close` without blocking the event loop (it runs in a thread)."""
        await asyncio.to_thread(self.close, cancel_pending=cancel_pending)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot: workers alive, restarts, queue per worker, busy share, latencies."""
        self._s.check_owner()
        s = self._s
        now = time.monotonic()
        with s._lock:
            per = []
            for w in s._workers:
                lat = list(w.lat)
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
                        threads=int(w.info.get("threads", s._threads or w.cores.threads)),
                        in_flight=len(w.calls),
                        calls_ok=w.ok,
                        calls_failed=w.failed,
                        restarts=w.restarts,
                        consecutive_crashes=w.crashes,
                        busy_ratio=min(1.0, busy / up) if up > 0 else 0.0,
                        latency_seconds=summary(lat),
                        start_error=w.start_error or None,
                        start_traceback=w.start_traceback,
                    )
                )
            alive = [p for p in per if p.alive]
            backoff = [w.restart_at - now for w in s._workers if w.state == "backoff"]
            return PoolStatistics(
                workers=len(per),
                workers_alive=len(alive),
                worker_restarts_total=sum(p.restarts for p in per),
                queue_depth=len(s._pending),
                calls_in_flight=sum(p.in_flight for p in per),
                requests_ok=s._counts["ok"],
                requests_failed=s._counts["failed"],
                requests_cancelled=s._counts["cancelled"],
                crashes=s._counts["crashes"],
                timeouts=s._counts["timeouts"],
                retries=s._counts["retries"],
                busy_ratio=math.fsum(p.busy_ratio for p in per) / len(per) if per else 0.0,
                queue_per_worker={p.worker: p.in_flight for p in per},
                busy_ratio_per_worker={p.worker: p.busy_ratio for p in per},
                per_worker=tuple(per),
                foreign_load_warning=self.foreign_load_warning,
                notes=tuple(s._notes),
                closed=s._closed,
                consecutive_crashes=max((p.consecutive_crashes for p in per), default=0),
                restart_backoff_seconds=max(0.0, min(backoff)) if backoff else 0.0,
                gave_up=s._gave_up is not None,
                gave_up_reason=s._gave_up,
            )

    def __repr__(self) -> str:
        s = self._s
        state = "closed" if s._closed else "closing" if s._closing else "open"
        return f"<PinnedPool {state} workers={len(s._workers)}>"


class _PoolExecutor(concurrent.futures.Executor):
    """A PinnedPool seen through the Executor protocol (``submit(func, *args)``)."""

    def __init__(self, pool: PinnedPool) -> None:
        self._pool = pool

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        return self._pool.submit_call(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.close(cancel_pending=cancel_futures, timeout=None if wait else 0)

"""PinnedPool: worker processes pinned to disjoint physical cores, each serving ``fn(state, item)``."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import pickle
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from fastinfer._common.quantiles import summary
from fastinfer.errors import ClosedError, ConfigError, InvalidInput, WorkerCrashed
from fastinfer.pool._claims import CpuClaim
from fastinfer.pool._plan import CorePlan
from fastinfer.pool._records import CallRecord, PoolStatistics, WorkerStatistics
from fastinfer.pool._slots import Call, Worker, down_error
from fastinfer.pool._supervisor import Supervisor

__all__ = ["MAX_TIMEOUT", "PinnedPool"]

logger = logging.getLogger("fastinfer.pool")

_dumps_fn: Callable[[Any], bytes] | None = None


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


def _dumper() -> Callable[[Any], bytes]:
    """The message encoder (tensors by value); made once: it imports torch (1-2 s cold), which
    the pool does when it starts, not on a caller's first submit (an event loop's thread)."""
    global _dumps_fn
    if _dumps_fn is None:
        from fastinfer.pool._wire import make_dumps

        _dumps_fn = make_dumps()
    return _dumps_fn


class PinnedPool(Supervisor):
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
        self._warms = warmup is not None
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
                "report_interval": report_interval_seconds,
                "warmup": blobs["warmup"],
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
        # Pinned cores another server process's pool holds too (uvicorn --workers 2): say so.
        self._claim = CpuClaim({c for w in self.split for c in w.cpus} if pin else ())
        weakref.finalize(self, self._claim.release)
        self.cpus_shared_warning: str | None = self._claim.warning()
        if self.cpus_shared_warning:
            self._notes.append(self.cpus_shared_warning)
            logger.warning("PinnedPool: %s", self.cpus_shared_warning)

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a worker became ready / failed
        self._pending: collections.deque[Call] = collections.deque()
        self._workers = [Worker(i, wc) for i, wc in enumerate(self.split)]
        self._ids = itertools.count()
        self._closing = False
        self._closed = False
        self._counts = collections.Counter[str]()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._gave_up: str | None = None
        self._gave_up_tb: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="fastinfer-pool", daemon=True)
        self._thread.start()
        _dumper()  # while the workers start: a first submit from an event loop imports nothing
        self._started.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._claim.release()
            raise self._startup_error

    # ---------------------------------------------------------------- public API

    @property
    def workers(self) -> int:
        """Number of worker slots."""
        return len(self._workers)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun (or the pool gave up): it takes no more calls."""
        return self._closing

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
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            down = self._refused()
            call = Call(next(self._ids), kind, payload, fut)
        if down is not None:
            return self._failed(fut, down)
        try:
            # Pickle here, on the caller's thread: a large tensor is copied (one memcpy) into a
            # fresh shared-memory segment that only this call holds, so the worker gets a copy,
            # not the caller's memory, and only a handle is sent.
            call.data = self._dumps(call)
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
        with self._lock:
            down = self._refused()
            if down is None:
                self._pending.append(call)
        if down is not None:
            return self._failed(fut, down)
        self._wake()
        return fut

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
                keep: collections.deque[Call] = collections.deque()
                while self._pending:
                    call = self._pending.popleft()
                    if call.fut.cancel():
                        self._counts["cancelled"] += 1
                    else:  # already running (re-queued after a crash): it still gets a result
                        keep.append(call)
                self._pending = keep
        self._wake()
        self._claim.release()
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
        now = time.monotonic()
        with self._lock:
            per = []
            for w in self._workers:
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
                        threads=int(w.info.get("threads", self._threads or w.cores.threads)),
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
            backoff = [w.restart_at - now for w in self._workers if w.state == "backoff"]
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
                busy_ratio=math.fsum(p.busy_ratio for p in per) / len(per) if per else 0.0,
                queue_per_worker={p.worker: p.in_flight for p in per},
                busy_ratio_per_worker={p.worker: p.busy_ratio for p in per},
                per_worker=tuple(per),
                foreign_load_warning=self.foreign_load_warning,
                notes=tuple(self._notes),
                closed=self._closed,
                consecutive_crashes=max((p.consecutive_crashes for p in per), default=0),
                restart_backoff_seconds=max(0.0, min(backoff)) if backoff else 0.0,
                gave_up=self._gave_up is not None,
                gave_up_reason=self._gave_up,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return f"<PinnedPool {state} workers={len(self._workers)}>"

    # ---------------------------------------------------------------- internals

    def _dumps(self, call: Call) -> bytes:
        return _dumper()(("call", call.id, call.kind, call.args))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass


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

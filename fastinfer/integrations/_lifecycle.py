"""Lifecycle helpers of :class:`~fastinfer.integrations.fastapi.FastInferService`: the setup
thread, closing managed objects, the managed objects' health behind ``/readyz``, what requests
are told before the service is ready, and the disconnect watch of ``svc.submit``."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from types import SimpleNamespace
from typing import Any, TypeVar

from fastinfer.errors import ClientDisconnected, ConfigError, NotReady
from fastinfer.integrations._answers import cause_line
from fastinfer.integrations._limits import RESPONSE_COMPLETE

logger = logging.getLogger("fastinfer.integrations.fastapi")
T = TypeVar("T")


class SetupCancelled(asyncio.CancelledError):
    """Raised inside a setup function (by ``svc.phase()`` and ``svc.manage()``) once shutdown
    has begun, so that a setup the server no longer waits for stops at its next step. A
    ``CancelledError``: ``except Exception`` in the setup does not swallow it."""


class State(SimpleNamespace):
    """``svc.state``: what setup built. Reading an attribute setup has not set yet raises
    :class:`NotReady` (HTTP 503) while the service is starting, not an ``AttributeError`` (500)."""

    def __init__(self, svc: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_svc", svc)

    def __getattr__(self, name: str) -> Any:
        svc = object.__getattribute__(self, "_svc")
        if not svc.ready and not name.startswith("__"):
            raise NotReady(svc._not_ready_detail())
        raise AttributeError(f"svc.state has no {name!r}: set it in the setup function")

    def _new_lifespan(self) -> None:
        """A lifespan starts: forget what an earlier lifespan's setup set (its objects are
        closed; the setup sets them again). What was set before the first lifespan stays."""
        kept = vars(self).get("_kept")
        if kept is None:
            object.__setattr__(self, "_kept", frozenset(vars(self)) | {"_kept"})
            return
        for key in [k for k in vars(self) if k not in kept]:
            delattr(self, key)

    def __repr__(self) -> str:
        items = {k: v for k, v in vars(self).items() if k not in ("_svc", "_kept")}
        return f"state({', '.join(f'{k}={v!r}' for k, v in items.items())})"


#: ``/readyz`` and model routes while the phase is still "not started": the lifespan never ran
NOT_STARTED = (
    "the service's lifespan never ran, so its setup never started and it will not become "
    "ready: pass lifespan=svc.lifespan to the app the server runs (FastAPI(lifespan="
    "svc.lifespan); Starlette does not run a mounted app's lifespan, so when this app is mounted "
    "in another, pass it to the outer app); in tests, enter the client (`with TestClient(app) as "
    "client:`) or, with httpx.ASGITransport, run `async with svc.lifespan(app):` around it"
)


def not_ready_detail(setup_error: BaseException | None, stopping: bool, phase: str) -> str:
    """Why requests cannot be served now; retrying is suggested only while setup still runs."""
    if setup_error is not None:
        return (  # the line that names the cause, not a traceback's header
            f"setup failed ({type(setup_error).__name__}: {cause_line(setup_error)}); the "
            "service cannot serve until the cause is fixed and it is restarted"
        )
    if stopping:
        return "the service is shutting down"
    if phase == "not started":
        return NOT_STARTED
    return f"the service is not ready yet (phase: {phase}); retry shortly"


async def stop_setup(task: asyncio.Task[None], is_async: bool, grace: float, phase: str) -> None:
    """At shutdown, stop a setup still running, waiting at most ``grace`` seconds: an async
    setup is cancelled at its next await; a sync one (its own thread) stops at its next
    ``svc.phase()`` or ``svc.manage()``. A 40 s ``init()`` is not waited for. Logs one line."""
    if is_async:
        task.cancel()
    await asyncio.wait({task}, timeout=grace)
    stopped = task.done()
    task.cancel()
    logger.warning(
        "shutdown began during setup (phase %r): %s",
        phase,
        "setup stopped"
        if stopped
        else f"not waiting for it past {grace:g} s; what it still registers is closed at once",
    )


_setup_thread = threading.local()


def setup_lifespan() -> int | None:
    """The lifespan whose setup this thread runs (None: not a setup thread). A setup abandoned
    at shutdown runs on in its thread; once a later lifespan started, what it still registers
    must not join that lifespan's objects."""
    return getattr(_setup_thread, "lifespan", None)


async def run_in_thread(fn: Callable[..., Any], *args: Any, lifespan: int | None = None) -> Any:
    """``await fn(*args)`` run in a daemon thread of its own, not the loop's default executor:
    the server's event loop, when it closes, joins that executor's threads, so a setup blocked
    in a 40 s ``init`` would hold the process up; this thread is left behind instead.
    ``lifespan`` is what :func:`setup_lifespan` says in that thread."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(exc: BaseException | None, result: Any) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def target() -> None:
        _setup_thread.lifespan = lifespan
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # handed to the awaiting task, or dropped after shutdown
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, exc, result)
        except RuntimeError:  # the loop has closed: the server is gone, nobody waits
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                logger.info("the setup, abandoned at shutdown, ended with %r", exc)

    threading.Thread(target=target, name="fastinfer-setup", daemon=True).start()
    return await fut


async def close_all(items: Iterable[tuple[str, Any]], timeout: float) -> None:
    """Close ``(name, obj)`` pairs in the order given, each drained for at most ``timeout``."""
    for name, obj in items:
        try:
            if hasattr(obj, "aclose"):
                await asyncio.wait_for(obj.aclose(), timeout)
            else:
                result = await asyncio.to_thread(obj.close)
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, timeout)
        except Exception:
            logger.exception("closing %s failed during shutdown", name)


def close_now(name: str, obj: Any) -> None:
    """Close ``obj`` from whatever thread registered it (``svc.manage`` after shutdown began):
    ``close()`` if it has one, else ``aclose()`` (a task when called on a running loop)."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    try:
        result = obj.close() if hasattr(obj, "close") else obj.aclose()
        if inspect.isawaitable(result):
            if loop is not None:
                loop.create_task(_awaited(result))
            else:
                asyncio.run(_awaited(result))
    except Exception:
        logger.exception("closing %s (registered after shutdown began) failed", name)


async def _awaited(awaitable: Any) -> None:
    await awaitable


def health_problems(managed: Iterable[tuple[str, Any]]) -> list[str]:
    """Why the managed objects cannot serve, one line each (empty: they can).

    A worker pool (its ``statistics()`` has ``workers`` and ``workers_alive``) is unhealthy when
    it gave up or closed itself, or has no live worker; any object whose statistics say
    ``closed`` is unhealthy (called only while the service is not shutting down). Fields other
    than ``workers``, ``workers_alive`` and ``closed`` are read with defaults, so a pool that does
    not report them still works: ``gave_up`` (bool or the reason), ``gave_up_reason``,
    ``last_exit`` (on the pool, else on its ``per_worker`` records), ``consecutive_crashes`` and
    ``restart_backoff_seconds``. A batcher (``abandoned_threads``) is unhealthy once as many calls
    of ``fn`` hung past its ``batch_timeout`` as it replaces threads for.
    """
    problems = []
    for name, obj in managed:
        if not callable(getattr(obj, "statistics", None)):
            continue
        try:
            s = obj.statistics()
        except Exception as exc:
            problems.append(f"{name}: statistics() raised {exc!r}")
            continue
        closed = bool(getattr(s, "closed", False))
        if not hasattr(s, "workers_alive"):
            if closed:
                problems.append(f"{name}: closed")
            elif (stuck := _stuck_threads(name, s)) is not None:
                problems.append(stuck)
            continue
        gave_up = getattr(s, "gave_up", None)
        if gave_up or closed:
            reason = gave_up if isinstance(gave_up, str) else getattr(s, "gave_up_reason", None)
            if not reason:
                states = sorted({getattr(w, "state", "?") for w in getattr(s, "per_worker", ())})
                reason = f"closed itself (worker states: {', '.join(states) or 'none'})"
            problems.append(f"pool {name}: gave up: {reason}")
        elif s.workers_alive == 0:
            line = f"pool {name}: 0 of {getattr(s, 'workers', '?')} workers alive"
            last = getattr(s, "last_exit", None) or next(
                (
                    w.last_exit
                    for w in getattr(s, "per_worker", ())
                    if getattr(w, "last_exit", None)
                ),
                None,
            )
            if last:
                line += f"; last exit: {last}"
            crashes = getattr(s, "consecutive_crashes", 0)
            if crashes and crashes > 1:
                line += f"; {crashes} crashes in a row"
            backoff = getattr(s, "restart_backoff_seconds", None)
            if backoff:
                line += f"; next restart in {backoff:.3g} s"
            problems.append(line)
    return problems


def _stuck_threads(name: str, s: Any) -> str | None:
    """A batcher whose calls of ``fn`` hung past ``batch_timeout`` (each left running in an
    abandoned thread) as many times as it replaces them: the next hung call takes its slot for
    good, and with every slot taken each request waits out ``batch_timeout`` and fails."""
    abandoned = getattr(s, "abandoned_threads", 0)
    if not isinstance(abandoned, int) or abandoned < 1:
        return None
    slots = getattr(s, "max_concurrent_batches", 1)
    # DynamicBatcher's bound on abandoned threads (batching/_running.py: SlotPool(max_abandoned=))
    limit = max(8, 4 * slots) if isinstance(slots, int) else 8
    if abandoned < limit:
        return None
    return (
        f"{name}: {abandoned} calls of fn ran past batch_timeout and still run in abandoned "
        f"threads, the most the batcher replaces ({limit}): a slot stuck in the next one is not "
        "replaced. Find why fn hangs (the log names the first such batch) and restart the service"
    )


def closed_error(name: str, obj: Any) -> ConfigError | None:
    """``svc.manage`` of an object that is closed already (``obj.closed``): it cannot serve."""
    if getattr(obj, "closed", False) is not True:
        return None
    return ConfigError(
        f"manage({name!r}): this {type(obj).__name__} is closed already, so it cannot serve. One "
        "made at import time (outside the setup function) is closed when a lifespan ends (a "
        "server's shutdown, the end of a `with TestClient(app)` block). Fix: create it in the "
        "setup function (@svc.setup), which runs again at every lifespan start"
    )


def retired_error(names: list[str]) -> ConfigError:
    """The setup error of a lifespan after the first when objects were managed outside the setup
    function: they were closed when the previous lifespan ended."""
    listed = ", ".join(repr(n) for n in names)
    return ConfigError(
        f"{listed}: passed to svc.manage outside the setup function (at import time, say), so "
        "closed when the previous lifespan ended (a server's shutdown, the end of a `with "
        "TestClient(app)` block), and a closed object cannot serve this one. Fix: create it in "
        "the setup function (@svc.setup), which runs again at every lifespan start"
    )


async def unless_disconnected(request: Any, awaitable: Awaitable[T]) -> T:
    """``svc.run``: await ``awaitable``, cancelled if the HTTP client disconnects first.

    Only an HTTP request whose response is not complete is watched. A WebSocket is not (reading
    it would take the client's messages: its leaving shows in the app's own ``receive``), nor
    ``None``, nor a request whose response was sent (a ``BackgroundTasks`` job: the server then
    reports a disconnect to every ``receive()``)."""
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict) or scope.get("type") != "http" or scope.get(RESPONSE_COMPLETE):
        return await awaitable
    work = asyncio.ensure_future(awaitable)

    async def disconnected() -> bool:
        # The body has been read by now, so the next ASGI message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        return not scope.get(RESPONSE_COMPLETE)  # after the response, no client is leaving

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watcher.cancel()
        raise
    if work in done:
        watcher.cancel()
        return work.result()
    if watcher.exception() is None and not watcher.result():
        return await work  # the response completed meanwhile: keep waiting, unwatched
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected("the client disconnected; its request was cancelled")

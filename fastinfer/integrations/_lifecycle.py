"""Lifecycle helpers of :class:`~fastinfer.integrations.fastapi.FastInferService`: the setup
thread, closing managed objects, the managed objects' health behind ``/readyz``, what requests
are told before the service is ready, and the disconnect watch of ``svc.submit``."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import weakref
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


async def stop_setup(task: asyncio.Task[None] | None, fn: Any, grace: float, phase: str) -> None:
    """At shutdown, stop a setup still running (``task``), waiting at most ``grace`` seconds: an
    async setup (``fn``) is cancelled at its next await; a sync one (its own thread) stops at its
    next ``svc.phase()`` or ``svc.manage()``. A 40 s ``init()`` is not waited for. Logs one line."""
    if task is None or task.done():
        return
    if inspect.iscoroutinefunction(fn):
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
    return await _in_daemon_thread(
        functools.partial(fn, *args), "fastinfer-setup", "the setup", lifespan
    )


def _in_daemon_thread(
    fn: Callable[[], Any], thread: str, what: str, lifespan: int | None = None
) -> asyncio.Future[Any]:
    """A future of ``fn()`` run in a daemon thread named ``thread``: what it returns or raises
    lands there, unless the future was cancelled (given up) or the loop has closed."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(exc: BaseException | None, result: Any) -> None:
        if fut.done():  # given up: nobody waits for it any more
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                logger.info("%s, given up at shutdown, ended with %r", what, exc)
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def target() -> None:
        _setup_thread.lifespan = lifespan
        try:
            result, exc = fn(), None
        except BaseException as e:  # handed to the awaiting task, or dropped after shutdown
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, exc, result)
        except RuntimeError:  # the loop has closed: the server is gone, nobody waits
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                logger.info("%s, abandoned at shutdown, ended with %r", what, exc)

    threading.Thread(target=target, name=thread, daemon=True).start()
    return fut


#: once the drain's deadline has passed, how long each object still to close is given
CLOSE_GRACE_SECONDS = 0.25


async def close_all(items: list[tuple[str, Any]], timeout: float, why: str = "") -> None:
    """Close ``(name, obj)`` pairs in the order given, within one deadline: ``timeout`` seconds
    (``shutdown_timeout_seconds``) for the whole drain, shared by the objects in that order.
    ``why``: logged first with the names (nothing when empty).

    An object still closing at the deadline is given up, in one warning line (its ``aclose()``
    cancelled; its ``close()`` left to the daemon thread it runs in, which does not hold the
    process up), and the objects after it are still closed, each given ``CLOSE_GRACE_SECONDS``.
    A close that raises, ``CancelledError`` included (``task.cancel(); await task`` inside an
    ``aclose()``), is logged and the others are still closed: each close runs as a task of its
    own, so only the cancellation of this one (the server giving up on the shutdown) propagates."""
    if items and why:
        logger.warning("closing %s %s", ", ".join(n for n, _ in items), why)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for name, obj in items:
        job = loop.create_task(_close(name, obj), name=f"fastinfer-close-{name}")
        job.add_done_callback(_retrieve)
        try:
            await asyncio.wait({job}, timeout=max(deadline - loop.time(), CLOSE_GRACE_SECONDS))
        except asyncio.CancelledError:  # the shutdown itself is cancelled
            job.cancel()
            raise
        how = "aclose()" if hasattr(obj, "aclose") else "close()"
        if not job.done():
            job.cancel()
            logger.warning(
                "%s did not drain within %g s; not waiting for it: %s (shutdown_timeout_seconds "
                "is one deadline for all the managed objects, in their closing order)",
                name,
                timeout,
                "its aclose() was cancelled"
                if how == "aclose()"
                else "its close() runs on in a daemon thread, which does not hold the exit up",
            )
        elif job.cancelled():
            logger.error(
                "closing %s during shutdown: its %s raised CancelledError (not the shutdown "
                "being cancelled; a task it cancelled and awaited?); closing the others",
                name,
                how,
            )
        elif (exc := job.exception()) is not None:
            logger.error("closing %s failed during shutdown", name, exc_info=exc)


async def _close(name: str, obj: Any) -> None:
    if hasattr(obj, "aclose"):
        await obj.aclose()
        return
    result = await _in_daemon_thread(obj.close, f"fastinfer-close-{name}", f"closing {name}")
    if inspect.isawaitable(result):
        await result


def _retrieve(task: asyncio.Task[None]) -> None:
    """A close given up at the deadline may still fail: no "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


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


def lifespan_loop(running: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """The loop of a lifespan that starts, given that of the one running (None: none runs).
    ``ConfigError`` while another runs, its loop not closed (a TestClient entered on an app a
    server is serving; one service installed on two apps, both served)."""
    if running is None or running.is_closed():
        return asyncio.get_running_loop()
    raise ConfigError(
        "this FastInferService's lifespan is already running (a server serves its app, or a "
        "TestClient is entered on it): one service runs one lifespan at a time, and a second "
        "would build its objects again next to the running ones and close them when it ends. "
        "Fix: build the app and its service per server or test (an app factory: a function "
        "that makes the FastInferService and its FastAPI app, called by each), or end the "
        "running lifespan before starting the next"
    )


_installed: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def claim_app(app: Any, svc: Any) -> None:
    """``svc.install(app)``: one service per app. The exception handlers ``install`` adds are
    app-wide, each bound to its service, so with two the last installed would answer the
    other's errors (and its middleware count the other's traffic)."""
    try:
        other = _installed.get(app)
    except TypeError:  # not weak-referenceable: nothing to check against
        return
    if other is svc:
        raise ConfigError(
            "install(app): this service is installed on this app already (its routes, error "
            "handlers and middleware are there): call install() once per app"
        )
    if other is not None:
        raise ConfigError(
            "install(app): another FastInferService is installed on this app already; its error "
            "handlers are app-wide, so each would answer the other's errors. One service per "
            "app: a second model goes into the same service, its batcher managed with labels "
            "(svc.manage(..., labels={'model': 'b'}) and svc.batcher_hooks(labels=...): see "
            "'Several models' in docs/fastapi.md), or into an app of its own"
        )
    _installed[app] = svc

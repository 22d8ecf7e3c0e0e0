"""FastAPI integration: startup in phases, readiness, error mapping, cancel-on-disconnect, /metrics.

Imported only from here (``import fastinfer`` never imports FastAPI). Needs the ``serve`` extra.

    from fastapi import FastAPI, Request
    from fastinfer import DynamicBatcher
    from fastinfer.integrations.fastapi import FastInferService

    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        with svc.phase("load"):
            model = make_model()
        svc.state.batcher = svc.manage(
            DynamicBatcher(model_fn, max_batch_size=32, max_wait_ms=5, **svc.batcher_hooks()),
            name="classifier",
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: dict, request: Request):
        return {"label": await svc.submit(svc.state.batcher, body["text"], request)}

:meth:`FastInferService.serve_model` builds the measured serving path in one call (the model in
pinned worker processes, one per physical core, behind a batcher sized through them; in-process on
one core): ``svc.state.batcher = svc.serve_model(init, fn, example_batch, latency_target_ms=500)``.

What :meth:`FastInferService.install` adds:

- ``GET /healthz`` (alive: 200 as soon as the server runs) and ``GET /readyz`` (200 only once every
  setup phase finished: loaded, compiled, warmed up; 503 before, with the current phase);
- exception handlers: ``QueueFull`` → 503 with ``Retry-After``, ``DeadlineExceeded`` → 504,
  invalid input (``InvalidInput``, request validation) → 422 naming the problem, ``WorkerCrashed``
  / ``ClosedError`` / not ready → 503 (``Retry-After`` only where retrying helps; 500 for the
  request that crashed its worker alone), ``WorkerTimeout`` → 504; any other error → 500; never
  a traceback in the response;
- ``GET /metrics``: Prometheus text from the service's :class:`fastinfer.MetricsRecorder` through
  ``prometheus_client``, with request latency, queue wait, batch size, batch execution time,
  outcomes, queue depth and startup phase times recorded automatically;
- limits (:mod:`._limits`): request bodies over ``max_body_bytes`` → 413, bodies not received
  within ``client_timeout_seconds`` → 408, and after a ``QueueFull`` a route's requests are shed
  at the door (503 before their body is read) until the batcher's retry estimate has passed;
- every status fastinfer answers (404 and 405 included) has the body
  ``{"error": <code>, "detail": <message>}``;
- ``GET /dashboard`` (opt-in, ``dashboard=True``, :mod:`._dashboard`): a live page of the
  request rate, latency, queue depth, batch sizes and setup phases, refreshed every second;
- :meth:`FastInferService.submit` / :meth:`~FastInferService.run`: a client that disconnects
  cancels its queued request, so it never reaches the model.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from fastinfer._optional import require
from fastinfer.errors import (
    ClientDisconnected,
    ClosedError,
    ConfigError,
    DeadlineExceeded,
    FastInferError,
    InvalidInput,
    NotReady,
    QueueFull,
    WorkerCrashed,
    WorkerTimeout,
)
from fastinfer.integrations._admission import AdmissionReport, measure_admission
from fastinfer.integrations._answers import crash_reply, one_line
from fastinfer.integrations._exporting import (
    Registrations,
    labelled_hooks,
    track,
    unlabelled_metrics,
)
from fastinfer.integrations._lifecycle import (
    SetupCancelled,
    State,
    claim_app,
    close_all,
    close_now,
    closed_error,
    health_problems,
    lifespan_loop,
    not_ready_detail,
    retired_error,
    run_in_thread,
    setup_lifespan,
    stop_setup,
    unless_disconnected,
)
from fastinfer.integrations._limits import (
    Door,
    HTTPMetrics,
    RequestLimits,
    encode_tensors,
    error_code,
    on_event_loop,
    retry_after_header,
    validation_message,
)
from fastinfer.integrations._model import serve_model
from fastinfer.integrations._server import run_server
from fastinfer.integrations._sizing import ServingPlan, admission, measure_serving
from fastinfer.metrics import BatcherHooks, MetricsRecorder, StandardMetrics

fastapi = require("fastapi", purpose="fastinfer.integrations.fastapi")
prometheus_client = require("prometheus_client", purpose="the /metrics endpoint")
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

__all__ = [
    "AdmissionReport",
    "FastInferService",
    "ServingPlan",
    "measure_admission",
    "measure_serving",
    "run_server",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Any:
    body = {"error": code, "detail": one_line(detail)}  # never a worker's traceback
    return JSONResponse(body, status_code=status, headers=headers)


class FastInferService:
    """What a FastAPI app needs from fastinfer, as one object: lifecycle, readiness, metrics.

    Args:
        recorder: the metrics recorder behind ``/metrics`` (a new one by default).
        background_setup: run the setup function after the server starts (``/healthz`` answers at
            once, ``/readyz`` and model endpoints say 503 until it finishes: the Kubernetes
            pattern). ``False`` runs it inside the lifespan, before the server accepts requests.
        retry_after_seconds: the ``Retry-After`` sent with 503s when the error does not carry one.
        shutdown_timeout_seconds: one deadline for all the managed objects to drain at shutdown.
        freeze_gc: once setup has finished, collect garbage and ``gc.freeze()`` what is left
            (the model, torch's and the app's modules) so that Python's full collections no
            longer scan it. With torch imported a full collection takes 56-72 ms on a 2-core VM,
            and each one that lands while requests wait is a stall in their latency. Shutdown
            unfreezes. Both are process-wide: pass ``False`` when the application manages the
            collector itself (a pre-fork server that freezes before forking, several services
            in one process), and the collector is left alone.
        max_body_bytes: largest request body accepted (default 1 MiB); a larger one is answered
            413 without being read further. ``None``: no limit.
        client_timeout_seconds: time a client has, from its request's arrival, to send the whole
            body (default 10 s); a slower one is answered 408 and its connection closed.
            ``None``: wait forever. (A client that never finishes its headers is the server's
            to time out: put a proxy in front, or use uvicorn's ``--limit-concurrency``.)
        shed_at_door: answer 503 before reading or parsing a request when the service is at its
            admission limit (set by :meth:`admission`), and, after a ``QueueFull`` on a route,
            that route's requests until the batcher's retry estimate has passed, so rejections
            stay fast under a flood (default on).
        dashboard: serve the live dashboard page at ``dashboard_path`` (and its data at
            ``dashboard_path + "/data"``). Off by default.
    """

    def __init__(
        self,
        *,
        recorder: MetricsRecorder | None = None,
        background_setup: bool = True,
        retry_after_seconds: float = 1.0,
        shutdown_timeout_seconds: float = 30.0,
        metrics_path: str = "/metrics",
        health_path: str = "/healthz",
        ready_path: str = "/readyz",
        freeze_gc: bool = True,
        max_body_bytes: int | None = 1_048_576,
        client_timeout_seconds: float | None = 10.0,
        shed_at_door: bool = True,
        dashboard: bool = False,
        dashboard_path: str = "/dashboard",
    ) -> None:
        if retry_after_seconds <= 0 or shutdown_timeout_seconds <= 0:
            raise ConfigError("retry_after_seconds and shutdown_timeout_seconds must be > 0")
        if max_body_bytes is not None and (
            isinstance(max_body_bytes, bool)
            or not isinstance(max_body_bytes, int)
            or max_body_bytes < 1
        ):
            raise ConfigError(f"max_body_bytes must be an int >= 1 or None, got {max_body_bytes!r}")
        if client_timeout_seconds is not None and not (0 < client_timeout_seconds < math.inf):
            raise ConfigError(
                f"client_timeout_seconds must be > 0 seconds or None, got {client_timeout_seconds!r}"
            )
        if not dashboard_path.startswith("/"):
            raise ConfigError(f"dashboard_path must start with '/', got {dashboard_path!r}")
        self.recorder = recorder if recorder is not None else MetricsRecorder()
        self._metrics: StandardMetrics | None = None
        self.state = State(self)
        self.background_setup = background_setup
        self.retry_after_seconds = retry_after_seconds
        self.shutdown_timeout_seconds = shutdown_timeout_seconds
        self.freeze_gc = freeze_gc
        self._gc_frozen = False
        self.paths = {"metrics": metrics_path, "health": health_path, "ready": ready_path}
        if dashboard:
            self.paths["dashboard"] = dashboard_path
            self.paths["dashboard_data"] = dashboard_path.rstrip("/") + "/data"
        self.max_body_bytes = max_body_bytes
        self.client_timeout_seconds = client_timeout_seconds
        self.door = Door(exempt=set(self.paths.values())) if shed_at_door else None
        self._admission: dict[str, Any] = {}
        self._serving: dict[str, Any] = {}
        self._setup_fn: Callable[[FastInferService], Any] | None = None
        self._managed: list[tuple[str, Any]] = []
        self._registered = Registrations()
        self._in_setup = self._warned_not_started = False
        self._lifespans = 0
        self._lock = threading.Lock()  # manage() runs on the setup thread, shutdown on the loop
        self._live_loop: asyncio.AbstractEventLoop | None = None  # the running lifespan's loop
        self._stopping = False
        self._phases: dict[str, float] = {}
        self._phase: str = "not started"
        self._ready = False
        self._setup_error: BaseException | None = None
        self._setup_task: asyncio.Task[None] | None = None
        self._phase_seconds = self.recorder.histogram(
            "fastinfer_startup_phase_seconds",
            "time of each startup phase (load, swap, compile, warm-up)",
            unit="seconds",
            labels=("phase",),
        )
        self._http_latency = self.recorder.histogram(
            "fastinfer_http_request_seconds",
            "HTTP request latency by route and status class",
            unit="seconds",
            labels=("route", "status"),
        )
        self._http_refused = self.recorder.counter(
            "fastinfer_http_refused_total",
            "requests answered by the HTTP limits before the app: shed at the door, body too "
            "large, client too slow",
            labels=("reason",),
        )

    # ------------------------------------------------------------------ setup and lifecycle

    def setup(self, fn: Callable[[FastInferService], Any]) -> Callable[[FastInferService], Any]:
        """Register the function that builds the service (sync or async); usable as a decorator."""
        self._setup_fn = fn
        return fn

    #: how long shutdown waits for a setup still running before it closes what is managed
    setup_grace_seconds = 2.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one setup phase; ``/readyz`` shows it while it runs and its time once done.
        Once shutdown has begun, entering or finishing a phase raises :class:`SetupCancelled`
        (a ``CancelledError``), so a setup the server no longer waits for stops there."""
        self._check_stopping(name)
        self._phase = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self._phases[name] = self._phases.get(name, 0.0) + elapsed
            self._phase_seconds.labels(phase=name).observe(elapsed)
        self._check_stopping(name)

    def _check_stopping(self, where: str) -> None:
        if self._stale():
            raise SetupCancelled(f"setup stopped at {where!r}: the service is shutting down")

    def manage(
        self,
        obj: T,
        *,
        name: str,
        standard: bool = True,
        labels: Mapping[str, object] | None = None,
    ) -> T:
        """Close ``obj`` (draining it) at shutdown, in reverse order, and export its ``statistics()``.

        Its fields go to the standard metrics they declare (queue depth, requests by outcome...)
        and the rest to ``fastinfer_<name>_*``. The standard metrics describe one front stage:
        a second object that feeds the same ones (a :class:`fastinfer.PinnedPool` behind the
        batcher) takes ``standard=False`` and is exported under ``fastinfer_<name>_*`` only; a
        second model takes ``labels`` (``{"model": "b"}``, and the first model its own), as does
        its :meth:`batcher_hooks`. Call it in the setup function: an object managed outside it is
        closed at the end of the lifespan, and a second lifespan fails setup naming it.

        Once shutdown has begun (a setup still running), ``obj`` is closed at once and
        :class:`SetupCancelled` raised."""
        if not (hasattr(obj, "aclose") or hasattr(obj, "close")):
            raise ConfigError(f"manage({name!r}): {type(obj).__name__} has no close() or aclose()")
        if (closed := closed_error(name, obj)) is not None:
            raise closed
        exported = None  # tracked outside the lock: a statistics() may call svc.readiness()
        if hasattr(obj, "statistics") and not self._stale():
            exported = track(self.recorder, obj, name, standard, labels)
        with self._lock:
            if not self._stale():
                self._registered.add(obj, exported, self._in_setup)
                self._managed.append((name, obj))
                return obj
        close_now(name, obj)
        self._check_stopping(f"manage({name!r})")
        return obj

    def batcher_hooks(self, labels: Mapping[str, object] | None = None) -> BatcherHooks:
        """``on_batch``/``on_request`` callbacks for a :class:`fastinfer.DynamicBatcher` that record
        the standard distributions (request latency, queue wait, batch size, batch execution time):
        pass them as ``DynamicBatcher(..., **svc.batcher_hooks())``. Counts and gauges (requests
        by outcome, queue depth) come from the batcher's ``statistics()`` via :meth:`manage`.
        ``labels`` (``{"model": "a"}``) labels them, for a service of several models."""
        if labels is None:
            return self.metrics.batcher_hooks()
        return labelled_hooks(self.recorder, labels)

    @property
    def metrics(self) -> StandardMetrics:
        """The standard metrics on :attr:`recorder`, unlabelled (created at first use)."""
        if self._metrics is None:
            self._metrics = unlabelled_metrics(self.recorder)
        return self._metrics

    @property
    def ready(self) -> bool:
        return self._ready

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` returns: ready or not, the current phase, the phase times. Once set
        up, the service is ready only while its managed objects can serve: a worker pool with no
        live worker, or one that gave up, makes it not ready, the reason naming the pool."""
        problems = self._problems() if self._ready else []
        ready = self._ready and not problems
        out: dict[str, Any] = {"ready": ready, "phase": self._phase, "phases": self._phases}
        if self._serving:
            out["serving"] = self._serving
        if self._admission:
            out["admission"] = self._admission
        if self._setup_error is not None:
            out["error"] = "setup_failed"
            out["detail"] = one_line(f"{type(self._setup_error).__name__}: {self._setup_error}")
        elif problems:
            out["error"], out["detail"] = "unhealthy", one_line("; ".join(problems))
        elif not ready:
            out["error"] = "shutting_down" if self._stopping else "not_ready"
            out["detail"] = self._not_ready_detail()
        return out

    def _problems(self) -> list[str]:
        with self._lock:
            managed = list(self._managed)
        return [] if self._stopping else health_problems(managed)

    def _not_ready_detail(self) -> str:
        detail = not_ready_detail(self._setup_error, self._stopping, self._phase)
        if self._phase == "not started" and not self._warned_not_started:
            self._warned_not_started = True
            logger.warning("fastinfer service not ready: %s", detail)
        return detail

    #: size a batcher from ``fn``'s measured cost (``_sizing.py``; its docstring says how)
    admission = admission

    #: the fastest measured serving path in one call (``_model.py``; its docstring says how)
    serve_model = serve_model

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until setup finished; re-raise its error if it failed."""
        if self._setup_task is not None:
            await asyncio.wait_for(asyncio.shield(self._setup_task), timeout)
        if self._setup_error is not None:
            raise self._setup_error

    async def _run_setup(self) -> None:
        self._phase, self._in_setup = "setup", True
        try:
            if self._registered.retired:  # closed at the end of the previous lifespan
                raise retired_error(self._registered.retired)
            if self._setup_fn is not None:
                if inspect.iscoroutinefunction(self._setup_fn):
                    await self._setup_fn(self)
                else:  # a sync setup runs in a thread so /healthz keeps answering
                    await run_in_thread(self._setup_fn, self, lifespan=self._lifespans)
            self._check_stopping("the end of setup")
            if self.freeze_gc:
                with self.phase("gc freeze"):
                    gc.collect()
                    gc.freeze()
                self._gc_frozen = True
            self._ready, self._phase = True, "ready"
            logger.info("fastinfer service ready: %s", self._phases)
        except BaseException as exc:
            if self._stopping:  # shutdown stopped it: _shutdown says so, in one line
                return
            self._setup_error, self._phase = exc, "failed"
            logger.exception("fastinfer service setup failed")
            await self._close_managed("after the setup failure")
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_setup = False

    async def _close_managed(self, why: str) -> None:
        with self._lock:  # from here on, manage() closes what it is given at once
            items, self._managed = self._managed[::-1], []
            self._registered.closing(items)
        await close_all(items, self.shutdown_timeout_seconds, why)

    async def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
        phase, self._ready, self._phase = self._phase, False, "shutting down"
        await stop_setup(self._setup_task, self._setup_fn, self.setup_grace_seconds, phase)
        await self._close_managed("")
        if self._gc_frozen:
            gc.unfreeze()
            self._gc_frozen = False

    def _stale(self) -> bool:
        """Shutdown began, or this is the thread of an earlier lifespan's abandoned setup."""
        return self._stopping or setup_lifespan() not in (None, self._lifespans)

    def _start_afresh(self) -> None:
        """A lifespan starts: a second one (another `with TestClient(app)`) builds everything
        again, as the first did."""
        with self._lock:
            self._live_loop = lifespan_loop(self._live_loop)  # ConfigError while one runs
            self._stopping, self._lifespans = False, self._lifespans + 1
        self._ready, self._setup_error, self._setup_task = False, None, None
        self._phase, self._phases, self._serving, self._admission = "starting", {}, {}, {}
        self.state._new_lifespan()
        self._registered.new_lifespan()
        if self.door is not None:
            self.door.reset()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The FastAPI lifespan: run the setup (in the background by default), drain at shutdown.
        Each lifespan starts the service afresh: the setup runs again (one lifespan at a time)."""
        self._start_afresh()
        try:
            if self.background_setup:
                self._setup_task = asyncio.create_task(self._run_setup())
            else:
                await self._run_setup()
                if self._setup_error is not None:
                    raise self._setup_error
            try:
                yield
            finally:
                await self._shutdown()
        finally:
            self._live_loop = None

    # ------------------------------------------------------------------ request helpers

    def check_ready(self) -> None:
        """Raise :class:`NotReady` (HTTP 503) while setup has not finished."""
        if not self._ready:
            raise NotReady(self._not_ready_detail())

    async def run(self, request: Any, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless the HTTP client disconnects first, in which case it is
        cancelled (a queued batcher request is removed and never reaches the model) and
        :class:`ClientDisconnected` is raised. A WebSocket, ``None``, or a request whose response
        was sent (a ``BackgroundTasks`` job) is not watched: ``awaitable`` is just awaited."""
        if not self._ready and inspect.iscoroutine(awaitable):
            awaitable.close()  # not ready: never awaited, and no warning that says so
        self.check_ready()
        return await unless_disconnected(request, awaitable)

    async def submit(
        self, batcher: Any, item: Any, request: Any, *, timeout: float | None = None
    ) -> Any:
        """``await batcher.submit(item)``, cancelled if the client disconnects first."""
        self.check_ready()  # before the coroutine exists
        return await unless_disconnected(request, batcher.submit(item, timeout=timeout))

    def _unavailable(self, exc: BaseException, code: str, retry: dict[str, str]) -> Any:
        """503 for ``NotReady`` / ``ClosedError``, with the code that is true now: a failed
        setup and a pool that gave up will not clear by retrying (no ``Retry-After``)."""
        if self._setup_error is not None:
            return _error(503, "setup_failed", self._not_ready_detail())
        if self._stopping:
            return _error(503, "shutting_down", str(exc), retry)
        if self._phase == "not started":  # the lifespan never ran: retrying will not help
            return _error(503, code, str(exc))
        if code == "unhealthy":  # closed, though the service is not shutting down
            problems = self._problems()
            return _error(503, code, "; ".join([str(exc), *problems]), None if problems else retry)
        return _error(503, code, str(exc), retry)

    # ------------------------------------------------------------------ app wiring

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of the recorder (what ``GET /metrics`` returns)."""
        return self.recorder.exposition().encode()

    def install(self, app: Any) -> None:
        """Add the health, readiness and metrics routes, the error handlers and the HTTP metrics."""
        claim_app(app, self)  # one service per app: its error handlers are app-wide
        svc = self
        encode_tensors()  # a tensor in a response is its list, not a silent {}
        probe = {"methods": ["GET", "HEAD"], "include_in_schema": False}  # HEAD: probes, curl -I

        @app.api_route(self.paths["health"], **probe)
        async def healthz() -> dict[str, str]:
            return {"status": "alive"}

        @app.api_route(self.paths["ready"], **probe)
        async def readyz() -> Any:
            body = svc.readiness()
            return JSONResponse(body, status_code=200 if body["ready"] else 503)

        @app.api_route(self.paths["metrics"], **probe)
        async def metrics() -> Any:
            text = await asyncio.to_thread(svc.metrics_text)
            return Response(text, media_type=prometheus_client.CONTENT_TYPE_LATEST)

        if "dashboard" in self.paths:
            from fastinfer.integrations._dashboard import add_dashboard_routes

            add_dashboard_routes(app, self.recorder, self.readiness, self.paths)

        def retry_after(exc: BaseException) -> dict[str, str]:
            seconds = getattr(exc, "retry_after", None) or svc.retry_after_seconds
            return {"Retry-After": retry_after_header(seconds)}

        def queue_full(request: Any, exc: QueueFull) -> Any:
            if svc.door is not None:  # shed this route's next requests before they are read
                seconds = getattr(exc, "retry_after", None) or 0.0
                svc.door.close_for(
                    request.scope.get("method", ""),
                    request.scope.get("path", ""),
                    min(seconds, svc.retry_after_seconds),
                    request.scope.get("route"),
                )
            return _error(503, "queue_full", str(exc), retry_after(exc))

        def http_error(request: Any, exc: HTTPException) -> Any:
            headers = dict(exc.headers or {})
            if exc.status_code < 200 or exc.status_code in (204, 304):
                return Response(status_code=exc.status_code, headers=headers)
            detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
            return _error(exc.status_code, error_code(exc.status_code), detail, headers)

        handlers: dict[type[BaseException], Callable[[Any, Any], Any]] = {
            QueueFull: queue_full,
            HTTPException: http_error,
            NotReady: lambda r, e: svc._unavailable(e, "not_ready", retry_after(e)),
            WorkerCrashed: lambda r, e: _error(*crash_reply(e, svc._problems(), retry_after(e))),
            WorkerTimeout: lambda r, e: _error(504, "worker_timeout", str(e)),
            ClosedError: lambda r, e: svc._unavailable(e, "unhealthy", retry_after(e)),
            DeadlineExceeded: lambda r, e: _error(504, "deadline_exceeded", str(e)),
            InvalidInput: lambda r, e: _error(422, "invalid_input", str(e)),
            ClientDisconnected: lambda r, e: _error(499, "client_disconnected", str(e)),
            RequestValidationError: lambda r, e: _error(
                422, "invalid_input", validation_message(e)
            ),
        }
        for exc_type, handler in handlers.items():
            app.add_exception_handler(exc_type, on_event_loop(handler))

        async def internal(request: Any, exc: Exception) -> Any:
            logger.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
            # Anything but a FastInferError got here past the middleware (which answers the
            # app's own errors): the server closes this connection after it, so say so.
            close = None if isinstance(exc, FastInferError) else {"Connection": "close"}
            return _error(500, "internal_error", "internal error; see the server log", close)

        app.add_exception_handler(Exception, internal)
        app.add_exception_handler(FastInferError, internal)
        # Starlette runs the last added middleware first: metrics see what the limits answer.
        app.add_middleware(
            RequestLimits,
            max_body_bytes=self.max_body_bytes,
            client_timeout_seconds=self.client_timeout_seconds,
            door=self.door,
            on_reject=lambda reason: self._http_refused.labels(reason=reason).inc(),
            retry_after=retry_after_header,
            on_error=lambda scope, exc: logger.error(
                "unhandled %s on %s", type(exc).__name__, scope.get("path"), exc_info=exc
            ),
        )
        app.add_middleware(HTTPMetrics, histogram=self._http_latency, skip=set(self.paths.values()))

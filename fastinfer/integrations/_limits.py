"""HTTP limits and HTTP metrics for :class:`~fastinfer.integrations.fastapi.FastInferService`,
as ASGI middleware.

- **Request bodies** are read here, before routing, within ``max_body_bytes`` (413 as soon as the
  declared length or the bytes received pass it; nothing more is read) and within
  ``client_timeout_seconds`` from the request's arrival (408, connection closed: a client that
  sends its body slowly or never holds no more than that). The app then gets the body in one
  piece; later ``receive()`` calls (the disconnect watch) go to the server as before.
- **Shedding at the door**: once a route answered ``QueueFull`` (503), further requests to the same
  path are answered 503 here, before their body is read or parsed, until the batcher's retry
  estimate has passed. With an admission limit (:meth:`FastInferService.admission` sets it: the
  queue it sized plus what the batch slots run), at most that many requests are past the door at
  once; the next one is answered 503 here at once. Under a flood the service then spends
  microseconds, not a full request's parsing and validation, on each request it cannot take,
  so rejections stay fast and the cores stay with the model. (Without the limit, a burst of
  requests already inside the event loop would all pass an open door before the first of them
  reached the full queue.)

- **HTTP metrics** (:class:`HTTPMetrics`): latency per route template and status class.

Every answer uses the service's error body, ``{"error": <code>, "detail": <message>}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

__all__ = [
    "RESPONSE_COMPLETE",
    "Door",
    "HTTPMetrics",
    "RequestLimits",
    "encode_tensors",
    "error_code",
    "match_route",
    "on_event_loop",
    "retry_after_header",
    "route_path",
    "send_error",
    "validation_message",
]

Send = Callable[[dict[str, Any]], Awaitable[None]]

#: set in the ASGI scope once the response's last body message was sent: from then on the server
#: reports ``http.disconnect`` to ``receive()`` (a BackgroundTasks job is not a client leaving)
RESPONSE_COMPLETE = "fastinfer.response_complete"

# error codes that differ from the status phrase (the rest: "Not Found" -> "not_found")
_CODES = {413: "body_too_large", 408: "client_timeout", 499: "client_disconnected"}


def error_code(status: int) -> str:
    """The ``error`` field for an HTTP status: ``404`` -> ``"not_found"``."""
    if status in _CODES:
        return _CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


async def send_error(
    send: Send,
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    close: bool = False,
) -> None:
    """Send a complete ``{"error", "detail"}`` JSON response on a raw ASGI ``send``."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Door:
    """Remembers, per (method, path), until when requests are shed without being read.

    A window lasts the batcher's retry estimate, at least ``min_seconds`` (10 ms: an estimate
    near zero, such as a batch already overdue, would reopen the door at once and leave every
    rejection to the slow path). Bounded: at most ``max_entries`` paths are remembered
    (user-controlled paths cannot exhaust memory); expired entries are dropped first, and a full
    table sheds nothing new.
    """

    def __init__(
        self,
        *,
        exempt: set[str] | frozenset[str] = frozenset(),
        min_seconds: float = 0.01,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._until: dict[tuple[str, str], tuple[float, Any]] = {}
        self._max = max_entries
        self.exempt = exempt  # the service's own routes (health, readiness, metrics, dashboard)
        self.min_seconds = min_seconds
        self.clock = clock
        self.shed = 0
        #: requests allowed past the door at once (None: no limit); ``in_flight``: past it now
        self.limit: int | None = None
        self.in_flight = 0
        #: the latency target the limit was sized for, and the slots' worth it never goes below
        self.target_seconds: float | None = None
        self.floor = 0
        self._cap: float | None = None  # the limit now, lowered while requests miss the target
        self._lowered_at = float("-inf")
        self._routes: dict[tuple[str, str], Any] = {}  # (method, path) -> route, once routed

    def allowed(self) -> int | None:
        """Requests allowed past the door now: ``limit``, lowered while requests miss the target.

        ``limit`` is sized from the model's cost alone; where a request's HTTP handling is a large
        part of its cost (a tiny model, a flood of clients) that many requests take longer than
        the target to get through. So the door also watches how long the requests it let in took:
        one that took longer than ``target_seconds`` cuts the limit by 10% (once per target's
        time, so one late burst counts once, never below ``floor``); each one on time adds one
        back, up to ``limit`` (additive increase, multiplicative decrease)."""
        if self.limit is None or self._cap is None:
            return self.limit
        return max(self.floor, 1, min(self.limit, int(self._cap)))

    def finished(self, seconds: float) -> None:
        """A request let in ``seconds`` ago was answered: adjust the limit (see :meth:`allowed`)."""
        if self.limit is None or self.target_seconds is None:
            return
        cap = float(self.limit) if self._cap is None else self._cap
        if seconds > self.target_seconds:
            now = self.clock()
            if now - self._lowered_at >= self.target_seconds:
                cap, self._lowered_at = max(float(self.floor), 1.0, cap * 0.9), now
        else:
            cap = min(float(self.limit), cap + 1.0)
        self._cap = cap

    def reset(self) -> None:
        """Forget the admission limit and the shed windows: a new lifespan sizes them again."""
        self._until.clear()
        self._routes.clear()
        self.limit, self.target_seconds, self.floor = None, None, 0
        self._cap, self._lowered_at = None, float("-inf")

    def route_of(self, method: str, path: str) -> Any:
        """The route a request to ``method path`` was last routed to (None: not seen yet)."""
        return self._routes.get((method, path))

    def remember_route(self, method: str, path: str, route: Any) -> None:
        if route is not None and (len(self._routes) < self._max or (method, path) in self._routes):
            self._routes[(method, path)] = route

    def close_for(self, method: str, path: str, seconds: float, route: Any = None) -> None:
        """Shed requests to ``method path`` for the next ``seconds`` (at least ``min_seconds``)."""
        if math.isnan(seconds) or math.isinf(seconds):
            return
        seconds = max(seconds, self.min_seconds)
        now = self.clock()
        key = (method, path)
        if key not in self._until and len(self._until) >= self._max:
            self._until = {k: v for k, v in self._until.items() if v[0] > now}
            if len(self._until) >= self._max:
                return
        self._until[key] = (now + seconds, route)

    def check(self, method: str, path: str) -> tuple[float, Any] | None:
        """(seconds left, the route) while ``method path`` is shed, else None."""
        entry = self._until.get((method, path))
        if entry is None:
            return None
        left = entry[0] - self.clock()
        if left <= 0:
            del self._until[(method, path)]
            return None
        return left, entry[1]


def route_path(scope: Any) -> str:
    """The path the app routes on: ``scope["path"]`` without its ``root_path`` prefix. Under
    ``uvicorn --root-path /api``, or in an app mounted at ``/v1``, ASGI puts the prefix in both
    (``/api/readyz``), so the service's own paths are compared with what follows it."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def match_route(scope: dict[str, Any], routes: Any) -> Any:
    """The route of ``routes`` (a Starlette app's) that ``scope`` matches, as its router would
    pick it: the first full match (inside a mount, the mounted app's route), else the first
    that matches the path but not the method (answered 405); None when none does."""
    if not routes:
        return None
    from starlette.routing import Match

    partial = None
    for route in routes:
        try:
            match, child = route.matches(scope)
        except Exception:  # a route of the app's own that cannot match this scope
            continue
        if match == Match.FULL:
            inner = getattr(route, "routes", None)  # a Mount: the route inside it
            return match_route({**scope, **child}, inner) if inner is not None else route
        if match == Match.PARTIAL and partial is None:
            partial = route
    return partial


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return bytes(v)
    return None


class RequestLimits:
    """ASGI middleware: shed at the door, then read the body within its size and time limits.

    ``on_reject(reason)`` is called for each request answered here (``"shed"``,
    ``"body_too_large"``, ``"client_timeout"``); ``retry_after(seconds)`` formats Retry-After.
    """

    def __init__(
        self,
        app: Any,
        *,
        max_body_bytes: int | None,
        client_timeout_seconds: float | None,
        door: Door | None,
        on_reject: Callable[[str], None],
        retry_after: Callable[[float], str],
        on_error: Callable[[dict[str, Any], Exception], None] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout = client_timeout_seconds
        self.door = door
        self.on_reject = on_reject
        self.retry_after = retry_after
        self.on_error = on_error

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        door = self.door
        if door is None or route_path(scope) in door.exempt:
            await self._limited(scope, receive, send)
            return
        shed = door.check(scope.get("method", ""), scope.get("path", ""))
        if shed is not None:
            left, route = shed
            route = route or self._route(scope)
            if route is not None:
                scope["route"] = route  # the HTTP metrics label it by its route template
            door.shed += 1
            self.on_reject("shed")
            await send_error(
                send,
                503,
                "queue_full",
                "the service is at capacity: this route's queue was full moments ago; "
                f"retry after ~{left * 1000:.0f} ms",
                {"Retry-After": self.retry_after(left)},
            )
            return
        allowed = door.allowed()
        if allowed is not None and door.in_flight >= allowed:
            route = self._route(scope)
            if route is not None:
                scope["route"] = route
            door.shed += 1
            self.on_reject("at_capacity")
            await send_error(
                send,
                503,
                "queue_full",
                f"the service is at capacity: {door.in_flight} requests in flight, its admission "
                f"limit is {allowed} now (what finishes within its latency target); retry shortly",
                {"Retry-After": self.retry_after(0.0)},
            )
            return
        door.in_flight += 1
        started = time.perf_counter()
        try:
            await self._limited(scope, receive, send)
        finally:
            door.in_flight -= 1
            door.finished(time.perf_counter() - started)
            door.remember_route(scope.get("method", ""), scope.get("path", ""), scope.get("route"))

    def _route(self, scope: dict[str, Any]) -> Any:
        """The route a request shed here would have reached: the one a request to its path
        was routed to before, else matched against the app's routes now (remembered), so that
        its HTTP metrics carry its route template even before any request to it finished."""
        assert self.door is not None
        method, path = scope.get("method", ""), scope.get("path", "")
        route = self.door.route_of(method, path)
        if route is None:
            route = match_route(scope, getattr(scope.get("app"), "routes", None))
            self.door.remember_route(method, path, route)
        return route

    async def _limited(self, scope: Any, receive: Any, send: Any) -> None:
        length = _header(scope, b"content-length")
        if length is None and _header(scope, b"transfer-encoding") is None:
            await self._app(scope, receive, send)  # no body (GET, HEAD, ...)
            return
        limit = self.max_body_bytes
        if limit is not None and length is not None and length.isdigit() and int(length) > limit:
            await self._too_large(send, int(length))
            return
        body = await self._read_body(receive, send)
        if body is None:
            return  # answered here (413, 408) or the client left
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        """The app, with an exception it did not handle answered here as a 500 (``on_error``
        logs it). Left to Starlette, the 500 is sent and the exception re-raised to the server,
        which then drops the keep-alive connection without ``Connection: close``: the client's
        next request on it is lost. Once the response has started, the exception goes on up
        (the connection must close: the response is incomplete)."""
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                scope[RESPONSE_COMPLETE] = True  # svc.submit stops watching for a disconnect

        if self.on_error is None:
            await self.app(scope, receive, tracking_send)
            return
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            self.on_error(scope, exc)
            await send_error(send, 500, "internal_error", "internal error; see the server log")

    async def _read_body(self, receive: Any, send: Any) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                self.on_reject("client_timeout")
                await send_error(
                    send,
                    408,
                    "client_timeout",
                    f"the request body did not arrive within client_timeout_seconds="
                    f"{self.timeout:g} ({size} bytes received); send it at once, or raise the "
                    "service's client_timeout_seconds",
                    close=True,
                )
                return None
            if message["type"] == "http.disconnect":
                await send_error(
                    send, 499, "client_disconnected", "the client left while sending its request"
                )
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.max_body_bytes is not None and size > self.max_body_bytes:
                await self._too_large(send, size, partial=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Any, size: int, *, partial: bool = False) -> None:
        self.on_reject("body_too_large")
        got = f"more than {self.max_body_bytes}" if partial else str(size)
        await send_error(
            send,
            413,
            "body_too_large",
            f"the request body has {got} bytes; this service accepts at most max_body_bytes="
            f"{self.max_body_bytes} bytes: send a smaller body, or raise the service's "
            "max_body_bytes",
            close=True,
        )


class HTTPMetrics:
    """ASGI middleware: latency per route template (bounded label values) and status class."""

    def __init__(self, app: Any, *, histogram: Any, skip: set[str]) -> None:
        self.app, self.histogram, self.skip = app, histogram, skip

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or route_path(scope) in self.skip:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(route=template, status=f"{status[0] // 100}xx").observe(
                time.perf_counter() - t0
            )


def _tensor_to_list(t: Any) -> Any:
    return t.detach().cpu().tolist()


def _to_list(a: Any) -> Any:
    return a.tolist()


def encode_tensors() -> None:
    """Teach FastAPI's ``jsonable_encoder`` torch tensors and numpy arrays: one in a response
    becomes its nested list (a 0-d one its number), a numpy scalar (``np.float32``) its number.
    Without this FastAPI falls back to ``vars(tensor)`` and answers ``{}`` with a 200, silently,
    and fails a numpy result with a 500 (``return {"y": result}`` where the batcher's result is
    one). NaN or inf in one still fails the response, as for any float. numpy is imported here,
    not by ``import fastinfer``."""
    import torch
    from fastapi.encoders import ENCODERS_BY_TYPE

    for tensor_type in (torch.Tensor, torch.nn.Parameter):
        ENCODERS_BY_TYPE.setdefault(tensor_type, _tensor_to_list)
    try:
        import numpy as np
    except ImportError:  # no numpy: no numpy results either
        return
    # FastAPI looks encoders up by exact type: every concrete scalar type is listed
    found: list[type] = [np.ndarray]
    stack: list[type] = [np.bool_, np.integer, np.floating]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    for cls in found:
        ENCODERS_BY_TYPE.setdefault(cls, _to_list)


def retry_after_header(seconds: float) -> str:
    """The ``Retry-After`` value for ``seconds``: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def on_event_loop(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    """A sync exception handler as an async one (Starlette would run a sync one in a thread)."""

    async def handler(request: Any, exc: Any) -> Any:
        return fn(request, exc)

    return handler


def validation_message(exc: Any) -> str:
    """A request validation error as one line: ``text: Field required; n: ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"

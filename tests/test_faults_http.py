"""HTTP faults (issue 17) against a real server (uvicorn on localhost) and real clients.

Each test reproduces one fault found on 75b60b0 and asserts the fix:

- a body far over any sane size was read and parsed in full (now: 413 at once, by the declared
  length or by the bytes received, with ``max_body_bytes`` defaulting to 1 MiB);
- a client that sends its body slowly held its request forever (now: 408 after
  ``client_timeout_seconds``, and the connection is closed);
- 400/404/405 and the not-ready ``/readyz`` used FastAPI's ``{"detail": ...}`` body (now: the
  documented ``{"error", "detail"}`` for every status);
- under a flood, each rejection paid for a full parse and validation (now: after a ``QueueFull``
  the route is shed at the door, before its body is read, until the batcher's retry estimate);
- the services admitted far more than could finish (now: ``svc.admission`` sizes the queue
  from the measured batch cost; every flooded request resolves exactly once, 200 or 503).

And lifecycle faults found on 4d24f48: a shutdown during a slow setup waited for it and let it
build what nothing closed; a failed setup left what it managed running and told clients to retry;
``/readyz`` said ready while a managed pool had no live worker or had given up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.serve
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import until  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import fastinfer  # noqa: E402
from fastinfer._common.export import gauge  # noqa: E402
from fastinfer.integrations.fastapi import FastInferService, run_server  # noqa: E402


class Body(BaseModel):
    x: int


def make_app(
    fn: Callable[[list[int]], list[Any]] | None = None,
    *,
    setup_gate: threading.Event | None = None,
    batcher: dict[str, Any] | None = None,
    latency_target_ms: float | None = None,
    **svc_kw: Any,
) -> tuple[FastAPI, FastInferService]:
    svc = FastInferService(**svc_kw)
    model = fn or (lambda xs: [x * 2 for x in xs])

    @svc.setup
    def build(svc: FastInferService) -> None:
        if setup_gate is not None:
            with svc.phase("load"):
                assert setup_gate.wait(20)
        opts = {"max_batch_size": 4, "max_wait_ms": 1.0, **(batcher or {})}
        if latency_target_ms is not None:  # admit what finishes in time: sized from the cost
            example = list(range(opts["max_batch_size"]))
            opts.update(svc.admission(model, example, latency_target_ms=latency_target_ms))
        svc.state.batcher = svc.manage(
            fastinfer.DynamicBatcher(model, **opts, **svc.batcher_hooks()),
            name="model",
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: Body, request: Request) -> dict[str, int]:
        return {"y": await svc.submit(svc.state.batcher, body.x, request)}

    return app, svc


@pytest.fixture
def served() -> Iterator[Callable[..., tuple[str, FastInferService]]]:
    stack: list[Any] = []

    def start(*args: Any, **kw: Any) -> tuple[str, FastInferService]:
        app, svc = make_app(*args, **kw)
        cm = run_server(app)
        url = cm.__enter__()
        stack.append(cm)
        if kw.get("setup_gate") is None:
            until(lambda: svc.ready, "setup")
        return url, svc

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def connect(url: str, timeout: float = 5.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length framed) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def metric_samples(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(client.get("/metrics").text)
        for s in fam.samples
    }


# -------------------------------------------------------------------------------- body size


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(served: Any) -> None:
    url, _ = served()  # the default limit: 1 MiB
    sock = connect(url)
    try:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 52428800\r\n\r\n"  # 50 MB declared, not one byte of it sent
        )
        try:
            status, headers, body = read_response(sock)
        except TimeoutError:
            raise AssertionError("no answer: the server waits to read a 50 MB body") from None
    finally:
        sock.close()
    assert status == 413
    assert headers["connection"] == "close"
    answer = json.loads(body)
    assert answer["error"] == "body_too_large"
    assert "52428800" in answer["detail"] and "max_body_bytes=1048576" in answer["detail"]


def test_a_chunked_body_is_cut_off_at_the_limit(served: Any) -> None:
    url, svc = served(max_body_bytes=1000)
    sock = connect(url)
    chunk = b'{"x": 1, "pad": "' + b"a" * 500 + b'"}'
    try:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(4))
            + b"0\r\n\r\n"
        )
        status, _, body = read_response(sock)
    finally:
        sock.close()
    assert status == 413, body
    assert json.loads(body)["detail"].startswith("the request body has more than 1000 bytes")
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/predict", json={"x": 4}).json() == {"y": 8}  # small bodies pass
        samples = metric_samples(client)
    assert samples[("fastinfer_http_refused_total", (("reason", "body_too_large"),))] == 1
    assert svc.state.batcher.statistics().requests_submitted == 1


# -------------------------------------------------------------------------------- slow client


def test_a_client_that_sends_its_body_slowly_is_timed_out(served: Any) -> None:
    url, svc = served(client_timeout_seconds=0.5)
    sock = connect(url)
    try:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"x": '  # then nothing more
        )
        t0 = time.monotonic()
        try:
            status, headers, body = read_response(sock)
        except TimeoutError:
            raise AssertionError("the slow client was never timed out") from None
        waited = time.monotonic() - t0
        assert sock.recv(1) == b"", "the connection stays open after the 408"
    finally:
        sock.close()
    assert status == 408 and headers["connection"] == "close"
    answer = json.loads(body)
    assert answer["error"] == "client_timeout" and "client_timeout_seconds=0.5" in answer["detail"]
    assert 0.4 <= waited < 4.5
    assert svc.state.batcher.statistics().requests_submitted == 0


def test_the_client_timeout_has_a_documented_default() -> None:
    svc = FastInferService()
    assert svc.client_timeout_seconds == 10.0 and svc.max_body_bytes == 1_048_576
    for bad in ({"max_body_bytes": 0}, {"client_timeout_seconds": -1}):
        with pytest.raises(fastinfer.ConfigError):
            FastInferService(**bad)


# -------------------------------------------------------------------------------- error format


def test_every_status_uses_the_documented_error_body(served: Any) -> None:
    gate = threading.Event()
    url, svc = served(setup_gate=gate)
    with httpx.Client(base_url=url, timeout=10) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"] == "not_ready" and "phase: load" in ready.json()["detail"]
        gate.set()
        until(lambda: svc.ready, "setup")

        missing = client.get("/no/such/route")
        assert missing.status_code == 404
        assert missing.json() == {"error": "not_found", "detail": "Not Found"}

        wrong_method = client.get("/predict")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert wrong_method.json() == {
            "error": "method_not_allowed",
            "detail": "Method Not Allowed",
        }

        not_utf8 = client.post(
            "/predict", content=b'{"x": "\xc3"}', headers={"content-type": "application/json"}
        )
        assert not_utf8.status_code == 400
        assert not_utf8.json()["error"] == "bad_request" and not_utf8.json()["detail"]

        for resp in (missing, wrong_method, not_utf8):
            assert set(resp.json()) == {"error", "detail"}
            assert resp.headers["content-type"] == "application/json"


# -------------------------------------------------------------------------------- overload


class Gate:
    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        assert self.release.wait(20)
        return [i * 2 for i in items]


def test_after_a_queue_full_the_route_is_shed_at_the_door(served: Any) -> None:
    gate = Gate()
    url, svc = served(gate, batcher={"max_batch_size": 1, "max_queue_size": 1})
    frozen = [1000.0]
    svc.door.clock = lambda: frozen[0]  # the shed window does not pass while the test runs
    stats = svc.state.batcher.statistics
    answers: list[int] = []
    try:
        with httpx.Client(base_url=url, timeout=20) as client:

            def send(x: int) -> None:
                answers.append(client.post("/predict", json={"x": x}).status_code)

            threads = [threading.Thread(target=send, args=(i,)) for i in (1, 2)]
            threads[0].start()
            until(lambda: stats().batches_in_flight == 1, "first batch running")
            threads[1].start()
            until(lambda: stats().queue_depth == 1, "second request queued")

            full = client.post("/predict", json={"x": 3})  # the batcher says QueueFull
            assert full.status_code == 503 and full.json()["error"] == "queue_full"
            assert stats().requests_rejected == 1

            # Shed at the door: answered before the body is read (an invalid body gets the
            # 503, not a 422) and never reaches the batcher.
            shed = client.post("/predict", content=b"not json at all")
            assert shed.status_code == 503, shed.text
            assert shed.json()["error"] == "queue_full" and "Retry-After" in shed.headers
            assert int(shed.headers["Retry-After"]) >= 1
            assert stats().requests_rejected == 1 and stats().requests_submitted == 3
            # the service's own routes are never shed
            assert client.get("/readyz").status_code == 200
            assert client.get("/healthz").status_code == 200

            gate.release.set()
            for t in threads:
                t.join()
            samples = metric_samples(client)
    finally:
        gate.release.set()
    assert sorted(answers) == [200, 200]
    assert samples[("fastinfer_http_refused_total", (("reason", "shed"),))] == 1
    key = ("fastinfer_http_request_seconds_count", (("route", "/predict"), ("status", "5xx")))
    assert samples[key] == 2  # the batcher's 503 and the door's, under the route template


def test_the_door_opens_again_once_the_retry_estimate_passed(served: Any) -> None:
    gate = Gate()
    url, svc = served(gate, batcher={"max_batch_size": 1, "max_queue_size": 1})
    now = [1000.0]
    svc.door.clock = lambda: now[0]
    try:
        with httpx.Client(base_url=url, timeout=20) as client:
            first = threading.Thread(target=lambda: client.post("/predict", json={"x": 1}))
            first.start()
            until(lambda: svc.state.batcher.statistics().batches_in_flight == 1, "running")
            second = threading.Thread(target=lambda: client.post("/predict", json={"x": 2}))
            second.start()
            until(lambda: svc.state.batcher.statistics().queue_depth == 1, "queued")
            assert client.post("/predict", json={"x": 3}).status_code == 503
            gate.release.set()
            first.join()
            second.join()
            shed = client.post("/predict", json={"x": 4})  # inside the window: shed
            assert shed.status_code == 503 and svc.door.shed == 1
            now[0] += svc.retry_after_seconds  # the window never outlasts retry_after_seconds
            assert client.post("/predict", json={"x": 5}).json() == {"y": 10}
    finally:
        gate.release.set()


def test_at_most_the_admission_limit_is_past_the_door(served: Any) -> None:
    """A burst already inside the event loop cannot all pass an open door: the door counts."""
    gate = Gate()
    url, svc = served(gate, batcher={"max_batch_size": 1})
    svc.door.limit = 2  # what svc.admission sets: the sized queue plus what the slots run
    stats = svc.state.batcher.statistics
    try:
        with httpx.Client(base_url=url, timeout=20) as client:
            held = [
                threading.Thread(target=lambda i=i: client.post("/predict", json={"x": i}))
                for i in (1, 2)
            ]
            for t in held:
                t.start()
            until(lambda: stats().requests_submitted == 2, "two requests in flight")
            over = client.post("/predict", content=b"not even json")  # never parsed
            assert over.status_code == 503 and "Retry-After" in over.headers
            assert over.json()["error"] == "queue_full" and "limit is 2" in over.json()["detail"]
            assert client.get("/readyz").status_code == 200  # the service's routes are exempt
            assert stats().requests_submitted == 2 and svc.door.in_flight == 2
            gate.release.set()
            for t in held:
                t.join()
            assert svc.door.in_flight == 0
            assert client.post("/predict", json={"x": 3}).json() == {"y": 6}
            samples = metric_samples(client)
    finally:
        gate.release.set()
    assert samples[("fastinfer_http_refused_total", (("reason", "at_capacity"),))] == 1


def test_a_flood_resolves_every_request_once_with_200_or_a_fast_503(served: Any) -> None:
    """Far more concurrent requests than the admission limit: nothing lost, nothing hangs."""

    def model(xs: list[int]) -> list[int]:
        time.sleep(0.05)  # 50 ms per batch, whatever its size
        return [x * 2 for x in xs]

    url, svc = served(model, batcher={"max_batch_size": 8}, latency_target_ms=200, freeze_gc=False)
    admission = svc.readiness()["admission"]["model"]
    assert admission["latency_target_ms"] == 200
    # (floor(200 ms * 0.95 / 50 ms) - 1) rounds of 8 per slot at most: fewer than the clients
    slots = admission["max_concurrent_batches"]
    assert svc.readiness()["serving"]["model"]["slots"] == slots
    assert 8 * slots <= admission["max_queue_size"] <= 16 * slots
    assert svc.door.limit == admission["max_queue_size"] + 8 * slots
    assert svc.door.floor == 8 * slots and svc.door.target_seconds == 0.2
    limits = {"max_queue_size": admission["max_queue_size"]}

    n, clients = 480, 60
    statuses: Counter[int] = Counter()
    retry_after_missing = 0
    lock = threading.Lock()

    def client_thread(ids: range) -> None:
        nonlocal retry_after_missing
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in ids:
                try:
                    r = client.post("/predict", json={"x": i})
                    code = r.status_code
                    if code == 200:
                        assert r.json() == {"y": 2 * i}
                    elif code == 503 and "Retry-After" not in r.headers:
                        with lock:
                            retry_after_missing += 1
                except httpx.HTTPError:
                    code = 0
                with lock:
                    statuses[code] += 1

    threads = [
        threading.Thread(target=client_thread, args=(range(k, n, clients),)) for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(statuses.values()) == n, statuses  # every request answered exactly once
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0 and statuses[503] > 0 and retry_after_missing == 0, (statuses, limits)
    st = svc.state.batcher.statistics()
    assert st.requests_ok == statuses[200]  # what was admitted was answered
    assert st.requests_failed == st.requests_expired == st.queue_depth == 0
    assert svc.door.shed > 0 and svc.door.in_flight == 0  # most were turned away at the door


def test_the_door_lowers_its_limit_while_admitted_requests_miss_the_target() -> None:
    """The admission limit is sized from the model's cost; where HTTP handling dominates, requests
    take longer than the target to get through, and the door takes fewer in (AIMD)."""
    from fastinfer.integrations._limits import Door

    now = [0.0]
    door = Door(clock=lambda: now[0])
    assert door.allowed() is None  # no admission: no limit
    door.limit, door.floor, door.target_seconds = 1000, 64, 0.5
    assert door.allowed() == 1000
    door.finished(0.8)  # late: -10%
    assert door.allowed() == 900
    for _ in range(50):
        door.finished(0.9)  # the same late burst, within one target's time: counted once
    assert door.allowed() == 900
    for _ in range(60):
        now[0] += 0.5
        door.finished(2.0)
    assert door.allowed() == 64  # never below what the batch slots run
    for _ in range(100):
        door.finished(0.1)  # on time: one back each
    assert door.allowed() == 164
    for _ in range(5000):
        door.finished(0.1)
    assert door.allowed() == 1000  # never above the sized limit


# -------------------------------------------------------------------------------- handler bugs


@pytest.fixture
def buggy() -> Iterator[str]:
    """A service whose routes have the bugs user code has: one raises, one returns a tensor."""
    import torch

    svc = FastInferService()
    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.get("/boom")
    async def boom() -> Any:
        raise RuntimeError("a bug in the handler")

    @app.get("/tensor")
    async def tensor():  # type: ignore[no-untyped-def]  # unannotated: FastAPI's own encoder
        return {"y": torch.tensor([2.0, 2.5]), "n": torch.tensor(3)}

    @app.get("/tensor_any")
    async def tensor_any() -> Any:  # annotated: pydantic serialises, and refuses a tensor
        return {"y": torch.tensor([2.0, 2.5])}

    with run_server(app) as url:
        until(lambda: svc.ready, "setup")
        yield url


def test_a_handler_bug_answers_500_and_keeps_the_connection(buggy: str) -> None:
    """A route that raised got a 500, then the server dropped the keep-alive connection without
    ``Connection: close`` (Starlette re-raises after the 500): the next request on it was lost."""
    sock = connect(buggy)
    try:  # two requests, one after the other, on one connection: the route that raises, then another
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 500, body
        assert json.loads(body) == {
            "error": "internal_error",
            "detail": "internal error; see the server log",
        }
        assert headers.get("connection") != "close"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = read_response(sock)  # the same connection still answers
        assert status == 200 and json.loads(body) == {"status": "alive"}
    finally:
        sock.close()
    with httpx.Client(base_url=buggy, timeout=10) as client:
        assert [client.get("/boom").status_code for _ in range(3)] == [500] * 3
        count = (
            "fastinfer_http_request_seconds_count",
            (("route", "/boom"), ("status", "5xx")),
        )
        assert metric_samples(client)[count] == 4  # the HTTP metrics saw every 500


def test_a_tensor_in_a_response_is_its_values_not_an_empty_object(buggy: str) -> None:
    with httpx.Client(base_url=buggy, timeout=10) as client:
        resp = client.get("/tensor")
        assert resp.status_code == 200 and resp.json() == {"y": [2.0, 2.5], "n": 3}
        refused = client.get("/tensor_any")  # not silent either way: an error, not {}
        assert refused.status_code == 500 and refused.json()["error"] == "internal_error"


def test_health_readiness_and_metrics_answer_head(buggy: str) -> None:
    with httpx.Client(base_url=buggy, timeout=10) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            resp = client.head(path)
            assert resp.status_code == 200 and resp.content == b"", path


# -------------------------------------------------------------------------------- lifecycle


def test_shutdown_during_a_slow_setup_does_not_wait_and_closes_what_setup_registers_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A SIGTERM during a 40 s ``init`` waited the 40 s, then setup went on building a pool and a
    batcher nothing closed, and each signal logged an ERROR with a CancelledError traceback."""
    caplog.set_level(logging.INFO, logger="fastinfer")
    slow_init, built, reached = threading.Event(), [], []
    svc = FastInferService()
    svc.setup_grace_seconds = 0.2

    @svc.setup
    def build(svc: FastInferService) -> None:
        with svc.phase("load"):  # serve_model's shape: the pool is built and managed here
            slow_init.wait(10)  # a slow init(): not interrupted, not waited for
            batcher = fastinfer.DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=1)
            built.append(batcher)
            svc.manage(batcher, name="model")  # shutdown began: closed at once, setup stopped
            reached.append("after manage")
        with svc.phase("measure"):
            reached.append("measure")

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)
    with run_server(app) as url:
        until(lambda: httpx.get(url + "/readyz").json()["phase"] == "load", "the load phase")
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5  # the server stopped without waiting for the setup
    slow_init.set()
    until(lambda: bool(built) and built[0].closed, "the late batcher closed")
    assert reached == [] and not svc.ready and svc._managed == []
    fastinfer_logs = [r for r in caplog.records if r.name.startswith("fastinfer")]
    assert [r for r in fastinfer_logs if r.levelno >= logging.ERROR] == []
    said = [r.getMessage() for r in fastinfer_logs if "during setup" in r.getMessage()]
    assert len(said) == 1 and "phase 'load'" in said[0], said


def test_phase_refuses_to_start_once_shutdown_began() -> None:
    svc = FastInferService()
    asyncio.run(svc._shutdown())
    with pytest.raises(asyncio.CancelledError, match="shutting down"), svc.phase("compile"):
        pytest.fail("the phase ran after shutdown began")


def test_a_failed_setup_closes_what_it_managed_and_says_so_without_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Setup failed after a PinnedPool's workers started: they stayed alive while the service sat
    in setup_failed, and requests were told ``not_ready ... retry shortly``."""
    caplog.set_level(logging.INFO, logger="fastinfer")
    managed = []
    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        batcher = fastinfer.DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=1)
        managed.append(svc.manage(batcher, name="model"))
        raise RuntimeError("the bundle has no weights.pt\n(second line)")

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: Body, request: Request) -> dict[str, int]:
        return {"y": await svc.submit(svc.state.batcher, body.x, request)}

    with run_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        until(lambda: svc.readiness().get("error") == "setup_failed", "the setup failure")
        until(lambda: managed[0].closed, "the managed batcher closed")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"] == "setup_failed"
        assert "no weights.pt" in ready.json()["detail"]
        resp = client.post("/predict", json={"x": 1})
        assert resp.status_code == 503 and "retry-after" not in resp.headers
        body = resp.json()
        assert body["error"] == "setup_failed" and "retry" not in body["detail"]
        assert "RuntimeError: the bundle has no weights.pt)" in body["detail"]
        assert "second line" not in body["detail"]
    closing = [r for r in caplog.records if "after the setup failure" in r.getMessage()]
    assert len(closing) == 1 and "model" in closing[0].getMessage()


@dataclasses.dataclass
class FakePoolStats:
    """What a PinnedPool's statistics() says about its health (duck-typed by readiness)."""

    workers: int = gauge(default=2)
    workers_alive: int = gauge(default=2)
    closed: bool = gauge(default=False)


class FakePool:
    def __init__(self) -> None:
        self.stats = FakePoolStats()

    def statistics(self) -> FakePoolStats:
        return dataclasses.replace(self.stats)

    def run(self, xs: list[int]) -> list[int]:
        if self.stats.closed:
            raise fastinfer.ClosedError("cannot submit to a closed PinnedPool")
        return [x * 2 for x in xs]

    def close(self) -> None:
        pass


def test_readiness_fails_while_a_managed_pool_has_no_worker_or_gave_up(served: Any) -> None:
    """/readyz said 200 while a PinnedPool crash-looped with no live worker, and after it gave up
    and closed itself; requests then got 503 ``shutting_down``, though nothing was shutting down."""
    pool = FakePool()
    svc = FastInferService(retry_after_seconds=2.0)

    @svc.setup
    def build(svc: FastInferService) -> None:
        svc.manage(pool, name="m_pool", standard=False)
        svc.state.batcher = svc.manage(
            fastinfer.DynamicBatcher(pool.run, max_batch_size=4, max_wait_ms=1), name="model"
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: Body, request: Request) -> dict[str, int]:
        return {"y": await svc.submit(svc.state.batcher, body.x, request)}

    with run_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        until(lambda: svc.ready, "setup")
        assert client.get("/readyz").status_code == 200
        pool.stats.workers_alive = 0  # crash loop: every worker dead, being restarted
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"] == "unhealthy"
        assert ready.json()["detail"].startswith("pool m_pool: 0 of 2 workers alive")
        pool.stats.closed = True  # gave up: its replacements' init kept failing
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "pool m_pool: gave up" in ready.json()["detail"]
        resp = client.post("/predict", json={"x": 1})
        assert resp.status_code == 503 and "retry-after" not in resp.headers
        assert resp.json()["error"] == "unhealthy"
        assert "closed PinnedPool" in resp.json()["detail"] and "m_pool" in resp.json()["detail"]
        pool.stats = FakePoolStats()  # healthy again
        assert client.get("/readyz").status_code == 200

"""The FastAPI integration against a real server (uvicorn on localhost) and a real client (httpx)."""

from __future__ import annotations

import json
import socket
import threading
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
from fastinfer.integrations.fastapi import FastInferService, run_server  # noqa: E402


class Body(BaseModel):
    x: int
    timeout: float | None = None


class Gate:
    """A batch function that records what reached it and blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen: list[int] = []

    def __call__(self, items: list[int]) -> list[Any]:
        self.seen.extend(items)
        if not self.release.wait(20):
            raise RuntimeError("gate never released")
        return [
            fastinfer.WorkerCrashed("worker 0 died (SIGKILL)") if i == 13 else i * 2 for i in items
        ]


def make_app(
    fn: Callable[[list[int]], list[Any]],
    setup_gate: threading.Event | None = None,
    svc_kw: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[FastAPI, FastInferService]:
    svc = FastInferService(retry_after_seconds=2.0, **(svc_kw or {}))

    @svc.setup
    def build(svc: FastInferService) -> None:
        with svc.phase("load"):
            if setup_gate is not None:
                assert setup_gate.wait(20)
        opts = {"max_batch_size": 4, "max_wait_ms": 1.0, **kw}
        svc.state.batcher = svc.manage(
            fastinfer.DynamicBatcher(fn, **opts, **svc.batcher_hooks()), name="model"
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: Body, request: Request) -> dict[str, int]:
        if body.x < 0:
            raise fastinfer.InvalidInput(f"x must be >= 0, got {body.x}")
        if body.x == 666:
            raise RuntimeError("secret internal detail")
        return {"y": await svc.submit(svc.state.batcher, body.x, request, timeout=body.timeout)}

    return app, svc


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


def test_readiness_waits_for_setup_and_requests_get_503_until_then() -> None:
    setup_gate = threading.Event()
    app, _ = make_app(lambda xs: [x * 2 for x in xs], setup_gate=setup_gate)
    with run_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["phase"] == "load"
        r = client.post("/predict", json={"x": 1})
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        assert r.json()["error"] == "not_ready"
        setup_gate.set()
        until(lambda: client.get("/readyz").status_code == 200, "readiness")
        assert "load" in client.get("/readyz").json()["phases"]
        assert client.post("/predict", json={"x": 21}).json() == {"y": 42}


def test_error_mapping_503_504_422_500(gate: Gate) -> None:
    # each error's own mapping: no shedding at the door after the QueueFull (tests/test_faults_http.py)
    app, svc = make_app(gate, svc_kw={"shed_at_door": False}, max_queue_size=1, max_batch_size=1)
    with run_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        until(lambda: svc.ready, "setup")
        stats = lambda: svc.state.batcher.statistics()  # noqa: E731
        results: dict[str, Any] = {}

        def send(name: str, body: dict[str, Any]) -> None:
            results[name] = client.post("/predict", json=body)

        first = threading.Thread(target=send, args=("running", {"x": 13}))
        first.start()
        until(lambda: stats().batches_in_flight == 1, "first batch running")
        second = threading.Thread(target=send, args=("queued", {"x": 2}))
        second.start()
        until(lambda: stats().queue_depth == 1, "second request queued")

        full = client.post("/predict", json={"x": 3})  # queue limit 1: rejected at once
        assert full.status_code == 503 and full.json()["error"] == "queue_full"
        assert int(full.headers["Retry-After"]) >= 1

        invalid = client.post("/predict", json={"x": -1})
        assert invalid.status_code == 422 and "x must be >= 0, got -1" in invalid.json()["detail"]
        schema = client.post("/predict", json={"x": "not a number"})
        assert schema.status_code == 422 and schema.json()["detail"].startswith("x:")

        internal = client.post("/predict", json={"x": 666})
        assert internal.status_code == 500 and "secret" not in internal.text
        assert "Traceback" not in internal.text

        gate.release.set()
        first.join()
        second.join()
        assert results["running"].status_code == 503  # WorkerCrashed for item 13
        assert results["running"].json()["error"] == "worker_crashed"
        assert results["queued"].json() == {"y": 4}

    gate2 = Gate()
    app, svc = make_app(gate2, max_batch_size=1)
    try:
        with run_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
            until(lambda: svc.ready, "setup")
            blocker = threading.Thread(target=lambda: client.post("/predict", json={"x": 1}))
            blocker.start()
            until(lambda: svc.state.batcher.statistics().batches_in_flight == 1, "busy")
            late = client.post("/predict", json={"x": 2, "timeout": 0.05})
            assert late.status_code == 504 and late.json()["error"] == "deadline_exceeded"
            gate2.release.set()
            blocker.join()
    finally:
        gate2.release.set()


def _raw_post(url: str, body: dict[str, Any]) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_client_disconnect_cancels_the_queued_request(gate: Gate) -> None:
    app, svc = make_app(gate, max_batch_size=1)
    with run_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        until(lambda: svc.ready, "setup")
        stats = lambda: svc.state.batcher.statistics()  # noqa: E731
        first = threading.Thread(target=lambda: client.post("/predict", json={"x": 1}))
        first.start()
        until(lambda: stats().batches_in_flight == 1, "first batch running")
        leaver = _raw_post(url, {"x": 99})
        until(lambda: stats().queue_depth == 1, "second request queued")
        leaver.close()  # the client goes away
        until(lambda: stats().requests_cancelled == 1, "cancellation")
        assert stats().queue_depth == 0
        gate.release.set()
        first.join()
        assert client.post("/predict", json={"x": 5}).json() == {"y": 10}
    assert 99 not in gate.seen  # it never reached the model
    assert gate.seen == [1, 5]


def test_metrics_endpoint_exposes_standard_metrics() -> None:
    app, svc = make_app(lambda xs: [x * 2 for x in xs])
    with run_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        until(lambda: svc.ready, "setup")
        for i in range(6):
            assert client.post("/predict", json={"x": i}).status_code == 200
        client.post("/predict", json={"x": -5})
        resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(resp.text)
        for s in fam.samples
    }
    assert samples[("fastinfer_requests_total", (("outcome", "ok"),))] == 6
    assert samples[("fastinfer_batch_size_count", ())] >= 1
    assert samples[("fastinfer_batch_size_sum", ())] == 6
    assert samples[("fastinfer_request_latency_seconds_count", ())] == 6
    assert samples[("fastinfer_queue_wait_seconds_count", ())] == 6
    http = {k: v for k, v in samples.items() if k[0] == "fastinfer_http_request_seconds_count"}
    assert (
        http[("fastinfer_http_request_seconds_count", (("route", "/predict"), ("status", "2xx")))]
        == 6
    )
    assert (
        http[("fastinfer_http_request_seconds_count", (("route", "/predict"), ("status", "4xx")))]
        == 1
    )
    assert any(name == "fastinfer_startup_phase_seconds_count" for name, _ in samples)


def test_shutdown_drains_queued_requests_and_closes_the_batcher(gate: Gate) -> None:
    app, svc = make_app(gate, max_batch_size=1)
    answers: list[int] = []
    with run_server(app) as url:
        until(lambda: svc.ready, "setup")
        batcher = svc.state.batcher
        client = httpx.Client(base_url=url, timeout=30)
        threads = [
            threading.Thread(
                target=lambda i=i: answers.append(
                    client.post("/predict", json={"x": i}).status_code
                )
            )
            for i in range(3)
        ]
        for t in threads:
            t.start()
        until(lambda: batcher.statistics().requests_submitted == 3, "three submitted")
        # Leave the block (the server begins its graceful shutdown) with work still queued; the
        # gate opens from another thread, and every request must still get its answer.
        threading.Timer(0.2, gate.release.set).start()
    for t in threads:
        t.join()
    client.close()
    assert answers == [200, 200, 200]
    assert batcher.statistics().closed and sorted(gate.seen) == [0, 1, 2]


@pytest.mark.parametrize("freeze", [True, False])
def test_setup_freezes_the_gc_until_shutdown_when_asked(freeze: bool) -> None:
    import gc

    assert gc.get_freeze_count() == 0
    svc = FastInferService(freeze_gc=freeze)
    svc.setup(lambda svc: None)
    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)
    with run_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        until(lambda: svc.ready, "setup")
        phases = client.get("/readyz").json()["phases"]
        # the startup objects (torch, the app, the model) sit outside full collections
        assert (gc.get_freeze_count() > 10_000) is freeze
        assert ("gc freeze" in phases) is freeze
    assert gc.get_freeze_count() == 0


def test_a_second_stage_is_managed_outside_the_standard_metrics() -> None:
    # A batcher feeding a second stage (another batcher, a PinnedPool) both have a queue depth.
    def batcher() -> fastinfer.DynamicBatcher:
        return fastinfer.DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=1)

    svc = FastInferService(recorder=fastinfer.MetricsRecorder())
    first = svc.manage(batcher(), name="front")
    second = batcher()
    with pytest.raises(fastinfer.ConfigError, match="standard=False"):
        svc.manage(second, name="stage2")
    assert [n for n, _ in svc._managed] == ["front"]  # a refused object is not half-managed
    svc.manage(second, name="stage2", standard=False)
    assert [n for n, _ in svc._managed] == ["front", "stage2"]
    families = {f.name: f for f in text_string_to_metric_families(svc.metrics_text().decode())}
    assert [s.labels for s in families["fastinfer_queue_depth"].samples] == [{}]  # the front's
    assert "fastinfer_stage2_queue_depth" in families
    first.close()
    second.close()

"""How a FastInferService is wired into an app, tested against a real server (uvicorn on
127.0.0.1, ports 19000-19999) and real clients (httpx, websockets).

Each test reproduces one fault an outside probe found and asserts the fix:

- a second lifespan of one app (two tests, each `with TestClient(app)`) never became ready; an
  object managed outside the setup function failed it with a bare "closed DynamicBatcher";
- under ``--root-path`` or mounted, ``/healthz``, ``/readyz``, ``/metrics`` were shed at the door
  and counted as app traffic;
- a mounted app's lifespan never runs: the service said "retry shortly" forever, logged nothing;
- ``svc.submit`` in a ``BackgroundTasks`` job was cancelled as a disconnect; with a WebSocket it
  took the client's messages;
- a numpy result answered 500; two models could not both have standard metrics;
- ``svc.submit`` while not ready left a never-awaited coroutine;
- several server processes each pinned a pool to the same cores, silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.serve
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from conftest import ROOT, run_python, until  # noqa: E402
from fastapi import BackgroundTasks, FastAPI, Request, WebSocket  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import fastinfer  # noqa: E402
from fastinfer.errors import ConfigError, NotReady  # noqa: E402
from fastinfer.integrations.fastapi import FastInferService  # noqa: E402


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """``app`` under uvicorn in a thread on 127.0.0.1 (a free port in 19000-19999); stopped,
    and checked stopped, on exit."""
    for _ in range(100):
        port = random.randint(19000, 19999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        break
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config)
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    until(lambda: server.started or not thread.is_alive(), "uvicorn to start", 60)
    assert server.started, "uvicorn did not start (see its log)"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "uvicorn did not stop"


def double(xs: list[int]) -> list[int]:
    return [x * 2 for x in xs]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def ready(client: Any, prefix: str = "") -> None:
    until(lambda: client.get(prefix + "/readyz").status_code == 200, "readiness")


def model_app(
    fn: Any = double, svc: FastInferService | None = None, max_batch_size: int = 4, **svc_kw: Any
) -> tuple[FastAPI, FastInferService]:
    svc = svc or FastInferService(**svc_kw)

    @svc.setup
    def build(svc: FastInferService) -> None:
        batcher = fastinfer.DynamicBatcher(
            fn, max_batch_size=max_batch_size, max_wait_ms=1, **svc.batcher_hooks()
        )
        svc.state.batcher = svc.manage(batcher, name="model")

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: dict[str, int], request: Request) -> dict[str, int]:
        return {"y": await svc.submit(svc.state.batcher, body["x"], request)}

    return app, svc


# -------------------------------------------------------------------------------- lifespans


def test_a_second_lifespan_starts_the_service_afresh() -> None:
    app, svc = model_app()
    svc.state.greeting = "set at import"  # before the first lifespan: kept
    batchers = []
    for _ in range(2):  # two tests on one module-level app, each with its own server
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            ready(client)
            assert client.post("/predict", json={"x": 21}).json() == {"y": 42}
            batchers.append(svc.state.batcher)
            ok = samples(client.get("/metrics").text)[
                ("fastinfer_requests_total", (("outcome", "ok"),))
            ]
            assert ok == 1  # the new batcher's count: the closed one is no longer read
            assert svc.state.greeting == "set at import"
            assert svc.door is not None and svc.door.limit is None  # sized again by each setup
            svc.door.limit = 100  # as svc.admission would
    assert batchers[0] is not batchers[1]  # the setup ran again
    assert all(b.closed for b in batchers)


def test_an_object_managed_outside_setup_fails_a_second_lifespan_naming_it() -> None:
    # the examples/sync_endpoint.py shape: a batcher made at import, managed outside setup
    batcher = fastinfer.DynamicBatcher(double, max_batch_size=4, max_wait_ms=1, own_loop=True)
    svc = FastInferService()
    svc.manage(batcher, name="rows")
    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    def predict(body: dict[str, int]) -> dict[str, int]:
        return {"y": batcher.submit_sync(body["x"], timeout=10)}

    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ready(client)
        assert client.post("/predict", json={"x": 2}).json() == {"y": 4}
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        until(lambda: client.get("/readyz").json()["phase"] == "failed", "setup to fail")
        body = client.get("/readyz").json()
        assert body["error"] == "setup_failed"
        assert "'rows'" in body["detail"] and "setup function" in body["detail"]
        r = client.post("/predict", json={"x": 2})
        assert r.status_code == 503 and r.json()["error"] == "setup_failed"
        assert "setup function" in r.json()["detail"] and "Retry-After" not in r.headers

    svc.background_setup = False  # then the lifespan itself raises it: `with TestClient(app)`

    async def lifespan() -> None:
        async with svc.lifespan(app):
            pass

    with pytest.raises(ConfigError, match=r"'rows'.*create it in the setup function"):
        asyncio.run(lifespan())


def test_a_setup_abandoned_at_shutdown_does_not_join_the_next_lifespan() -> None:
    release, done = threading.Event(), threading.Event()
    outcomes: list[str] = []
    svc = FastInferService()
    svc.setup_grace_seconds = 0.05

    @svc.setup
    def build(svc: FastInferService) -> None:
        first = not outcomes
        outcomes.append("started")
        try:
            if first:  # the first lifespan's setup: still loading when its lifespan ends
                assert release.wait(20)
            batcher = fastinfer.DynamicBatcher(double, max_batch_size=4, max_wait_ms=1)
            svc.state.batcher = svc.manage(batcher, name="model", standard=False)
            outcomes.append("managed")
        except BaseException as exc:
            outcomes.append(type(exc).__name__)
            raise
        finally:
            if first:
                done.set()

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: dict[str, int], request: Request) -> dict[str, int]:
        return {"y": await svc.submit(svc.state.batcher, body["x"], request)}

    async def short_lifespan() -> None:
        async with svc.lifespan(app):
            while outcomes != ["started"]:  # the first setup is under way
                await asyncio.sleep(0.005)

    asyncio.run(short_lifespan())  # ends while its setup waits: the setup is abandoned
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ready(client)
        current = svc.state.batcher
        release.set()  # the abandoned setup goes on: its manage() must not join this lifespan
        assert done.wait(10)
        assert outcomes[-1] == "SetupCancelled"
        assert [n for n, _ in svc._managed] == ["model"] and svc.state.batcher is current
        assert client.post("/predict", json={"x": 4}).json() == {"y": 8}


# -------------------------------------------------------------------------------- prefixes


class Gate:
    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, xs: list[int]) -> list[int]:
        assert self.release.wait(20)
        return double(xs)


@pytest.mark.parametrize("how", ["root_path", "mount"])
def test_probes_are_never_shed_nor_counted_under_a_prefix(how: str) -> None:
    gate = Gate()
    inner, svc = model_app(gate)
    if how == "mount":
        outer = FastAPI(lifespan=svc.lifespan)
        outer.mount("/v1", inner)
        app, prefix, config = outer, "/v1", {}
    else:
        app, prefix, config = inner, "", {"root_path": "/api"}
    try:
        with serve(app, **config) as url, httpx.Client(base_url=url, timeout=20) as client:
            ready(client, prefix)
            assert svc.door is not None
            svc.door.limit = 1  # the admission limit: one request past the door at a time
            held = threading.Thread(
                target=client.post, args=(prefix + "/predict",), kwargs={"json": {"x": 1}}
            )
            held.start()
            until(lambda: svc.door.in_flight == 1, "a request past the door")
            shed = client.post(prefix + "/predict", json={"x": 2})
            assert shed.status_code == 503 and shed.json()["error"] == "queue_full"
            for path in ("/readyz", "/healthz", "/metrics"):  # the service's own: never shed
                assert client.get(prefix + path).status_code == 200, path
            gate.release.set()
            held.join()
            routes = {
                dict(labels).get("route")
                for name, labels in samples(client.get(prefix + "/metrics").text)
                if name == "fastinfer_http_request_seconds_count"
            }
        assert "/predict" in routes
        assert not routes & {"/readyz", "/healthz", "/metrics"}
    finally:
        gate.release.set()


def test_a_mounted_app_whose_lifespan_never_runs_says_how_to_fix_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner, _ = model_app()
    outer = FastAPI()  # no lifespan=svc.lifespan: Starlette does not run a mounted app's
    outer.mount("/v1", inner)
    caplog.set_level(logging.WARNING, logger="fastinfer.integrations.fastapi")
    with serve(outer) as url, httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(3):
            body = client.get("/v1/readyz").json()
            r = client.post("/v1/predict", json={"x": 1})
    assert body["error"] == "not_ready" and body["phase"] == "not started"
    for detail in (body["detail"], r.json()["detail"]):
        assert "lifespan never ran" in detail and "lifespan=svc.lifespan" in detail
        assert "mounted" in detail and "retry" not in detail
    assert r.status_code == 503 and "Retry-After" not in r.headers  # retrying cannot help
    said = [rec for rec in caplog.records if "lifespan never ran" in rec.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING  # once, not per request


def test_a_test_client_without_the_lifespan_is_told_and_can_run_it() -> None:
    app, svc = model_app(background_setup=False)

    async def main() -> tuple[Any, Any]:
        transport = httpx.ASGITransport(app=app)  # runs no lifespan
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            before = await client.post("/predict", json={"x": 1})
            async with svc.lifespan(app):  # background_setup=False: ready when entered
                after = await client.post("/predict", json={"x": 1})
        return before, after

    before, after = asyncio.run(main())
    assert before.status_code == 503 and "async with svc.lifespan(app)" in before.json()["detail"]
    assert after.status_code == 200 and after.json() == {"y": 2}


# -------------------------------------------------------------------------------- submit


def test_submit_in_a_background_task_runs_after_the_response() -> None:
    app, svc = model_app()
    out: list[Any] = []

    @app.post("/enqueue")
    async def enqueue(body: dict[str, int], request: Request, tasks: BackgroundTasks) -> Any:
        async def job() -> None:
            try:
                out.append(await svc.submit(svc.state.batcher, body["x"], request))
            except Exception as exc:
                out.append(repr(exc))

        tasks.add_task(job)
        return {"accepted": True}

    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ready(client)  # a keep-alive connection: the server reports a disconnect anyway
        assert client.post("/enqueue", json={"x": 21}).json() == {"accepted": True}
        until(lambda: bool(out), "the background job")
        assert out == [42]
        assert svc.state.batcher.statistics().requests_ok == 1


def test_submit_with_a_websocket_takes_none_of_its_messages() -> None:
    wsc = pytest.importorskip("websockets.sync.client")
    gate = Gate()
    app, svc = model_app(gate, max_batch_size=1)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            n = await websocket.receive_json()
            await websocket.send_json(await svc.submit(svc.state.batcher, n, websocket))

    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            ready(client)
            with wsc.connect(url.replace("http", "ws") + "/ws") as conn:
                for n in (1, 2, 3):  # sent while the first waits in the batcher
                    conn.send(json.dumps(n))
                until(lambda: svc.state.batcher.statistics().batches_in_flight == 1, "busy")
                gate.release.set()
                got = [json.loads(conn.recv(timeout=10)) for _ in range(3)]
        assert got == [2, 4, 6]
    finally:
        gate.release.set()


def test_submit_while_not_ready_leaves_no_coroutine_unawaited() -> None:
    svc = FastInferService()  # its lifespan never ran
    batcher = fastinfer.DynamicBatcher(double, max_batch_size=4, max_wait_ms=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NotReady, match="lifespan never ran"):
            asyncio.run(svc.submit(batcher, 1, None))
        with pytest.raises(NotReady):
            asyncio.run(svc.run(None, batcher.submit(1)))
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    batcher.close()


# -------------------------------------------------------------------------------- responses


def test_a_numpy_result_is_its_values() -> None:
    np = pytest.importorskip("numpy")
    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        batcher = fastinfer.DynamicBatcher(
            lambda xs: np.asarray(xs, dtype=np.float32) * 2, max_batch_size=4, max_wait_ms=1
        )
        svc.state.batcher = svc.manage(batcher, name="model")

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: dict[str, list[float]], request: Request):  # type: ignore[no-untyped-def]
        y = await svc.submit(svc.state.batcher, body["x"], request)  # a float32 array
        return {"y": y, "sum": y.sum(), "n": np.int64(len(y)), "ok": np.bool_(True),
                "zero_d": np.array(1.5)}  # fmt: skip

    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ready(client)
        r = client.post("/predict", json={"x": [1.0, 2.5]})
    assert r.status_code == 200, r.text
    assert r.json() == {"y": [2.0, 5.0], "sum": 7.0, "n": 2, "ok": True, "zero_d": 1.5}
    # numpy is imported where a response may hold it, not by `import fastinfer`
    run_python(
        "import sys, fastinfer, fastinfer.integrations.fastapi\n"
        "assert 'numpy' not in sys.modules, 'imported numpy'"
    )


# -------------------------------------------------------------------------------- two models


def test_two_models_each_with_labels_get_the_standard_metrics() -> None:
    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        for name, fn in (("a", double), ("b", lambda xs: [x + 1 for x in xs])):
            labels = {"model": name}
            batcher = fastinfer.DynamicBatcher(
                fn, max_batch_size=4, max_wait_ms=1, **svc.batcher_hooks(labels=labels)
            )
            setattr(svc.state, name, svc.manage(batcher, name=name, labels=labels))

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/{model}")
    async def predict(model: str, body: dict[str, int], request: Request) -> dict[str, int]:
        return {"y": await svc.submit(getattr(svc.state, model), body["x"], request)}

    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ready(client)
        assert [client.post("/a", json={"x": 3}).json()["y"] for _ in range(2)] == [6, 6]
        assert client.post("/b", json={"x": 3}).json() == {"y": 4}
        got = samples(client.get("/metrics").text)
    for model, n in (("a", 2), ("b", 1)):
        assert got[("fastinfer_requests_total", (("model", model), ("outcome", "ok")))] == n
        assert got[("fastinfer_request_latency_seconds_count", (("model", model),))] == n
        assert got[("fastinfer_batch_size_sum", (("model", model),))] == n
        assert got[("fastinfer_queue_depth", (("model", model),))] == 0


def test_a_second_unlabelled_model_is_refused_with_fixes_that_work() -> None:
    def batcher(svc: FastInferService, **labels: Any) -> fastinfer.DynamicBatcher:
        hooks = svc.batcher_hooks(labels=labels or None)
        return fastinfer.DynamicBatcher(double, max_batch_size=4, max_wait_ms=1, **hooks)

    svc = FastInferService()
    svc.manage(batcher(svc), name="a")
    with pytest.raises(ConfigError) as refused:
        svc.manage(batcher(svc), name="b")
    hint = str(refused.value)
    assert "labels={'model': 'b'}" in hint and "batcher_hooks(labels=" in hint
    assert "standard=False" in hint
    svc.manage(batcher(svc), name="b", standard=False)  # a fix that exists: its own metrics
    with pytest.raises(ConfigError, match="same label names"):  # labelled after unlabelled
        svc.batcher_hooks(labels={"model": "c"})

    svc = FastInferService()  # the other fix: every model labelled
    svc.manage(batcher(svc, model="a"), name="a", labels={"model": "a"})
    svc.manage(batcher(svc, model="b"), name="b", labels={"model": "b"})
    with pytest.raises(ConfigError, match="have labels"):
        svc.batcher_hooks()
    for _, obj in svc._managed:
        obj.close()


# -------------------------------------------------------------------------------- several processes


HOLD = """
import sys
from fastinfer.pool._claims import CpuClaim
claim = CpuClaim([int(c) for c in sys.argv[2].split(",")], directory=sys.argv[1])
print("claimed", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def claim_in_another_process(directory: Path, cpus: list[int]) -> Iterator[int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", HOLD, str(directory), ",".join(map(str, cpus))]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(30)


def test_a_cpu_claim_sees_the_live_claims_of_other_processes(tmp_path: Path) -> None:
    from fastinfer.pool._claims import CpuClaim

    with claim_in_another_process(tmp_path, [0, 1]) as pid:
        claim = CpuClaim([1, 2], directory=str(tmp_path))
        assert claim.others == {pid: [1]}
        warning = claim.warning()
        assert warning is not None and f"pid {pid}: cpu1" in warning
        assert "one server process per machine" in warning
        again = CpuClaim([1], directory=str(tmp_path))  # this process's own: never reported
        assert again.others == {pid: [1]}
        claim.release()
        again.release()
        assert sorted(os.listdir(tmp_path)) == [f"cpu0.{pid}", f"cpu1.{pid}"]
    (tmp_path / "cpu3.999999999").write_text("1")  # a pid that does not exist
    after = CpuClaim([0, 1, 3], directory=str(tmp_path))
    assert after.others == {} and after.warning() is None  # the dead process's files: ignored
    after.release()
    assert os.listdir(tmp_path) == []  # and removed


def test_a_pinned_pool_says_when_another_process_pinned_its_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import _pool_helpers as h

    from fastinfer.pool import _claims

    monkeypatch.setattr(_claims, "claims_dir", lambda: str(tmp_path))
    cpus = list(fastinfer.CorePlan.detect().cpus)
    caplog.set_level(logging.WARNING, logger="fastinfer.pool")
    with claim_in_another_process(tmp_path, cpus) as pid:
        pool = fastinfer.PinnedPool(h.init_model, h.predict, workers=1, load_warning_threshold=None)
        try:
            assert pool.cpus_shared_warning is not None
            assert f"pid {pid}" in pool.cpus_shared_warning
            assert pool.cpus_shared_warning in pool.statistics().notes
            assert any(f"pid {pid}" in r.getMessage() for r in caplog.records)
            assert any(name.endswith(f".{os.getpid()}") for name in os.listdir(tmp_path))
        finally:
            pool.close()
        assert not any(name.endswith(f".{os.getpid()}") for name in os.listdir(tmp_path))


def test_a_closed_object_managed_in_setup_is_refused_naming_the_fix() -> None:
    # a batcher made at import, managed inside the setup: closed by the first lifespan's end
    batcher = fastinfer.DynamicBatcher(double, max_batch_size=4, max_wait_ms=1, own_loop=True)
    svc = FastInferService(background_setup=False)

    @svc.setup
    def build(svc: FastInferService) -> None:
        svc.state.batcher = svc.manage(batcher, name="glob")

    app = FastAPI(lifespan=svc.lifespan)

    async def lifespan() -> None:
        async with svc.lifespan(app):
            assert await batcher.submit(2) == 4

    asyncio.run(lifespan())
    assert batcher.closed
    with pytest.raises(ConfigError, match=r"manage\('glob'\).*closed already.*setup function"):
        asyncio.run(lifespan())

"""Faults of the served composition (``svc.serve_model``) found by an outside tester, against a
real server on localhost. Each test reproduces one fault and asserts the fix:

- permanent failures were answered as retryable: the request that bisection isolated as the one
  that kills its worker got 503 ``worker_crashed`` with ``Retry-After: 1`` (a good client resent
  it and crashed a worker at every try), and so did every request after the pool gave up; the
  detail carried the worker's traceback; after ``init()`` raised, model routes said only
  ``"worker 0's init() or its warm-up call raised:"``, the cause cut off;
- ``serve_model`` said ready although ``fn``'s output on the example batch cannot be split per
  item (every request then failed 500);
- in the server process (``workers=0``) one hanging call blocked every later request forever and
  ``/readyz`` stayed 200;
- the standard worker metrics the Grafana dashboard plots were absent or stuck at 0 while the
  pool's workers crashed;
- a request shed at the door before any request to its route had finished was labelled
  ``route="unmatched"``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.serve
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import torch  # noqa: E402
from conftest import until  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import fastinfer  # noqa: E402
from fastinfer.errors import BatchError, ConfigError, WorkerStartupError  # noqa: E402
from fastinfer.integrations._lifecycle import not_ready_detail  # noqa: E402
from fastinfer.integrations._model import auto_call_timeout  # noqa: E402
from fastinfer.integrations.fastapi import FastInferService, run_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- models (importable by workers)


def init_state() -> dict[str, int]:
    return {"offset": 100}


def init_unless(flag: str) -> dict[str, int]:
    """Builds the model until ``flag`` exists: then every (replacement) worker's init fails."""
    if os.path.exists(flag):
        raise RuntimeError(f"the checkpoint is gone: {flag}")
    return init_state()


def init_fails() -> None:
    raise RuntimeError("the checkpoint is missing: /nowhere.pt")


def add_or_crash(state: dict[str, int], batch: list[int]) -> list[int]:
    if 13 in batch:
        os._exit(3)  # the worker dies on this input (a segfault, an OOM kill)
    return [x + state["offset"] for x in batch]


def rows_plus_one(state: Any, batch: list[int]) -> Any:
    return torch.zeros(len(batch) + 1, 3)  # one row too many: cannot be split per item


def returns_none(state: Any, batch: list[int]) -> Any:
    return None


RELEASE = threading.Event()  # lets the calls add_or_hang holds return


def add_or_hang(state: dict[str, int], batch: list[int]) -> list[int]:
    if 99 in batch:
        RELEASE.wait(120)  # a call that does not return (a deadlock, a stuck driver)
    return [x + state["offset"] for x in batch]


class Body(BaseModel):
    x: int


def make_app(init: Any, fn: Any, **kw: Any) -> tuple[FastAPI, FastInferService]:
    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        svc.state.batcher = svc.serve_model(
            init, fn, [1, 2, 3, 4], **{"latency_target_ms": 500, "max_wait_ms": 1, **kw}
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: Body, request: Request) -> Any:
        return {"y": await svc.submit(svc.state.batcher, body.x, request)}

    return app, svc


def wait_ready(url: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/readyz", timeout=10)
        if r.status_code == 200 or r.json().get("error") == "setup_failed":
            return dict(r.json())
        time.sleep(0.05)
    raise AssertionError("the service did not become ready")


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def post_all(url: str, xs: list[int]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/predict", json={"x": x}) for x in xs))


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


# ------------------------------------------------------- 1. permanent failures are not retryable


def test_the_request_that_crashes_its_worker_alone_gets_500_and_is_not_resent() -> None:
    """Was 503 ``worker_crashed`` + ``Retry-After: 1``: the docs' good client resent it 10 times,
    crashing a worker each time. Also: the standard worker metrics follow the pool (4)."""
    app, svc = make_app(init_state, add_or_crash, workers=1)
    with run_server(app) as url:
        wait_ready(url)
        answers = asyncio.run(post_all(url, [1, 2, 13, 3]))
        assert [a.status_code for a in answers] == [200, 200, 500, 200]
        crashed = answers[2]
        assert "retry-after" not in crashed.headers
        assert crashed.json()["error"] == "worker_crashed"
        assert "ran alone in that call" in crashed.json()["detail"]
        assert [a.json()["y"] for a in answers if a.status_code == 200] == [101, 102, 103]

        # the good client of examples/text_classification_service.py retries only a 503
        resent = 0
        answer = httpx.post(f"{url}/predict", json={"x": 13}, timeout=60)
        while answer.status_code == 503 and resent < 10:
            resent += 1
            answer = httpx.post(f"{url}/predict", json={"x": 13}, timeout=60)
        assert answer.status_code == 500 and resent == 0

        pool = svc._managed[0][1]
        until(lambda: pool.statistics().workers_alive == 1, "the worker replaced", 60)
        restarts = pool.statistics().worker_restarts_total
        assert restarts >= 2  # at least one crash per request of 13
        got = samples(url)
        assert got[("fastinfer_worker_restarts_total", ())] == restarts
        assert got[("fastinfer_workers_alive", ())] == 1
        assert ("fastinfer_worker_busy_ratio", (("worker", "0"),)) in got
        assert got[("fastinfer_model_pool_worker_restarts_total", ())] == restarts  # kept

    # every worker metric the shipped dashboard plots is one the service exports
    dash = (ROOT / "docs" / "grafana-dashboard.json").read_text()
    plotted = set(re.findall(r"fastinfer_worker\w*", dash))
    assert plotted == {
        "fastinfer_workers_alive",
        "fastinfer_worker_restarts_total",
        "fastinfer_worker_busy_ratio",
    }
    assert all(any(name == n for n, _ in got) for name in plotted)


def test_after_the_pool_gave_up_requests_get_503_unhealthy_without_retry_after(
    tmp_path: Path,
) -> None:
    """Was 503 ``worker_crashed`` + ``Retry-After: 1`` with the worker's traceback in the
    detail, though the pool runs no more calls."""
    flag = tmp_path / "FAIL_INIT"
    app, _ = make_app(functools.partial(init_unless, str(flag)), add_or_crash, workers=1)
    with run_server(app) as url:
        wait_ready(url)
        flag.touch()  # from now on every replacement worker's init raises
        crashed = httpx.post(f"{url}/predict", json={"x": 13}, timeout=60)
        assert crashed.status_code == 500 and "retry-after" not in crashed.headers
        deadline = time.monotonic() + 120
        while "gave up" not in (ready := httpx.get(f"{url}/readyz", timeout=10)).text:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.1)
        assert ready.status_code == 503 and ready.json()["error"] == "unhealthy"
        no_traceback(ready.json()["detail"])
        assert "the checkpoint is gone" in ready.json()["detail"]
        after = httpx.post(f"{url}/predict", json={"x": 1}, timeout=60)
        assert after.status_code == 503 and "retry-after" not in after.headers
        body = after.json()
        assert body["error"] == "unhealthy" and "model_pool" in body["detail"]
        assert "gave up" in body["detail"] and "the checkpoint is gone" in body["detail"]
        no_traceback(after.text)


def test_after_init_raised_model_routes_name_the_cause_without_its_traceback() -> None:
    """Was ``setup failed (WorkerStartupError: worker 0's init() or its warm-up call raised:)``:
    the first line of a message whose cause is on its last line."""
    app, _ = make_app(init_fails, add_or_crash, workers=1)
    with run_server(app) as url:
        ready = wait_ready(url)
        assert ready["error"] == "setup_failed"
        assert "the checkpoint is missing: /nowhere.pt" in ready["detail"]
        no_traceback(ready["detail"])
        answer = httpx.post(f"{url}/predict", json={"x": 1}, timeout=30)
        assert answer.status_code == 503 and "retry-after" not in answer.headers
        assert answer.json()["error"] == "setup_failed"
        assert "RuntimeError: the checkpoint is missing: /nowhere.pt" in answer.json()["detail"]
        no_traceback(answer.text)


@pytest.mark.parametrize(
    "message",
    [
        "worker 0's init() or its warm-up call raised:\nTraceback (most recent call last):\n"
        '  File "/srv/models.py", line 127, in init\n    raise RuntimeError("no /nope.pt")\n'
        "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\nRuntimeError: no /nope.pt\n",
        "worker 0's init() raised RuntimeError: no /nope.pt\n\nThe worker's traceback:\n"
        'Traceback (most recent call last):\n  File "/srv/models.py", line 127, in init\n'
        "RuntimeError: no /nope.pt\n",
    ],
    ids=["cause-after-traceback", "cause-first"],
)
def test_the_setup_failure_detail_names_the_cause_in_one_line(message: str) -> None:
    detail = not_ready_detail(WorkerStartupError(message), False, "failed")
    assert "RuntimeError: no /nope.pt)" in detail and detail.count("no /nope.pt") == 1
    no_traceback(detail)
    cause = WorkerStartupError("worker 0's init() raised:")
    cause.__cause__ = RuntimeError("no /nope.pt")
    assert "raised: RuntimeError: no /nope.pt)" in not_ready_detail(cause, False, "failed")


# ------------------------------------------------------------ 2. an output that cannot be split


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "workers"])
@pytest.mark.parametrize("fn", [rows_plus_one, returns_none], ids=lambda f: f.__name__)
def test_an_output_that_cannot_be_split_per_item_fails_setup(fn: Any, workers: int) -> None:
    """Was: ready (200), then every request 500 with the batcher's BatchError."""
    svc = FastInferService(background_setup=False)

    @svc.setup
    def build(svc: FastInferService) -> None:
        svc.state.batcher = svc.serve_model(
            init_state, fn, [1, 2, 3, 4], latency_target_ms=500, workers=workers
        )

    app = FastAPI(lifespan=svc.lifespan)

    async def main() -> None:
        with pytest.raises(BatchError, match="cannot be split into one result per item") as info:
            async with svc.lifespan(app):
                pass
        assert "serve_model('model')" in str(info.value)
        assert svc.readiness()["error"] == "setup_failed"
        assert svc._managed == []  # the pool it started was closed

    asyncio.run(main())


SPLIT_CASES = {
    "list": [1, 2, 3, 4],
    "tensor": torch.zeros(4, 2),
    "dict": {"a": torch.zeros(4), "b": [0, 1, 2, 3]},
    "tuple-batched": (torch.zeros(4), torch.ones(4, 2)),
    "tuple-per-item": (1, 2, 3, 4),
    "list-short": [1, 2, 3],
    "tensor-rows+1": torch.zeros(5, 3),
    "scalar-tensor": torch.tensor(1.0),
    "none": None,
    "string": "hello",
    "empty-tuple": (),
    "tuple-mixed": (torch.zeros(3), 1),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_the_split_check_agrees_with_the_batcher(case: str) -> None:
    from fastinfer.integrations._model import check_splittable

    output = SPLIT_CASES[case]

    async def batcher_refuses() -> bool:
        batcher = fastinfer.DynamicBatcher(
            lambda xs: output, max_batch_size=4, max_wait_ms=1000, run_in_thread=False
        )
        async with batcher:
            got = await asyncio.gather(
                *(batcher.submit(i) for i in range(4)), return_exceptions=True
            )
        refused = [isinstance(g, BatchError) for g in got]
        assert len(set(refused)) == 1, got
        return refused[0]

    refused = asyncio.run(batcher_refuses())
    try:
        check_splittable(output, 4, None, "model")
    except BatchError:
        assert refused, f"{case}: the batcher splits it, the check refused it"
    else:
        assert not refused, f"{case}: the batcher refuses it, the check let it pass"


# ---------------------------------------------------------------- 3. a call that hangs in-process


def test_in_process_serving_gives_up_a_hung_call_by_default() -> None:
    """Was no limit: one hung call blocked every later request for good."""
    app, svc = make_app(init_state, add_or_hang, workers=0)
    with run_server(app) as url:
        serving = wait_ready(url)["serving"]["model"]
        assert serving["processes"] == 0
        timeout = auto_call_timeout(500, serving["batch_seconds"])
        assert serving["call_timeout_s"] == timeout
        assert svc.state.batcher._config.batch_timeout == timeout


def test_in_process_hung_calls_answer_504_and_readiness_fails_once_threads_run_out() -> None:
    RELEASE.clear()
    app, svc = make_app(init_state, add_or_hang, workers=0, call_timeout=0.5)
    try:
        with run_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert wait_ready(url)["serving"]["model"]["call_timeout_s"] == 0.5
            stats = svc.state.batcher.statistics
            hung: list[httpx.Response] = []
            first = threading.Thread(
                target=lambda: hung.append(client.post("/predict", json={"x": 99}))
            )
            first.start()
            until(lambda: stats().batches_in_flight == 1, "the hung call running")
            assert client.post("/predict", json={"x": 1}).json() == {"y": 101}  # not blocked
            first.join(30)
            assert hung[0].status_code == 504 and hung[0].json()["error"] == "deadline_exceeded"
            assert "batch_timeout=0.5" in hung[0].json()["detail"]
            assert client.get("/readyz").status_code == 200  # one hung thread: still serving
            limit = max(8, 4 * stats().max_concurrent_batches)
            while stats().abandoned_threads < limit:
                assert client.post("/predict", json={"x": 99}).status_code == 504
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"] == "unhealthy"
            assert f"model: {limit} calls of fn ran past batch_timeout" in ready.json()["detail"]
            RELEASE.set()  # the hung calls return: their threads are gone
            until(lambda: stats().abandoned_threads == 0, "the hung threads returned")
            assert client.get("/readyz").status_code == 200
    finally:
        RELEASE.set()


def test_in_process_call_timeout_and_batch_timeout_together_are_refused() -> None:
    svc = FastInferService()
    with pytest.raises(ConfigError, match="pass one of them"):
        svc.serve_model(
            init_state, add_or_hang, [1, 2], latency_target_ms=500, workers=0,
            call_timeout=2.0, batch_timeout=3.0,
        )  # fmt: skip


# ------------------------------------------------------- 4. worker metrics with several models


def test_several_served_models_each_export_the_standard_worker_metrics_labelled() -> None:
    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        for name in ("a", "b"):
            batcher = svc.serve_model(
                init_state, add_or_crash, [1, 2], latency_target_ms=500, workers=1,
                name=name, labels={"model": name},
            )  # fmt: skip
            setattr(svc.state, name, batcher)

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)
    with run_server(app) as url:
        wait_ready(url)
        got = samples(url)
        for name in ("a", "b"):
            assert got[("fastinfer_workers_alive", (("model", name),))] == 1
            assert got[("fastinfer_worker_restarts_total", (("model", name),))] == 0
            assert ("fastinfer_worker_busy_ratio", (("model", name), ("worker", "0"))) in got


# -------------------------------------------------------- 5. shed before the route was ever seen


def test_a_request_shed_before_its_route_finished_once_is_labelled_with_its_route() -> None:
    gate = threading.Event()

    def model(xs: list[int]) -> list[int]:
        assert gate.wait(30)
        return [x * 2 for x in xs]

    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        batcher = fastinfer.DynamicBatcher(model, max_batch_size=1, max_wait_ms=1)
        svc.state.batcher = svc.manage(batcher, name="model")

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict/{kind}")
    async def predict(kind: str, body: Body, request: Request) -> dict[str, int]:
        return {"y": await svc.submit(svc.state.batcher, body.x, request)}

    try:
        with run_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            until(lambda: svc.ready, "setup", 60)
            assert svc.door is not None
            svc.door.limit = 1  # what svc.admission sets
            held = threading.Thread(target=lambda: client.post("/predict/a", json={"x": 1}))
            held.start()
            until(lambda: svc.state.batcher.statistics().batches_in_flight == 1, "running")
            shed = client.post("/predict/b", json={"x": 2})  # nothing on this route finished
            assert shed.status_code == 503 and shed.json()["error"] == "queue_full"
            assert client.post("/nowhere", json={"x": 3}).status_code == 503
            gate.set()
            held.join(30)
            got = samples(url)
    finally:
        gate.set()
    count = "fastinfer_http_request_seconds_count"
    assert got[(count, (("route", "/predict/{kind}"), ("status", "5xx")))] == 1
    assert got[(count, (("route", "/predict/{kind}"), ("status", "2xx")))] == 1
    assert got[(count, (("route", "unmatched"), ("status", "5xx")))] == 1  # no route: unmatched

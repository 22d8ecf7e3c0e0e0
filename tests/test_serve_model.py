"""``svc.serve_model``: the measured serving path in one call (issue 19), against a real server."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

pytestmark = pytest.mark.serve
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fastapi import FastAPI, Request  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import fastinfer  # noqa: E402
from fastinfer.errors import ConfigError  # noqa: E402
from fastinfer.integrations._admission import fill_batch  # noqa: E402
from fastinfer.integrations._model import auto_call_timeout, choose_workers  # noqa: E402
from fastinfer.integrations.fastapi import FastInferService, run_server  # noqa: E402
from fastinfer.pool import CorePlan  # noqa: E402
from fastinfer.pool._pool import MAX_TIMEOUT  # noqa: E402


def init_offset() -> dict[str, int]:  # in each worker (or here, in-process)
    return {"offset": 100, "pid": os.getpid()}


def add_offset(state: dict[str, int], batch: list[int]) -> list[dict[str, int]]:
    if 13 in batch:
        raise ValueError("13 is unlucky")
    return [{"y": x + state["offset"], "pid": state["pid"]} for x in batch]


def add_or_hang(state: dict[str, int], batch: list[int]) -> list[dict[str, int]]:
    if 99 in batch:
        import time

        time.sleep(3600)  # a model call that never returns (a deadlock, a stuck driver)
    return add_offset(state, batch)


def init_fails() -> None:
    raise RuntimeError("the checkpoint is missing: /nowhere.pt")


def init_must_not_run() -> None:  # a slow init must not run before a bad argument is reported
    raise AssertionError("init ran before the arguments were checked")


def init_slow() -> dict[str, int]:
    import time

    time.sleep(5)
    return init_offset()


def add_slowly(state: dict[str, int], batch: list[int]) -> list[dict[str, int]]:
    import time

    time.sleep(0.2)  # one batch costs 0.2 s
    return add_offset(state, batch)


SEEN: list[int] = []  # the sizes of the batches add_and_count ran (in the server process)


def add_and_count(state: dict[str, int], batch: list[int]) -> list[dict[str, int]]:
    SEEN.append(len(batch))
    return add_offset(state, batch)


class Body(BaseModel):
    x: int


def make_app(init: Any, fn: Any = add_offset, **kw: Any) -> tuple[FastAPI, FastInferService]:
    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        svc.state.batcher = svc.serve_model(
            init, fn, list(range(8)), **{"latency_target_ms": 500, "max_wait_ms": 1, **kw}
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: Body, request: Request) -> Any:
        return await svc.submit(svc.state.batcher, body.x, request)

    return app, svc


async def _post_all(url: str, xs: list[int]) -> list[Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(600):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        return await asyncio.gather(*(client.post("/predict", json={"x": x}) for x in xs))


def _readyz(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/readyz", timeout=10).json())


def test_workers_run_the_model_in_pinned_processes_behind_the_batcher() -> None:
    app, _ = make_app(init_offset, workers=2)
    with run_server(app) as url:
        answers = asyncio.run(_post_all(url, list(range(40))))
        assert [a.status_code for a in answers] == [200] * 13 + [500] + [200] * 26
        ok = [a.json() for a in answers if a.status_code == 200]
        assert [o["y"] for o in ok] == [x + 100 for x in range(40) if x != 13]
        assert {o["pid"] for o in ok} - {os.getpid()}, "the model ran in worker processes"
        assert os.getpid() not in {o["pid"] for o in ok}
        serving = _readyz(url)["serving"]["model"]
        assert serving["processes"] == 2 and "workers=2" in serving["choice"]
        assert "PinnedPool" in serving["reason"]
        admission = _readyz(url)["admission"]["model"]
        assert admission["buffered"] == 2  # each worker holds its next batch ready
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "fastinfer_model_pool_" in metrics and "fastinfer_batch_size_count" in metrics


def test_a_hung_call_is_stopped_its_request_answered_504_and_the_rest_served() -> None:
    """A worker stuck in one batch is killed and replaced after call_timeout; the requests that
    shared the batch are retried apart from the stuck one, and the service keeps serving."""
    app, _ = make_app(init_offset, add_or_hang, workers=2, call_timeout=1.0)
    with run_server(app) as url:
        answers = asyncio.run(_post_all(url, [1, 2, 99, 3, 4]))
        assert [a.status_code for a in answers] == [200, 200, 504, 200, 200]
        assert answers[2].json()["error"] == "worker_timeout"
        assert "timeout of 1s" in answers[2].json()["detail"]
        assert "replaced" in answers[2].json()["detail"]
        after = asyncio.run(_post_all(url, list(range(10))))
        assert [a.json()["y"] for a in after] == [x + 100 for x in range(10)]
        assert _readyz(url)["serving"]["model"]["call_timeout_s"] == 1.0
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "fastinfer_model_pool_worker_restarts_total" in metrics


def test_the_auto_call_timeout_follows_the_target_and_the_measured_cost() -> None:
    assert auto_call_timeout(500, 0.01) == 5.0  # floor
    assert auto_call_timeout(2000, 0.01) == 20.0  # 10x the latency target
    assert auto_call_timeout(500, 1.5) == 75.0  # 50x a full batch
    app, _ = make_app(init_offset, workers=2)
    with run_server(app) as url:
        asyncio.run(_post_all(url, [1]))
        serving = _readyz(url)["serving"]["model"]
        assert serving["call_timeout_s"] == auto_call_timeout(500, serving["batch_seconds"])


@pytest.mark.parametrize("bad", [0, -1, "never", True, float("inf"), 1e12])
def test_bad_call_timeout_names_the_choices(bad: Any) -> None:
    svc = FastInferService()
    with pytest.raises(ConfigError, match=r"call_timeout must be 'auto', None"):
        svc.serve_model(init_offset, add_offset, [1, 2], latency_target_ms=500, call_timeout=bad)


def test_workers_zero_keeps_the_model_in_the_server_process() -> None:
    app, svc = make_app(init_offset, workers=0)
    with run_server(app) as url:
        answers = asyncio.run(_post_all(url, [1, 2, 3]))
        assert [a.json() for a in answers] == [
            {"y": x + 100, "pid": os.getpid()} for x in (1, 2, 3)
        ]
        serving = _readyz(url)["serving"]["model"]
        assert serving["processes"] == 0 and "server process" in serving["choice"]
        assert svc.ready


def test_auto_uses_one_worker_per_physical_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CorePlan, "default_workers", lambda self: 4)
    assert choose_workers(init_offset, add_offset, "auto") == (
        4,
        "auto: 4 physical cores: one pinned single-thread worker process each",
    )
    monkeypatch.setattr(CorePlan, "default_workers", lambda self: 1)
    n, why = choose_workers(init_offset, add_offset, "auto")
    assert n == 0 and "in the server process" in why


def test_auto_with_a_closure_stays_in_process_and_says_how_to_get_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(CorePlan, "default_workers", lambda self: 2)
    offset = 7
    n, why = choose_workers(lambda: {"offset": offset, "pid": 0}, add_offset, "auto")
    assert n == 0 and "cannot be pickled" in why and "module level" in why
    app, _ = make_app(lambda: {"offset": offset, "pid": 0})  # auto
    with run_server(app) as url:
        answers = asyncio.run(_post_all(url, [5]))
        assert answers[0].json() == {"y": 12, "pid": 0}
        assert "cannot be pickled" in _readyz(url)["serving"]["model"]["choice"]


@pytest.mark.parametrize("workers", [-1, 1.5, True, "all"])
def test_bad_workers_value_names_the_choices(workers: Any) -> None:
    with pytest.raises(ConfigError, match="'auto', 0"):
        choose_workers(init_offset, add_offset, workers)


def test_a_worker_whose_init_fails_fails_setup_with_its_error() -> None:
    app, _ = make_app(init_fails, workers=1)
    with run_server(app) as url:
        for _ in range(600):
            body = _readyz(url)
            if body.get("error") == "setup_failed":
                break
            asyncio.run(asyncio.sleep(0.05))
        assert body["error"] == "setup_failed"
        assert "checkpoint is missing" in body["detail"]
        answer = httpx.post(f"{url}/predict", json={"x": 1}, timeout=10)
        assert answer.status_code == 503


def test_batcher_options_reach_the_batcher() -> None:
    async def main() -> None:
        svc = FastInferService()
        batcher = await asyncio.to_thread(
            svc.serve_model, init_offset, add_offset, list(range(4)), latency_target_ms=500,
            workers=0, policy="fixed", max_wait_ms=2,
        )  # fmt: skip
        assert isinstance(batcher, fastinfer.DynamicBatcher)
        assert batcher._config.policy == "fixed" and batcher._config.max_batch_size == 4
        async with batcher:
            assert await batcher.submit(1) == {"y": 101, "pid": os.getpid()}

    asyncio.run(main())


def _setup_error(url: str) -> str:
    for _ in range(1200):
        body = _readyz(url)
        if body.get("error") == "setup_failed":
            return str(body["detail"])
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"setup did not fail: {body}")


# ---- every argument is checked before init runs (and before any worker starts)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"latency_target_ms": 0}, "latency_target_ms must be"),
        ({"latency_target_ms": -5}, "latency_target_ms must be"),
        ({"latency_target_ms": float("nan")}, "latency_target_ms must be"),
        ({"startup_timeoutt": 600}, r"'startup_timeoutt' \(did you mean 'startup_timeout'\?\)"),
        ({"polcy": "fixed"}, r"unknown keyword argument\(s\) 'polcy' \(did you mean 'policy'"),
        ({"policy": "bogus"}, "policy"),
        ({"startup_timeout": 0}, "startup_timeout must be"),
        ({"startup_timeout": "10m"}, "startup_timeout must be"),
        ({"max_batch_size": 0}, "max_batch_size must be"),
        ({"name": "my-model"}, "name must be"),
    ],
    ids=[
        "target0", "target_neg", "target_nan", "typo_startup_timeout", "typo_policy",
        "bad_policy", "startup_timeout0", "startup_timeout_str", "mbs0", "name_dash",
    ],
)  # fmt: skip
@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_argument_is_refused_before_init_runs(
    kw: dict[str, Any], match: str, workers: int
) -> None:
    svc = FastInferService()
    with pytest.raises(ConfigError, match=match):
        svc.serve_model(
            init_must_not_run, add_offset, [1, 2], **{"latency_target_ms": 500, "workers": workers,
            **kw},
        )  # fmt: skip
    assert svc._managed == [], "nothing was started"


@pytest.mark.parametrize(
    ("example", "match"),
    [([], "example_batch is empty"), ((), "example_batch is empty"),
     ({}, "example_batch is empty"), (object(), "example_batch must be a batch"),
     ({"a": [1, 2], "b": [1]}, "example_batch must be a batch")],
    ids=["empty_list", "empty_tuple", "empty_mapping", "opaque", "mapping_disagrees"],
)  # fmt: skip
def test_an_empty_or_uncountable_example_batch_is_refused_by_name(example: Any, match: str) -> None:
    svc = FastInferService()
    with pytest.raises(ConfigError, match=match):
        svc.serve_model(init_must_not_run, add_offset, example, latency_target_ms=500, workers=1)
    assert svc._managed == []


def test_serving_two_models_under_one_name_is_refused_before_init_runs() -> None:
    svc = FastInferService()
    svc.serve_model(init_offset, add_offset, [1, 2], latency_target_ms=500, workers=0, name="m")
    with pytest.raises(ConfigError) as info:
        svc.serve_model(
            init_must_not_run, add_offset, [1, 2], latency_target_ms=500, workers=1, name="m"
        )
    assert str(info.value) == (
        "a model named 'm' is already served by this service; give each serve_model call its "
        "own name="
    )
    assert [n for n, _ in svc._managed] == ["m"]


# ---- the measured figures


def test_a_huge_latency_target_caps_the_call_timeout_at_a_week() -> None:
    assert auto_call_timeout(1e9, 0.01) == MAX_TIMEOUT
    assert auto_call_timeout(1e12, 1e9) == MAX_TIMEOUT
    app, _ = make_app(init_offset, workers=1, latency_target_ms=1e12)
    with run_server(app) as url:
        answers = asyncio.run(_post_all(url, [1, 2]))
        assert [a.status_code for a in answers] == [200, 200]
        assert _readyz(url)["serving"]["model"]["call_timeout_s"] == MAX_TIMEOUT


def test_max_batch_size_above_the_example_measures_a_full_batch_of_cycled_items(
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = FastInferService()
    SEEN.clear()
    with caplog.at_level("INFO", logger="fastinfer"):
        batcher = svc.serve_model(
            init_offset, add_and_count, [1, 2], latency_target_ms=500, workers=0, max_batch_size=8
        )
    assert SEEN and set(SEEN) == {8}, "every measured batch held max_batch_size items"
    assert batcher.max_batch_size == 8
    assert svc._admission["model"]["batch_size"] == 8
    note = svc._serving["model"]["example_batch"]
    assert note == "2 item(s), measured as a batch of max_batch_size=8: its items cycled"
    assert "example_batch has 2 item(s), max_batch_size=8" in caplog.text
    assert "counted as a batch" not in caplog.text  # nothing was miscounted


def test_an_example_that_cannot_be_filled_to_max_batch_size_names_both() -> None:
    class Texts:  # countable, but neither a list, a tuple nor a tensor
        def __len__(self) -> int:
            return 2

    svc = FastInferService()
    with pytest.raises(ConfigError, match=r"example_batch has 2 item\(s\) but max_batch_size=8"):
        svc.serve_model(
            init_must_not_run, add_offset, Texts(), latency_target_ms=500, max_batch_size=8
        )


def test_fill_batch_cycles_or_cuts_along_the_first_dimension() -> None:
    torch = pytest.importorskip("torch")
    assert fill_batch([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]
    assert fill_batch((1, 2, 3), 2) == (1, 2)
    t = torch.arange(6).reshape(3, 2)  # (3, 2)
    torch.testing.assert_close(fill_batch(t, 4), torch.tensor([[0, 1], [2, 3], [4, 5], [0, 1]]))
    enc = fill_batch({"ids": t, "mask": torch.ones(3, 2)}, 5)
    assert enc["ids"].shape == (5, 2) and enc["mask"].shape == (5, 2)


def test_measuring_an_example_counted_as_another_size_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastinfer.integrations._sizing import measure_serving

    with caplog.at_level("WARNING", logger="fastinfer"):
        measure_serving(len, [1, 2], batch_size=8, cores=1, seconds=0.01)
    assert "has 2 item(s) but is counted as a batch of batch_size=8" in caplog.text


def test_a_call_timeout_below_two_measured_batches_fails_setup_naming_both() -> None:
    app, _ = make_app(init_offset, add_slowly, workers=1, call_timeout=0.1)
    with run_server(app) as url:
        detail = _setup_error(url)
        assert "ConfigError: call_timeout=0.1s is below 2x the measured cost of one full batch" in (
            detail
        )
        assert "call_timeout='auto'" in detail


def test_startup_timeout_reaches_the_pool_and_its_error_names_the_fix() -> None:
    app, _ = make_app(init_slow, workers=1, startup_timeout=1)
    with run_server(app) as url:
        detail = _setup_error(url)
        assert "did not start within 1s" in detail
        assert "Fix: serve_model(..., startup_timeout=<seconds>)" in detail

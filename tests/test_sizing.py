"""FastInferService sizes itself: slots x threads chosen by measuring every split of the cores."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from fastinfer.errors import ConfigError
from fastinfer.integrations._sizing import measure_serving, splits


def test_splits_cover_the_core_budget() -> None:
    assert splits(1) == [(1, 1)]
    assert splits(2) == [(1, 2), (2, 1)]
    assert splits(8) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    with pytest.raises(ConfigError, match="cores must be an int"):
        splits(0)


class _Model:
    """A batch costs ``base / threads**scaling`` seconds (sleeps overlap across slots, as
    forward passes on separate cores do)."""

    def __init__(self, base: float, scaling: float) -> None:
        self.base, self.scaling, self.threads = base, scaling, 1
        self.lock = threading.Lock()

    def set_threads(self, n: int) -> None:
        self.threads = n

    def __call__(self, batch: list[int]) -> list[int]:
        time.sleep(self.base / self.threads**self.scaling)
        return batch


def test_a_model_that_does_not_scale_gets_one_thread_per_slot() -> None:
    model = _Model(base=0.02, scaling=0.2)  # 2 threads are only 1.15x one thread
    plan = measure_serving(
        model, list(range(8)), batch_size=8, cores=2, seconds=0.3, set_threads=model.set_threads
    )
    assert (plan.slots, plan.threads) == (2, 1), plan
    assert model.threads == 1  # the chosen thread count is applied
    assert set(plan.measured) == {"1x2", "2x1"}
    assert plan.measured["2x1"] > 1.4 * plan.measured["1x2"]


def test_a_model_that_scales_keeps_one_slot_for_lower_latency() -> None:
    model = _Model(base=0.02, scaling=1.0)  # 2 threads halve the batch time: a tie in items/s
    plan = measure_serving(
        model, list(range(8)), batch_size=8, cores=2, seconds=0.3, set_threads=model.set_threads
    )
    # a near-tie goes to fewer slots: the same throughput with each batch done sooner
    if plan.measured["1x2"] >= 0.97 * plan.measured["2x1"]:
        assert (plan.slots, plan.threads) == (1, 2), plan
    assert plan.batch_seconds == pytest.approx(plan.slots * 8 / plan.items_per_second)


def test_fixed_slots_measure_only_that_split_and_errors_surface() -> None:
    model = _Model(base=0.005, scaling=1.0)
    plan = measure_serving(
        model, [1, 2], batch_size=2, cores=4, slots=2, seconds=0.1, set_threads=model.set_threads
    )
    assert (plan.slots, plan.threads) == (2, 2) and list(plan.measured) == ["2x2"]

    def broken(batch: Any) -> Any:
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        measure_serving(
            broken, [1], batch_size=1, cores=1, seconds=0.05, set_threads=lambda n: None
        )
    with pytest.raises(ConfigError, match="slots must be"):
        measure_serving(model, [1], batch_size=1, cores=2, slots=0, set_threads=lambda n: None)


def test_a_split_that_would_recompile_is_refused_not_fatal() -> None:
    from fastinfer.errors import RecompileError

    model = _Model(base=0.005, scaling=1.0)

    def compiled_for_one_thread(batch: list[int]) -> list[int]:
        if model.threads != 1:
            raise RecompileError("a call needs a new compilation (threads changed)")
        return model(batch)

    plan = measure_serving(
        compiled_for_one_thread,
        [1, 2],
        batch_size=2,
        cores=2,
        seconds=0.1,
        set_threads=model.set_threads,
    )
    assert (plan.slots, plan.threads) == (2, 1) and model.threads == 1
    assert list(plan.measured) == ["2x1"] and "1x2 (a call needs a new compilation" in plan.reason


def _pool_init() -> float:
    return 0.01  # seconds per batch


def _pool_fn(cost: float, batch: list[int]) -> list[int]:
    time.sleep(cost)
    return [x + 1 for x in batch]


def test_admission_through_a_pool_uses_its_workers_as_slots() -> None:
    pytest.importorskip("fastapi")
    import fastinfer
    from fastinfer.integrations.fastapi import FastInferService

    svc = FastInferService(recorder=fastinfer.MetricsRecorder())
    with fastinfer.PinnedPool(_pool_init, _pool_fn, workers=2, pin=False, threads=1) as pool:
        before = fastinfer_threads()
        limits = svc.admission(pool, list(range(8)), latency_target_ms=100)
        assert fastinfer_threads() == before  # this process is left as it was
        # the 2 workers run a batch each and hold one more ready (prefetch=1), taken from
        # the queue's share: the requests admitted stay what the latency target allows
        assert limits["max_concurrent_batches"] == 4
        assert limits["prefetch_batches"] == 0
        admission = svc.readiness()["admission"]["model"]
        assert admission["buffered"] == 2
        assert limits["max_queue_size"] == admission["max_queue_size"]
        # past the door at most: the queue, the 2 prefetched batches and the 2 running
        assert svc.door is not None
        assert svc.door.limit == limits["max_queue_size"] + 2 * 8 + 2 * 8
        plan = svc.readiness()["serving"]["model"]
        assert plan["slots"] == 2 and plan["threads"] == 1 and "PinnedPool" in plan["reason"]
        # 2 workers x 8 items per 10 ms sleep: about 1600 items/s measured through the pool
        assert 400 < plan["items_per_second"] < 1700
        with pytest.raises(ConfigError, match="the workers are the slots"):
            svc.admission(pool, list(range(8)), latency_target_ms=100, max_concurrent_batches=3)


def fastinfer_threads() -> int:
    import torch

    return torch.get_num_threads()

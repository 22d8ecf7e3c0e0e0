"""Worker-side functions for tests/test_pool.py (importable by the pool's worker processes).

Kept apart from the test module so a worker does not import pytest and the tests.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from fastinfer import testing


def init_model() -> dict[str, Any]:
    return {"model": testing.tiny_mlp(in_features=16, hidden=32, out_features=4), "calls": 0}


def predict(state: dict[str, Any], batch: Any) -> Any:
    state["calls"] += 1
    if isinstance(batch, torch.Tensor):
        with torch.inference_mode():
            return state["model"](batch)
    if isinstance(batch, tuple) and batch and batch[0] == "echo":
        return batch[1]
    if batch == "probe":
        return probe()
    if batch == "calls":
        return state["calls"]  # this call included
    if batch == "raise":
        raise KeyError("no such item: 'missing'")
    if batch == "exit":
        os._exit(3)
    if batch == "segfault":
        ctypes.string_at(0)
    if batch == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if batch == "hang":
        time.sleep(600)
    if isinstance(batch, tuple) and batch[0] == "wait-file":
        deadline = time.monotonic() + 60
        while not Path(batch[1]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "opened"
    if isinstance(batch, tuple) and batch[0] == "crash-once":
        marker = Path(batch[1])
        if not marker.exists():
            marker.write_text("crashed")
            os._exit(4)
        return "survived"
    return batch


def probe() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "mkl": os.environ.get("MKL_NUM_THREADS"),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }


def report(state: dict[str, Any]) -> dict[str, int]:
    return {"calls": state["calls"], "pid": os.getpid()}


def state_calls() -> int:
    from fastinfer.pool import worker_state

    return int(worker_state()["calls"])


def init_fails() -> None:
    raise ValueError("cannot load the model: weights.bin is missing")


def init_exits() -> None:
    os._exit(7)


def init_spans() -> dict[str, Any]:
    return {}


def timed_double(
    state: dict[str, Any], items: list[int]
) -> tuple[list[int], tuple[int, float, float]]:
    """Double each item; also return (pid, start, end) so the test can see workers overlap."""
    start = time.monotonic()
    time.sleep(0.05)  # a batch's work: long enough that two batches must overlap to finish early
    return [2 * i for i in items], (os.getpid(), start, time.monotonic())

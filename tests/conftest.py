"""Shared test fixtures: environment hygiene, marker-driven skips, a fresh-interpreter runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA GPU",
        "transformers": (
            f"needs the transformers extra (missing: {', '.join(m)})"
            if (m := _missing("transformers"))
            else None
        ),
        "serve": (
            f"needs the serve extra (missing: {', '.join(m)})"
            if (m := _missing("fastapi", "uvicorn", "prometheus_client", "httpx"))
            else None
        ),
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """Every test leaves os.environ and torch's thread settings as it found them."""
    env = dict(os.environ)
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout's fastinfer."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def python_subprocess():  # type: ignore[no-untyped-def]
    """The :func:`run_python` helper as a fixture."""
    return run_python


def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a condition the code under test reaches (no fixed sleep: poll the real state)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)

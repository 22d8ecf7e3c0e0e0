"""PinnedPool under faults: BaseExceptions raised in ``fn``, answers the parent cannot rebuild.

Each outcome is checked three ways: what the caller gets, that the worker is the same process
afterwards (same pid, its call counter continuing: it was neither killed nor restarted), and that
the call ran exactly once (no retry, even with ``idempotent=True``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from typing import Any

import _pool_fault_helpers as h
import pytest

from fastinfer import PinnedPool, WorkerCrashed, WorkerError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pool() -> Iterator[PinnedPool]:
    # One worker, idempotent: a crash would be retried, so "ran once" and "same worker" catch any
    # path that still treats these answers as a crash.
    with PinnedPool(h.init, h.serve, workers=1, idempotent=True, load_warning_threshold=None) as p:
        yield p


def _outcome(fut: concurrent.futures.Future[Any]) -> BaseException | None:
    try:
        fut.result(timeout=60)
    except BaseException as exc:  # SystemExit / KeyboardInterrupt must not get this far
        return exc
    return None


def _same_worker_ran_once(pool: PinnedPool, before: tuple[int, int]) -> None:
    pid, calls = pool.submit("who").result(timeout=60)
    assert pid == before[0], "the worker was replaced"
    assert calls == before[1] + 2, "the failing call ran more than once (or not at all)"
    s = pool.statistics()
    assert s.crashes == 0 and s.retries == 0 and s.worker_restarts_total == 0


@pytest.mark.parametrize(
    ("item", "described", "original"),
    [
        (("sys.exit", 3), "SystemExit(3)", SystemExit),
        ("KeyboardInterrupt", "KeyboardInterrupt()", KeyboardInterrupt),
        ("Stop", "_pool_fault_helpers.Stop('stop here')", h.Stop),
    ],
    ids=["SystemExit", "KeyboardInterrupt", "custom-BaseException"],
)
def test_a_base_exception_in_fn_is_a_worker_error_and_the_worker_keeps_serving(
    pool: PinnedPool, item: Any, described: str, original: type[BaseException]
) -> None:
    before = pool.submit("who").result(timeout=60)
    got = _outcome(pool.submit(item))
    assert isinstance(got, WorkerError) and not isinstance(got, WorkerCrashed), repr(got)
    assert f"the call raised {described} in worker 0" in str(got)
    assert "keeps serving" in str(got) and "_pool_fault_helpers.py" in str(got)  # its traceback
    assert isinstance(got.__cause__, original)  # the original, for those who want it
    _same_worker_ran_once(pool, before)


def test_system_exit_in_fn_leaves_the_callers_event_loop_running(pool: PinnedPool) -> None:
    ticks: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(1)
            await asyncio.sleep(0)

    async def main() -> tuple[str, Any]:
        task = asyncio.create_task(ticker())
        try:
            await pool.run(("sys.exit", 0))
        except WorkerError as exc:
            caught = type(exc).__name__
        else:
            caught = "nothing"
        after = await pool.run(("echo", "still here"))  # the loop and the pool both carry on
        task.cancel()
        return caught, after

    try:
        caught, after = asyncio.run(main())
    except BaseException as exc:  # before the fix: SystemExit tore down asyncio.run
        pytest.fail(f"{type(exc).__name__} escaped into the event loop")
    assert caught == "WorkerError" and after == ("echo", "still here") and ticks


@pytest.mark.parametrize("via", ["submit", "run"])
def test_an_exception_the_parent_cannot_rebuild_is_a_worker_error_with_the_traceback(
    pool: PinnedPool, via: str
) -> None:
    before = pool.submit("who").result(timeout=60)
    if via == "submit":
        got = _outcome(pool.submit("NeedsTwo"))
    else:

        async def main() -> BaseException | None:
            try:
                await pool.run("NeedsTwo")
            except Exception as exc:
                return exc
            return None

        got = asyncio.run(main())
    assert isinstance(got, WorkerError) and not isinstance(got, WorkerCrashed), repr(got)
    message = str(got)
    assert "the call raised _pool_fault_helpers.NeedsTwo('a/b') in worker 0" in message
    assert "cannot be rebuilt in this process: TypeError" in message
    assert 'raise NeedsTwo("a", "b")' in message  # the worker's traceback text
    assert "SIGKILL" not in message
    _same_worker_ran_once(pool, before)


def test_a_result_the_parent_cannot_rebuild_fails_that_call_only(pool: PinnedPool) -> None:
    before = pool.submit("who").result(timeout=60)
    got = _outcome(pool.submit("OnlyHere"))
    assert isinstance(got, WorkerError) and not isinstance(got, WorkerCrashed), repr(got)
    assert "cannot be rebuilt in this process (RuntimeError" in str(got)
    _same_worker_ran_once(pool, before)

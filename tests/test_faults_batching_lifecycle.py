"""DynamicBatcher's lifecycle under faults: closing from inside ``fn``, closers racing each other,
a home event loop that ends under requests bridged from another loop, a forked child, and
``submit_sync`` on the batcher's own loop thread. Each used to hang (or leak a thread); each
scenario runs in a daemon thread that must finish, so a hang fails the test instead of the run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from conftest import until

from fastinfer import BatchError, ClosedError, DynamicBatcher
from fastinfer.errors import FastInferError, WouldBlockError


def finishes(target: Callable[[], Any], seconds: float = 10.0) -> Any:
    """``target()`` run in a daemon thread: its value (or error), or a failure if it hangs."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = target()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------------ closing from inside fn


@pytest.mark.parametrize("timeout", [None, 0.5])
def test_close_from_inside_a_sync_fn_raises_instead_of_deadlocking(timeout: float | None) -> None:
    calls = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            b.close(timeout=timeout)  # waits for the drain, which waits for this very call
        return items

    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0)

    def scenario() -> None:
        with pytest.raises(
            WouldBlockError, match=r"close\(\) was called from inside .* own fn.*Fix"
        ):
            b.submit_sync(1)  # fn's WouldBlockError is this item's error
        assert not b.closed
        assert b.submit_sync(2) == 2  # still serving
        b.close()

    finishes(scenario)
    assert b.statistics().closed


def test_aclose_from_inside_an_async_fn_raises_instead_of_deadlocking() -> None:
    async def main() -> None:
        calls = []

        async def fn(items: list[int]) -> list[int]:
            calls.append(items)
            if len(calls) == 1:
                await b.aclose()
            return items

        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0)
        with pytest.raises(WouldBlockError, match=r"aclose\(\) was called from inside .* own fn"):
            await b.submit(1)
        assert await b.submit(2) == 2
        await b.aclose()
        assert b.statistics().closed

    finishes(lambda: asyncio.run(main()))


# ------------------------------------------------------------------ closers racing each other


def _race_with_the_close(
    monkeypatch: pytest.MonkeyPatch, b: DynamicBatcher[Any, Any]
) -> threading.Event:
    """Force the interleaving that used to strand a second caller: the thread named ``late``
    schedules its coroutine on the batcher's loop thread right as the first ``close()`` stops
    that loop. Returns the event set once ``late`` is past its checks (the loop still runs)."""
    assert b._thread is not None
    loop = b._thread.loop
    entered, stopping, scheduled = threading.Event(), threading.Event(), threading.Event()
    real_stop = loop.stop

    def stop() -> None:  # on the loop thread, called by the first closer's LoopThread.stop()
        real_stop()
        stopping.set()
        scheduled.wait(5)  # the late caller's callback lands behind the stop

    real_schedule = asyncio.run_coroutine_threadsafe

    def schedule(coro: Coroutine[Any, Any, Any], target: asyncio.AbstractEventLoop) -> Any:
        if threading.current_thread().name != "late":
            return real_schedule(coro, target)
        entered.set()
        stopping.wait(5)
        try:
            return real_schedule(coro, target)
        finally:
            scheduled.set()

    monkeypatch.setattr(loop, "stop", stop)
    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", schedule)
    return entered


def test_two_threads_closing_at_once_both_return(monkeypatch: pytest.MonkeyPatch) -> None:
    b = DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=0)
    assert b.submit_sync(1) == 1  # the batcher now runs its own loop thread
    entered = _race_with_the_close(monkeypatch, b)
    second = threading.Thread(target=b.close, name="late", daemon=True)
    second.start()
    assert entered.wait(5)
    finishes(b.close)  # the first closer
    second.join(5)
    assert not second.is_alive(), "the second close() never returned"
    assert b.statistics().closed and b._loop is not None and b._loop.is_closed()
    b.close()  # and a third, afterwards


def test_submit_sync_racing_a_close_gets_a_closed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    b = DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=0)
    assert b.submit_sync(1) == 1
    entered = _race_with_the_close(monkeypatch, b)
    box: dict[str, Any] = {}

    def late() -> None:
        try:
            box["value"] = b.submit_sync(2, timeout=30)
        except Exception as e:
            box["value"] = e

    submitter = threading.Thread(target=late, name="late", daemon=True)
    submitter.start()
    assert entered.wait(5)
    finishes(b.close)
    submitter.join(5)
    assert not submitter.is_alive(), "submit_sync() never returned"
    assert isinstance(box["value"], ClosedError)


# ------------------------------------------------------------------ the home loop ends


def _bridged(
    a_main: Callable[[DynamicBatcher[int, int], threading.Event], Any],
    n: int,
    release: threading.Event,
    timeout: float = 5,
) -> tuple[DynamicBatcher[int, int], list[Any], float]:
    """Thread A binds the batcher to its loop and runs ``a_main``; thread B, on its own loop,
    submits ``n`` requests (bridged to A's loop) while the first batch blocks in ``fn`` until
    ``release``. Returns the batcher, B's outcomes and how long B waited for them."""

    def fn(items: list[int]) -> list[int]:
        if items[0] >= 10:
            release.wait(10)
        return [x * 2 for x in items]

    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0)
    bound = threading.Event()
    threading.Thread(target=a_main, args=(b, bound), daemon=True).start()
    assert bound.wait(10)

    async def b_main() -> list[Any]:
        async def one(i: int) -> Any:
            try:
                return await b.submit(i, timeout=timeout)
            except BaseException as e:  # a bare CancelledError included
                return e

        return await asyncio.wait_for(asyncio.gather(*(one(10 + i) for i in range(n))), 15)

    t0 = time.monotonic()
    try:
        outcomes = finishes(lambda: asyncio.run(b_main()), 20)
    finally:
        release.set()
    return b, outcomes, time.monotonic() - t0


async def _bind_and_wait(b: DynamicBatcher[int, int], bound: threading.Event, n: int) -> None:
    assert await b.submit(1) == 2  # binds the batcher to this loop
    bound.set()
    while b.statistics().requests_submitted < 1 + n:  # B's requests wait on this loop
        await asyncio.sleep(0.005)


def test_requests_bridged_to_a_home_loop_whose_asyncio_run_returns_get_a_clear_error() -> None:
    release = threading.Event()

    def a_main(b: DynamicBatcher[int, int], bound: threading.Event) -> None:
        asyncio.run(_bind_and_wait(b, bound, 4))  # returns: cancels its tasks, closes the loop

    b, outcomes, _ = _bridged(a_main, 4, release)
    assert not [o for o in outcomes if isinstance(o, asyncio.CancelledError)], outcomes
    assert all(isinstance(o, ClosedError | BatchError) for o in outcomes), outcomes
    queued = [o for o in outcomes if isinstance(o, ClosedError)]
    assert queued and all("loop this DynamicBatcher was bound to" in str(o) for o in queued)
    assert "own_loop=True" in str(queued[0])
    finishes(b.close)


def test_requests_bridged_to_a_home_loop_left_stopped_fail_instead_of_hanging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    def a_main(b: DynamicBatcher[int, int], bound: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        loop.run_until_complete(_bind_and_wait(b, bound, 3))  # the loop is kept, stopped

    with caplog.at_level(logging.ERROR, logger="fastinfer.batching"):
        b, outcomes, waited = _bridged(a_main, 3, release, timeout=1)
        assert all(isinstance(o, WouldBlockError) for o in outcomes), outcomes
        assert "stopped, not closed" in str(outcomes[0])
        # their own timeout, which the stopped loop's timers cannot count: the caller does
        assert 0.9 < waited < 4
        # The stopped loop is dropped with the batch still pending on it: closing its coroutine
        # (as the collector does) is not a GeneratorExit "raised by fn"
        loop = loops[0]
        until(lambda: not loop.is_running(), "loop A stopped")
        tasks = asyncio.all_tasks(loop)
        assert tasks
        for task in tasks:
            task._log_destroy_pending = False  # type: ignore[attr-defined]
            task.get_coro().close()  # type: ignore[union-attr]  # raised if the coroutine went on
        loop.close()
    assert not [r for r in caplog.records if "GeneratorExit" in r.getMessage()]
    assert b.statistics().batches_aborted == 0
    finishes(b.close)


# ------------------------------------------------------------------ a forked child


def test_a_batcher_used_in_a_forked_child_raises_instead_of_hanging(python_subprocess: Any) -> None:
    code = (
        "import os, signal, fastinfer\n"
        "unused = fastinfer.DynamicBatcher(lambda xs: [x + 1 for x in xs], max_batch_size=4,\n"
        "    max_wait_ms=0)\n"
        "b = fastinfer.DynamicBatcher(lambda xs: [x * 2 for x in xs], max_batch_size=4,\n"
        "    max_wait_ms=0)\n"
        "assert b.submit_sync(1) == 2  # binds it: its own loop thread and a worker thread\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(10)\n"
        "    for call in (lambda: b.submit_sync(2, timeout=3), lambda: b.configure(max_wait_ms=1)):\n"
        "        try:\n"
        "            call()\n"
        "            print('no error', flush=True)\n"
        "        except fastinfer.ClosedError as e:\n"
        "            print('belongs to process %d' % os.getppid() in str(e), flush=True)\n"
        "    print(unused.submit_sync(1), flush=True)  # not bound before the fork: usable\n"
        "    b.close()  # the parent's threads are not the child's to stop: returns\n"
        "    unused.close()\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child exit', os.waitstatus_to_exitcode(status), flush=True)\n"
        "assert b.submit_sync(3) == 6  # the parent's batcher is untouched\n"
        "b.close()\n"
        "unused.close()\n"
    )
    proc = python_subprocess(code, timeout=60)
    assert proc.stdout.split("\n")[:4] == ["True", "True", "2", "child exit 0"], proc.stdout


# ------------------------------------------------------------------ submit_sync on its own loop


def test_submit_sync_from_a_callback_on_the_batchers_loop_thread_is_refused() -> None:
    calls: list[int] = []
    seen: list[Any] = []

    def on_request(record: Any) -> None:  # runs on the batcher's own loop thread
        calls.append(1)
        if len(calls) == 1:
            try:
                seen.append(b.submit_sync(99, timeout=2))
            except Exception as e:
                seen.append(e)

    b = DynamicBatcher(
        lambda xs: xs, max_batch_size=4, max_wait_ms=0, on_request=on_request, name="cb-reentry"
    )
    assert finishes(lambda: b.submit_sync(1)) == 1
    assert isinstance(seen[0], WouldBlockError) and "own loop thread" in str(seen[0])
    assert isinstance(seen[0], FastInferError)
    b.close()
    # it used to move to a second loop thread and leave the first running for good
    until(
        lambda: not [t for t in threading.enumerate() if t.name == "fastinfer-cb-reentry-loop"],
        "no loop thread left",
    )


def test_a_home_loop_driven_step_by_step_serves_requests_bridged_between_steps() -> None:
    # A loop that run_until_complete drives step by step is stopped between steps, for as long
    # as the code between them runs (here 0.4 s). A request another thread handed it during a
    # step, still running in fn when the step ends, is answered at the next step. Before: given
    # up after 0.2 s of a stopped loop with "stopped, not closed".
    def fn(xs: list[int]) -> list[int]:
        time.sleep(0.15)  # outlives the step that started it
        return [x * 2 for x in xs]

    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(b.submit(1)) == 2  # binds the batcher to this loop
        results: list[Any] = []

        stepping = threading.Event()

        def other_thread() -> None:
            for i in range(3):
                stepping.wait()  # hand it over while the loop runs (idle and stopped, the
                try:  # batcher would move to a loop thread of its own)
                    results.append(b.submit_sync(i, timeout=5))
                except Exception as e:
                    results.append(e)

        async def step() -> None:  # until the other thread's next request is in
            seen = b.statistics().requests_submitted
            stepping.set()
            for _ in range(100):
                if b.statistics().requests_submitted > seen:
                    break
                await asyncio.sleep(0.01)
            stepping.clear()

        t = threading.Thread(target=other_thread, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline:
            loop.run_until_complete(step())
            time.sleep(0.4)  # the caller's own work between steps: the loop is stopped
        assert results == [0, 2, 4]
        assert b._loop is loop  # served there, not moved to a loop thread
        loop.run_until_complete(b.aclose())
    finally:
        loop.close()

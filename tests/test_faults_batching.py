"""DynamicBatcher under faults (issue 17): slow, hung, exiting and re-entrant ``fn``, priorities
without end, and ``fn`` results asyncio cannot deliver as they are (``StopIteration``, coroutines,
tuples); each fault reproduced with a fake clock (ManualClock) and events, no sleeping."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fastinfer import (
    BatcherConfig,
    BatchError,
    ClosedError,
    ConfigError,
    DeadlineExceeded,
    DynamicBatcher,
)
from fastinfer.errors import WouldBlockError
from fastinfer.testing import ManualClock


async def settle(rounds: int = 30) -> None:
    """Let every ready callback and task run (a fixed number of loop turns, not a sleep)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def no_loop_errors() -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


class ColdModel:
    """An async fn whose calls take ``costs[i]`` seconds of fake time (then the last one)."""

    def __init__(self, clock: ManualClock, costs: list[float]) -> None:
        self.clock, self.costs, self.calls = clock, costs, 0
        self.sizes: list[int] = []

    async def __call__(self, items: list[int]) -> list[int]:
        cost = self.costs[min(self.calls, len(self.costs) - 1)]
        self.calls += 1
        self.sizes.append(len(items))
        self.clock.advance(cost)
        return [x * 2 for x in items]


# ------------------------------------------------------------------------ 1. cost estimates


def test_one_slow_cold_call_does_not_shed_every_later_request() -> None:
    """A 1.5 s cold first call with a 1 s timeout used to shed everything after it, for good."""

    async def main() -> None:
        clock = ManualClock()
        model = ColdModel(clock, [1.5, 0.01])
        b = DynamicBatcher(model, max_batch_size=16, max_wait_ms=0, timeout=1.0, clock=clock)
        with pytest.raises(DeadlineExceeded):
            await b.submit(0)  # the cold call: its caller times out, its cost is learned
        results = await asyncio.gather(*(b.submit(i) for i in range(10)), return_exceptions=True)
        assert results == [i * 2 for i in range(10)]
        assert model.sizes[:2] == [1, 1]  # the cold call, then one probe alone
        st = b.statistics()
        assert st.cost_probes == 1 and st.requests_ok == 10
        assert st.cost_per_batch_seconds < 0.2  # the estimate came down at once
        # later traffic at normal cost keeps being served
        for i in range(5):
            assert await b.submit(i) == i * 2
        await b.aclose()

    run(main())


def test_one_slow_cold_call_does_not_reject_everything_with_a_latency_target() -> None:
    async def main() -> None:
        clock = ManualClock()
        model = ColdModel(clock, [1.5, 0.01])
        b = DynamicBatcher(
            model, max_batch_size=16, max_wait_ms=0, latency_target_ms=1000, clock=clock
        )
        with pytest.raises(DeadlineExceeded):
            await b.submit(0)
        # Idle, and the estimate says a lone request misses the target: it runs as a probe
        # instead of QueueFull for good; the estimate comes down and requests are admitted.
        for i in range(5):
            assert await b.submit(i) == i * 2
        st = b.statistics()
        assert (st.cost_probes, st.requests_rejected, st.requests_ok) == (1, 0, 5)
        await b.aclose()

    run(main())


def test_probes_back_off_while_they_confirm_the_estimate() -> None:
    """A model that really is too slow for the deadlines is probed, not run for every request."""

    async def main() -> None:
        clock = ManualClock()
        model = ColdModel(clock, [1.5])
        b = DynamicBatcher(model, max_batch_size=16, max_wait_ms=0, timeout=1.0, clock=clock)
        with pytest.raises(DeadlineExceeded):
            await b.submit(0)
        with pytest.raises(DeadlineExceeded):
            await b.submit(1)  # a probe: runs, confirms 1.5 s, misses its deadline
        assert model.calls == 2
        with pytest.raises(DeadlineExceeded, match="predicted to finish"):
            await b.submit(2)  # backing off: shed at once, fn not called
        assert model.calls == 2
        clock.advance(2.0)  # past the backoff: the next one probes again
        with pytest.raises(DeadlineExceeded):
            await b.submit(3)
        assert model.calls == 3 and b.statistics().cost_probes == 2
        await b.aclose()

    run(main())


# ------------------------------------------------------------------------ 2. batch timeout


def test_a_hung_async_batch_is_cancelled_after_batch_timeout_and_the_slot_serves_again() -> None:
    async def main() -> None:
        errors = no_loop_errors()
        clock = ManualClock()
        cancelled: list[list[int]] = []

        async def fn(items: list[int]) -> list[int]:
            if 0 in items:
                try:
                    await asyncio.Event().wait()  # hangs
                except asyncio.CancelledError:
                    cancelled.append(items)
                    raise
            return [x * 2 for x in items]

        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0, batch_timeout=2, clock=clock)
        hung = [asyncio.create_task(b.submit(0))]
        await settle()
        waiting = asyncio.create_task(b.submit(5))  # queued behind the hung batch
        await settle()
        clock.advance(2.0)
        with pytest.raises(DeadlineExceeded, match="batch_timeout=2 s") as info:
            await hung[0]
        assert "task was cancelled" in str(info.value)
        assert await waiting == 10  # the slot was freed at once
        assert cancelled == [[0]]
        assert await b.submit(7) == 14
        st = b.statistics()
        assert (st.batches_timed_out, st.batches_in_flight, st.requests_expired) == (1, 0, 1)
        await b.aclose()
        assert errors == []

    run(main())


def test_a_hung_sync_batch_is_abandoned_and_its_thread_replaced() -> None:
    async def main() -> None:
        errors = no_loop_errors()
        clock = ManualClock()
        started, release = threading.Event(), threading.Event()
        threads: list[str] = []

        def fn(items: list[int]) -> list[int]:
            threads.append(threading.current_thread().name)
            if 0 in items:
                started.set()
                assert release.wait(30)
            return [x * 2 for x in items]

        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0, batch_timeout=2, clock=clock)
        hung = asyncio.create_task(b.submit(0))
        await settle()
        assert started.wait(10)
        clock.advance(2.0)
        with pytest.raises(DeadlineExceeded, match="worker thread was abandoned"):
            await hung
        assert b.statistics().abandoned_threads == 1
        assert await b.submit(3) == 6  # served by the replacement thread
        assert threads[0] != threads[1]
        await b.aclose()  # does not wait for the abandoned thread
        release.set()  # the hung call returns at last; its result is dropped
        await settle()
        assert errors == []

    run(main())


def test_a_process_with_an_abandoned_hung_thread_still_exits(python_subprocess: Any) -> None:
    """ThreadPoolExecutor threads are joined at interpreter exit; an abandoned one must not be."""
    code = (
        "import threading, fastinfer\n"
        "b = fastinfer.DynamicBatcher(lambda xs: threading.Event().wait(), max_batch_size=1,\n"
        "    max_wait_ms=0, batch_timeout=0.05)\n"
        "try:\n"
        "    b.submit_sync(1)\n"
        "except fastinfer.DeadlineExceeded:\n"
        "    print('timed out')\n"
        "b.close()\n"
    )
    proc = python_subprocess(code, timeout=120)
    assert proc.stdout.strip() == "timed out"


def test_batch_timeout_is_validated_and_needs_a_thread_for_a_sync_fn() -> None:
    with pytest.raises(ConfigError, match="batch_timeout"):
        BatcherConfig(max_batch_size=1, max_wait_ms=0, batch_timeout=0)
    with pytest.raises(ConfigError, match="run_in_thread=False"):
        DynamicBatcher(
            lambda xs: xs, max_batch_size=1, max_wait_ms=0, batch_timeout=1, run_in_thread=False
        )
    config = BatcherConfig(max_batch_size=1, max_wait_ms=0, batch_timeout=1.5)
    assert BatcherConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------ 3. bounded close


def test_aclose_with_a_timeout_fails_what_is_left_instead_of_hanging() -> None:
    async def main() -> None:
        clock = ManualClock()

        async def fn(items: list[int]) -> list[int]:
            await asyncio.Event().wait()  # hangs for good
            return items

        b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, clock=clock)
        running = asyncio.create_task(b.submit(1))
        await settle()
        queued = asyncio.create_task(b.submit(2))
        await settle()
        closer = asyncio.create_task(b.aclose(timeout=5))
        await settle()
        assert not closer.done()
        clock.advance(5.0)
        await closer
        with pytest.raises(ClosedError, match=r"timeout=5 s before this request's batch"):
            await running
        with pytest.raises(ClosedError, match=r"timeout=5 s before this request ran"):
            await queued
        st = b.statistics()
        assert (st.requests_cancelled, st.batches_in_flight, st.closed) == (2, 0, True)

    run(main())


def test_close_with_a_timeout_returns_although_a_sync_fn_hangs() -> None:
    started, release = threading.Event(), threading.Event()

    def fn(items: list[int]) -> list[int]:
        started.set()
        release.wait(30)
        return items

    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0)
    outcome: list[BaseException] = []

    def caller() -> None:
        try:
            b.submit_sync(1)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=caller)
    t.start()
    assert started.wait(10)
    b.close(timeout=0.05)  # real seconds: returns although fn never does
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)
    release.set()
    with pytest.raises(ConfigError, match="timeout"):
        b.close(timeout=-1)


# ------------------------------------------------------------------------ 4. BaseException


class Custom(BaseException):
    pass


@pytest.mark.parametrize(
    "exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), Custom("x")], ids=type
)
@pytest.mark.parametrize("kind", ["async", "thread"])
def test_a_base_exception_from_fn_fails_only_its_batch(exc: BaseException, kind: str) -> None:
    async def main() -> None:
        errors = no_loop_errors()
        bystander = asyncio.create_task(asyncio.sleep(0, result="alive"))

        def sync_fn(items: list[int]) -> list[int]:
            if 0 in items:
                raise exc
            return [x * 2 for x in items]

        async def async_fn(items: list[int]) -> list[int]:
            return sync_fn(items)

        fn: Callable[[list[int]], Any] = async_fn if kind == "async" else sync_fn
        # one batch of exactly 3 ("full"), however slowly the loop schedules the submits
        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=60_000)
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        b.configure(max_wait_ms=1)
        assert all(isinstance(r, BatchError) for r in results), results
        assert all(r.__cause__ is exc for r in results)
        assert type(exc).__name__ in str(results[0]) and "Fix" in str(results[0])
        assert await b.submit(4) == 8  # the batcher keeps serving
        assert await bystander == "alive"  # and the loop's other tasks live on
        st = b.statistics()
        assert (st.batches_aborted, st.requests_failed, st.bisections) == (1, 3, 0)
        await b.aclose()
        assert errors == []

    run(main())


def test_cancelling_a_batch_task_keeps_its_meaning() -> None:
    async def main() -> None:
        async def fn(items: list[int]) -> list[int]:
            await asyncio.Event().wait()
            return items

        b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0)
        caller = asyncio.create_task(b.submit(1))
        await settle()
        (task,) = b._tasks
        task.cancel()
        await settle()
        assert task.cancelled()  # the cancellation was not turned into a result
        with pytest.raises(BatchError, match="interrupted"):
            await caller
        await b.aclose()

    run(main())


# ------------------------------------------------------------------------ 5. misuse


def test_max_wait_ms_inf_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_wait_ms"):
        BatcherConfig(max_batch_size=4, max_wait_ms=math.inf)
    with pytest.raises(ConfigError, match="finite"):
        DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=float("inf"))


def test_submit_sync_from_inside_a_sync_fn_raises_instead_of_deadlocking() -> None:
    b: DynamicBatcher[int, Any]

    def fn(items: list[int]) -> list[Any]:
        return [b.submit_sync(x + 100, timeout=0.5) for x in items]

    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0)
    with pytest.raises(WouldBlockError, match=r"inside this DynamicBatcher's own fn.*Fix"):
        b.submit_sync(1)  # fn's WouldBlockError is this item's error
    assert b.statistics().requests_submitted == 1  # the inner item was never queued
    b.close()


def test_submit_from_inside_an_async_fn_raises_instead_of_deadlocking() -> None:
    async def main() -> None:
        async def fn(items: list[int]) -> list[Any]:
            return [await b.submit(x + 100, timeout=0.5) for x in items]

        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0)
        with pytest.raises(WouldBlockError, match="inside this DynamicBatcher's own fn"):
            await b.submit(1)
        other = DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=0)

        async def nested(items: list[int]) -> list[int]:  # another batcher is fine
            return [await other.submit(x) for x in items]

        c = DynamicBatcher(nested, max_batch_size=4, max_wait_ms=0)
        assert await c.submit(3) == 3
        for x in (b, c, other):
            await x.aclose()

    run(main())


def test_distinct_priorities_do_not_keep_a_queue_each() -> None:
    async def main() -> None:
        clock = ManualClock()
        gate = asyncio.Event()

        async def fn(items: list[int]) -> list[int]:
            await gate.wait()
            return items

        b = DynamicBatcher(fn, max_batch_size=64, max_wait_ms=0, clock=clock)
        gate.set()
        served = await asyncio.gather(*(b.submit(i, priority=i) for i in range(3000)))
        assert served == list(range(3000))
        assert len(b._queues) <= 1 and len(b._priorities) <= 1
        # Levels emptied by cancellations while the slot is busy are dropped too.
        gate.clear()
        busy = asyncio.create_task(b.submit(-1))
        await settle()
        tasks = [asyncio.create_task(b.submit(i, priority=10_000 + i)) for i in range(2000)]
        await settle()
        for t in tasks:
            t.cancel()
        await settle()
        assert len(b._queues) <= 16
        gate.set()
        assert await busy == -1
        await b.aclose()

    run(main())


def test_the_cost_fit_caps_one_slow_batch_and_follows_a_lasting_change() -> None:
    from fastinfer.batching._cost_model import CostModel

    cost = CostModel()
    for _ in range(20):
        cost.observe(4, 0.010)
    cost.observe(4, 1.5)  # one GC pause or recompile: capped at 4x the prediction
    assert cost.predict(4) < 0.012
    cost.observe(4, 0.010)
    for _ in range(3):  # three in a row: the model really got slower
        cost.observe(4, 0.5)
    assert cost.predict(4) > 0.15
    cost.observe(4, 0.010)  # faster again: the stale history is mostly forgotten at once
    assert cost.predict(4) < 0.1
    cost.observe(4, 0.010)
    assert cost.predict(4) < 0.02


def test_abandoned_threads_are_bounded_and_replaced_when_one_returns() -> None:
    from fastinfer.batching._threads import SlotPool

    pool = SlotPool(1, "test", max_abandoned=1)
    gates = [threading.Event() for _ in range(3)]
    started = [threading.Event() for _ in range(3)]

    def hang(i: int) -> int:
        started[i].set()
        gates[i].wait(30)
        return i

    calls = [pool.submit(hang, 0)]
    assert started[0].wait(10)
    pool.abandon(calls[0])  # 1 abandoned: a new thread takes its place
    calls.append(pool.submit(hang, 1))
    assert started[1].wait(10)
    pool.abandon(calls[1])  # 2 abandoned, over the bound: no replacement
    assert pool.abandoned == 2
    calls.append(pool.submit(hang, 2))
    assert not started[2].wait(0.05)  # nobody to run it
    gates[0].set()  # one abandoned call returns: its thread leaves, a new one starts
    assert started[2].wait(10)
    gates[2].set()
    assert calls[2].future.result(10) == 2
    gates[1].set()
    pool.shutdown(wait=True)
    assert calls[0].future.result(10) == 0  # abandoned results are dropped by the batcher


# ------------------------------------------------------------------------ 6. what fn gives back


@pytest.mark.parametrize("exc", [StopIteration, StopAsyncIteration], ids=lambda e: e.__name__)
@pytest.mark.parametrize("kind", ["thread", "inline", "async"])
def test_stop_iteration_raised_by_fn_fails_its_item_instead_of_hanging(
    exc: type[Exception], kind: str
) -> None:
    """asyncio cannot raise StopIteration into a future: a sync fn's next() on an exhausted
    iterator left its callers, batches_in_flight and aclose() waiting for good."""

    async def main() -> None:
        errors = no_loop_errors()

        def sync_fn(items: list[int]) -> list[int]:
            if 0 in items:
                raise exc()
            return [x * 2 for x in items]

        async def async_fn(items: list[int]) -> list[int]:
            return sync_fn(items)

        fn: Callable[[list[int]], Any] = async_fn if kind == "async" else sync_fn
        # one batch of exactly 3 ("full"), however slowly the loop schedules the submits
        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=60_000, run_in_thread=kind != "inline")
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        b.configure(max_wait_ms=1)
        assert results[1:] == [2, 4]  # bisected as any raising fn: only its item fails
        err = results[0]
        assert isinstance(err, RuntimeError) and isinstance(err.__cause__, exc), repr(err)
        if not (kind == "async" and exc is StopIteration):  # Python makes that a RuntimeError
            assert isinstance(err, BatchError)
            assert f"fn raised {exc.__name__}" in str(err)
            assert "on an exhausted" in str(err) and "Fix" in str(err)
        assert await b.submit(4) == 8  # the batcher keeps serving
        st = b.statistics()
        assert (st.requests_failed, st.batches_in_flight) == (1, 0)
        await b.aclose()
        assert errors == []

    run(main())


@pytest.mark.parametrize("exc", [StopIteration, StopAsyncIteration], ids=lambda e: e.__name__)
def test_stop_iteration_raised_by_cost_fn_is_a_clear_error(exc: type[Exception]) -> None:
    async def main() -> None:
        def cost(x: int) -> float:
            if x == 1:
                raise exc()
            return 1.0

        b = DynamicBatcher(
            lambda xs: xs, max_batch_size=4, max_wait_ms=0, cost_fn=cost, max_batch_cost=4
        )
        with pytest.raises(BatchError, match=f"cost_fn raised {exc.__name__}") as info:
            await b.submit(1)
        assert isinstance(info.value.__cause__, exc)
        assert await b.submit(2) == 2
        await b.aclose()

    run(main())


@pytest.mark.parametrize(
    "exc", [StopIteration, StopAsyncIteration, asyncio.CancelledError], ids=lambda e: e.__name__
)
def test_a_stop_iteration_returned_at_a_position_fails_only_that_item(
    exc: type[BaseException],
) -> None:
    """An exception instance among fn's results fails its item; a StopIteration one killed the
    batch task (set_exception refuses it) and every caller of the batch hung; a CancelledError
    one read as the caller's own task being cancelled."""

    async def main() -> None:
        errors = no_loop_errors()
        stop = exc("done")

        def fn(items: list[int]) -> list[Any]:
            return [stop if x == 1 else x * 2 for x in items]

        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=60_000)
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        b.configure(max_wait_ms=1)
        assert results[0] == 0 and results[2] == 4
        assert isinstance(results[1], BatchError) and results[1].__cause__ is stop
        assert f"fn returned a {exc.__name__} instance" in str(results[1])
        assert await b.submit(5) == 10
        st = b.statistics()
        assert (st.requests_ok, st.requests_failed, st.batches_in_flight) == (3, 1, 0)
        await b.aclose()
        assert errors == []

    run(main())


def test_a_future_that_refuses_its_result_leaves_the_rest_of_the_batch_resolved() -> None:
    """An on_request callback cancels a caller under the batcher's feet: set_result on that
    future raises, which used to end the resolution loop and leave the later callers hanging."""

    async def main() -> None:
        errors = no_loop_errors()
        tasks: list[asyncio.Task[Any]] = []

        def on_request(record: Any) -> None:
            if not tasks[0].done():
                tasks[0].cancel()  # cancels the future the batcher is about to resolve

        b = DynamicBatcher(
            lambda xs: [x * 2 for x in xs],
            max_batch_size=3,
            max_wait_ms=60_000,
            on_request=on_request,
        )
        tasks.extend(asyncio.create_task(b.submit(i)) for i in range(3))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == [2, 4]
        assert b.statistics().batches_in_flight == 0
        await b.aclose()
        assert errors == []

    run(main())


def test_a_failure_inside_the_batch_task_still_resolves_every_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever goes wrong in a batch task after fn returned, no caller is left waiting."""

    async def main() -> None:
        errors = no_loop_errors()
        b = DynamicBatcher(lambda xs: xs, max_batch_size=3, max_wait_ms=60_000)
        schedule, broken = b._schedule, [True]

        def failing_schedule(notify: bool = True) -> None:
            if not notify and broken:  # the batch task's own call, before it wakes its callers
                broken.clear()
                raise RuntimeError("boom")
            schedule(notify)

        b._schedule = failing_schedule  # type: ignore[method-assign]
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, BatchError) for r in results), results
        assert "RuntimeError: boom" in str(results[0])
        b.configure(max_wait_ms=1)
        assert await b.submit(7) == 7  # the slot was freed: the batcher keeps serving
        assert b.statistics().batches_in_flight == 0
        await b.aclose()
        assert errors == []  # the task's exception was retrieved (and logged below)

    with caplog.at_level(logging.ERROR, logger="fastinfer.batching"):
        run(main())
    assert any("batch task failed (RuntimeError: boom)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("n", [2, 3], ids=["batch_of_2", "batch_of_3"])
def test_a_tuple_of_batched_outputs_is_split_element_wise(n: int) -> None:
    """(logits, embedding) without a collator was read as one result per item: with a batch of
    2 each caller got the other's data; with 3 the BatchError blamed the result count."""

    async def main() -> None:
        def model(xs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.tensor(xs, dtype=torch.float32)
            return x * 10, x * 100  # each (B,)

        b = DynamicBatcher(model, max_batch_size=n, max_wait_ms=60_000)
        results = await asyncio.gather(*(b.submit(i + 1) for i in range(n)))
        assert [(float(a), float(e)) for a, e in results] == [
            ((i + 1) * 10.0, (i + 1) * 100.0) for i in range(n)
        ]
        await b.aclose()

    run(main())


def test_a_tuple_output_is_read_one_way_or_refused() -> None:
    async def main() -> None:
        async def submit3(fn: Callable[[list[int]], Any]) -> list[Any]:
            async with DynamicBatcher(fn, max_batch_size=3, max_wait_ms=60_000) as b:
                return await asyncio.gather(
                    *(b.submit(i) for i in range(3)), return_exceptions=True
                )

        # plain values, one per item (nothing in it could be split): per-item results, as before
        assert await submit3(lambda xs: tuple(x * 2 for x in xs)) == [0, 2, 4]
        # a tuple that is neither: refused, never handed out the wrong way
        for fn in (
            lambda xs: (torch.tensor(xs), None),  # an output that is not batched
            lambda xs: tuple(torch.zeros(2) for _ in xs),  # per-item tensors: return a list
        ):
            results = await submit3(fn)
            assert all(isinstance(r, BatchError) for r in results), results
            assert "tuple" in str(results[0]) and "return a list" in str(results[0])
        results = await submit3(lambda xs: ())  # not a tuple of zero outputs for each caller
        assert all(isinstance(r, BatchError) for r in results), results
        assert "fn returned 0 results for a batch of 3 items" in str(results[0])

    run(main())


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_list_of_coroutines_from_fn_is_refused(kind: str) -> None:
    """Results are handed out as they are: coroutines reached the callers unawaited."""

    async def main() -> None:
        async def triple(x: int) -> int:
            return x * 3

        def sync_fn(items: list[int]) -> list[Any]:
            return [triple(x) for x in items]

        async def async_fn(items: list[int]) -> list[Any]:
            return sync_fn(items)

        fn: Callable[[list[int]], Any] = async_fn if kind == "async" else sync_fn
        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=60_000)
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, BatchError) for r in results), results
        assert "coroutine" in str(results[0]) and "async def" in str(results[0])
        assert b.statistics().bisections == 0  # fn's contract, not an item's fault
        await b.aclose()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(main())
        gc.collect()  # an unawaited coroutine warns when it is collected
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_close_on_a_closed_batcher_is_a_no_op_even_on_its_loop_thread() -> None:
    async def main() -> None:
        b = DynamicBatcher(lambda xs: xs, max_batch_size=2, max_wait_ms=0)
        assert await b.submit(1) == 1
        with pytest.raises(WouldBlockError, match="aclose"):
            b.close()  # open: closing would wait on the thread that has to do the work
        await b.aclose()
        b.close()  # already closed: nothing to wait for (close is idempotent)
        b.close(cancel_pending=True, timeout=1)
        await b.aclose()
        assert b.statistics().closed

    run(main())

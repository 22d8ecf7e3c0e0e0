"""DynamicBatcher's ``prefetch_batches``: batches ``fn`` queues behind the ones it runs (a
PinnedPool's prefetch). Deterministic: ManualClock, futures the test resolves, explicit yields."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from fastinfer import ConfigError, DynamicBatcher
from fastinfer.batching import BatcherConfig
from fastinfer.testing import ManualClock


async def settle(rounds: int = 30) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class OneWorker:
    """An async fn that behaves like a one-worker pool with a prefetch buffer: it accepts every
    batch at once and runs them one at a time, in order; the test ends the running one."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self._ends: list[asyncio.Future[None]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        end = asyncio.get_running_loop().create_future()
        self._ends.append(end)
        await end
        return [x * 10 for x in items]

    def finish(self, i: int) -> None:
        self._ends[i].set_result(None)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _warm() -> tuple[DynamicBatcher[int, int], OneWorker, ManualClock]:
    """A batcher of one slot and one prefetched batch over :class:`OneWorker`, after one full
    batch of 8 that took 0.1 s: the cost model predicts 0.1 s for a batch."""
    clock, fn = ManualClock(), OneWorker()
    b = DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=5, max_concurrent_batches=1, prefetch_batches=1,
        clock=clock,
    )  # fmt: skip
    first = [asyncio.ensure_future(b.submit(i)) for i in range(8)]
    await settle()
    clock.advance(0.1)
    fn.finish(0)
    await asyncio.gather(*first)
    return b, fn, clock


def test_a_prefetched_batch_is_sealed_by_the_usual_policy_and_waits_in_fn() -> None:
    async def main() -> None:
        b, fn, clock = await _warm()
        running = [asyncio.ensure_future(b.submit(i)) for i in range(100, 108)]
        await settle()
        assert len(fn.batches) == 2  # the slot took a full batch
        early = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await settle()
        clock.advance(0.004)
        await settle()
        assert len(fn.batches) == 2  # max_wait_ms has not passed
        clock.advance(0.002)
        await settle()
        assert fn.batches[2] == [1, 2]  # handed to fn, which holds it behind the running one
        late = [asyncio.ensure_future(b.submit(i)) for i in (3, 4)]
        await settle()
        clock.advance(0.01)
        await settle()
        assert len(fn.batches) == 3  # slot and prefetch taken: the next waits for room
        assert b.statistics().batches_in_flight == 2
        clock.advance(0.1)
        fn.finish(1)
        await settle()
        assert fn.batches[3] == [3, 4]  # room again: sealed at once (it waited past max_wait)
        fn.finish(2)
        fn.finish(3)
        assert await asyncio.gather(*running, *early, *late) == [
            *(x * 10 for x in range(100, 108)),
            10,
            20,
            30,
            40,
        ]
        await b.aclose()

    run(main())


def test_a_full_prefetched_batch_goes_at_once_and_its_cost_counts_from_when_its_slot_freed() -> (
    None
):
    async def main() -> None:
        b, fn, clock = await _warm()
        running = [asyncio.ensure_future(b.submit(i)) for i in range(8)]
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(8, 16)]
        third = [asyncio.ensure_future(b.submit(i)) for i in range(16, 24)]
        await settle()
        # one runs, one is prefetched (full: no reason to wait), the third waits for a slot
        assert fn.batches[1:] == [list(range(8)), list(range(8, 16))]
        assert b.statistics().dispatch_reasons["full"] == 3
        assert b.statistics().batches_in_flight == 2
        clock.advance(0.1)
        fn.finish(1)
        await settle()
        assert len(fn.batches) == 4  # the third is prefetched as soon as there is room
        clock.advance(0.1)  # the prefetched batch ran 0.1 s from when the slot freed
        fn.finish(2)
        await settle()
        clock.advance(0.1)
        fn.finish(3)
        await asyncio.gather(*running, *queued, *third)
        # from its hand-off it took 0.2 s (0.1 waiting in fn's queue): not its cost
        assert b.statistics().cost_per_batch_seconds == pytest.approx(0.1)
        await b.aclose()

    run(main())


def test_a_sync_fn_runs_prefetched_batches_one_slot_at_a_time() -> None:
    running, peak, gates = 0, 0, [threading.Event() for _ in range(3)]
    lock = threading.Lock()

    def fn(items: list[int]) -> list[int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        gates[items[0] // 10].wait(10)
        with lock:
            running -= 1
        return items

    async def main() -> None:
        b = DynamicBatcher(
            fn, max_batch_size=2, max_wait_ms=0, max_concurrent_batches=1, prefetch_batches=2
        )
        calls = [asyncio.ensure_future(b.submit(x)) for x in (0, 1, 10, 11, 20, 21)]
        await settle()
        assert b.statistics().batches_in_flight == 3  # handed over at once, queued in fn
        for gate in gates:
            gate.set()
        assert await asyncio.gather(*calls) == [0, 1, 10, 11, 20, 21]
        await b.aclose()

    run(main())
    assert peak == 1  # the prefetched batches waited for the slot: never two at once


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_prefetch_batches_must_be_a_non_negative_int(bad: Any) -> None:
    with pytest.raises(ConfigError, match="prefetch_batches must be an int >= 0"):
        DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=1, prefetch_batches=bad)
    with pytest.raises(ConfigError, match="prefetch_batches"):
        BatcherConfig(max_batch_size=4, max_wait_ms=1, prefetch_batches=bad)


def test_prefetch_batches_in_config_statistics_and_configure() -> None:
    async def main() -> None:
        b = DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=1, prefetch_batches=1)
        assert b.config.prefetch_batches == 1
        assert b.statistics().prefetch_batches == 1
        assert await b.submit(3) == 3
        b.configure(prefetch_batches=0)
        await settle()
        assert b.statistics().prefetch_batches == 0
        await b.aclose()

    run(main())

"""A DynamicBatcher feeding a PinnedPool keeps every worker busy (issue 7's composition)."""

from __future__ import annotations

import asyncio
from typing import Any

from _pool_helpers import init_spans, timed_double

import fastinfer


def test_batcher_with_one_slot_per_worker_keeps_both_workers_busy() -> None:
    spans: list[tuple[int, float, float]] = []

    with fastinfer.PinnedPool(init_spans, timed_double, workers=2) as pool:
        assert pool.wait_ready(120)

        async def run_batch(items: list[int]) -> list[int]:
            results, span = await pool.run(items)
            spans.append(span)
            return results

        async def main() -> list[Any]:
            batcher = fastinfer.DynamicBatcher(
                run_batch, max_batch_size=4, max_wait_ms=1, max_concurrent_batches=pool.workers
            )
            async with batcher:
                return await asyncio.gather(*(batcher.submit(i) for i in range(32)))

        results = asyncio.run(main())
        stats = pool.statistics()

    assert results == [2 * i for i in range(32)]  # every item once, in its caller's place
    assert all(w.calls_ok > 0 for w in stats.per_worker), stats
    assert len({pid for pid, _, _ in spans}) == 2
    # Two batches ran at the same time in different workers: the batcher used both slots.
    overlapping = [
        (a, b) for a in spans for b in spans if a[0] != b[0] and a[1] < b[2] and b[1] < a[2]
    ]
    assert overlapping, spans

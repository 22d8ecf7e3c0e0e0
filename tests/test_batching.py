"""DynamicBatcher: deterministic tests (ManualClock, events, explicit yields; no sleeping)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fastinfer
from fastinfer import (
    BatchError,
    ClosedError,
    ConfigError,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
)
from fastinfer.batching import BatchRecord, PadCollate, RequestRecord
from fastinfer.errors import WouldBlockError
from fastinfer.testing import HashTokenizer, ManualClock, bert_like_classifier


async def settle(rounds: int = 30) -> None:
    """Let every ready callback and task run (a fixed number of loop turns, not a sleep)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Model:
    """An async batch fn: records each batch; with ``gated`` each call waits for ``release()``.

    With ``clock`` and ``cost``, a call advances the fake clock by ``cost(n)`` (a simulated
    forward pass). Items for which ``bad(item)`` is true make the whole call raise.
    """

    def __init__(
        self,
        *,
        gated: bool = False,
        clock: ManualClock | None = None,
        cost: Callable[[int], float] | None = None,
        bad: Callable[[Any], bool] = lambda x: False,
    ) -> None:
        self.batches: list[list[Any]] = []
        self.gated = gated
        self.gates: list[asyncio.Event] = []
        self.clock, self.cost, self.bad = clock, cost, bad

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        if self.gated:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        if self.clock is not None and self.cost is not None:
            self.clock.advance(self.cost(len(items)))
        bad = [x for x in items if self.bad(x)]
        if bad:
            raise ValueError(f"bad items {bad}")
        return [x * 10 for x in items]

    def release(self) -> None:
        gates, self.gates = self.gates, []
        for g in gates:
            g.set()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------------------------- formation


def test_items_are_batched_and_results_come_back_in_order() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(model, max_batch_size=32, max_wait_ms=5, clock=clock)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(10)]
        await settle()
        assert model.batches == []  # waiting for company
        clock.advance(0.005)
        assert await asyncio.gather(*tasks) == [i * 10 for i in range(10)]
        assert model.batches == [list(range(10))]
        assert b.statistics().dispatch_reasons["wait_expired"] == 1
        await b.aclose()

    run(main())


def test_a_full_batch_goes_at_once() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(model, max_batch_size=4, max_wait_ms=5, clock=clock)
        assert await asyncio.gather(*(b.submit(i) for i in range(4))) == [0, 10, 20, 30]
        assert b.statistics().dispatch_reasons == {
            "full": 1,
            "wait_expired": 0,
            "adaptive": 0,
            "idle": 0,
        }
        await b.aclose()

    run(main())


def test_wait_is_measured_from_the_oldest_request() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(model, max_batch_size=32, max_wait_ms=5, clock=clock)
        first = asyncio.create_task(b.submit(1))
        await settle()
        clock.advance(0.004)
        second = asyncio.create_task(b.submit(2))
        await settle()
        clock.advance(0.001)  # 5 ms after the first, 1 ms after the second
        assert await asyncio.gather(first, second) == [10, 20]
        assert model.batches == [[1, 2]]
        await b.aclose()

    run(main())


def test_work_conserving_batch_grows_while_the_slot_is_busy() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=32, max_wait_ms=5, clock=clock)
        t0 = asyncio.create_task(b.submit(0))
        await settle()
        clock.advance(0.005)
        await settle()
        assert model.batches == [[0]]
        later = [asyncio.create_task(b.submit(i)) for i in range(1, 12)]
        await settle()
        clock.advance(1.0)  # far past max_wait: still nothing sealed, the only slot is busy
        await settle()
        assert model.batches == [[0]]
        assert b.statistics().queue_depth == 11
        model.release()
        await settle()
        assert model.batches == [[0], list(range(1, 12))]  # sealed the moment the slot freed
        model.release()
        assert await asyncio.gather(t0, *later) == [i * 10 for i in range(12)]
        await b.aclose()

    run(main())


def test_max_concurrent_batches_runs_batches_side_by_side() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(
            model, max_batch_size=4, max_wait_ms=5, max_concurrent_batches=2, clock=clock
        )
        first = [asyncio.create_task(b.submit(i)) for i in range(4)]
        await settle()
        # a full batch with two free slots: shared, two batches of 2 running side by side
        assert model.batches == [[0, 1], [2, 3]]
        assert b.statistics().batches_in_flight == 2
        rest = [asyncio.create_task(b.submit(i)) for i in range(4, 10)]
        await settle()
        assert len(model.batches) == 2  # both slots busy: the queue grows
        model.release()
        await settle()
        # the slots free one after the other with 6 queued: the first takes a full batch (only
        # slots free at the same moment share), the second waits for company as usual
        assert model.batches[2:] == [[4, 5, 6, 7]]
        clock.advance(0.005)
        await settle()
        assert model.batches[3:] == [[8, 9]]
        model.release()
        await settle()
        model.release()
        assert await asyncio.gather(*first, *rest) == [i * 10 for i in range(10)]
        await b.aclose()

    run(main())


def test_free_slots_share_what_is_queued() -> None:
    """32 requests and 2 idle slots are two batches of 16 at once, not 32 beside an idle slot."""

    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(
            model, max_batch_size=8, max_wait_ms=5, max_concurrent_batches=2, clock=clock
        )
        tasks = [asyncio.create_task(b.submit(i)) for i in range(6)]
        await settle()
        assert model.batches == []  # 6 < 8: waiting for company
        clock.advance(0.005)
        await settle()
        assert model.batches == [[0, 1, 2], [3, 4, 5]]
        model.release()
        assert await asyncio.gather(*tasks) == [i * 10 for i in range(6)]
        st = b.statistics()
        assert st.batch_size_counts == {3: 2} and st.dispatch_reasons["wait_expired"] == 2
        await b.aclose()

    run(main())


def test_sync_fn_runs_in_a_worker_thread() -> None:
    seen: list[str] = []

    def fn(items: list[int]) -> list[int]:
        seen.append(threading.current_thread().name)
        return [x + 1 for x in items]

    async def main() -> None:
        async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=0) as b:
            assert await b.submit(1) == 2
        assert seen and seen[0] != threading.current_thread().name

    run(main())


def test_fn_may_return_a_batched_tensor() -> None:
    async def main() -> None:
        async def fn(items: list[int]) -> torch.Tensor:
            return torch.tensor(items) * 2

        async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=0) as b:
            out = await asyncio.gather(*(b.submit(i) for i in range(3)))
        assert [int(x) for x in out] == [0, 2, 4]

    run(main())


# ------------------------------------------------------------------------------- adaptive


async def simulate(spacing: float, n: int, **options: Any) -> tuple[list[int], Any]:
    """Discrete-event run: one arrival every ``spacing`` s; a batch of k costs 10 ms + 1 ms·k.

    Time only moves by ManualClock.advance, straight to the next event (arrival, batch end or
    batcher timer), so the run is exact and instant.
    """
    clock, model = ManualClock(), Model(gated=True)
    b = DynamicBatcher(model, max_batch_size=32, max_wait_ms=5, clock=clock, **options)
    tasks: list[asyncio.Task[Any]] = []
    started, end, next_arrival = 0, None, 0.0
    while len(tasks) < n or not all(t.done() for t in tasks):
        if len(tasks) < n and clock.time() >= next_arrival - 1e-12:
            tasks.append(asyncio.create_task(b.submit(len(tasks))))
            next_arrival += spacing
        await settle(5)
        if len(model.batches) > started:
            started = len(model.batches)
            end = clock.time() + 0.010 + 0.001 * len(model.batches[-1])
        if end is not None and clock.time() >= end - 1e-12:
            end = None
            model.release()
            await settle(5)
            continue
        due = [next_arrival if len(tasks) < n else None, end, *clock.pending()[:1]]
        clock.advance(max(0.0, min(t for t in due if t is not None) - clock.time()))
    await asyncio.gather(*tasks)
    stats = b.statistics()
    await b.aclose()
    return [len(x) for x in model.batches], stats


def test_adaptive_adds_no_wait_at_low_load() -> None:
    sizes, adaptive = run(simulate(1.0, 5, policy="adaptive"))
    assert sizes == [1] * 5
    assert adaptive.dispatch_reasons["adaptive"] == 5
    assert adaptive.queue_wait_seconds["max"] == 0.0
    assert adaptive.request_latency_seconds["mean"] == pytest.approx(0.011)
    assert adaptive.cost_per_batch_seconds == pytest.approx(0.011)
    _, fixed = run(simulate(1.0, 5, policy="fixed"))
    assert fixed.request_latency_seconds["mean"] == pytest.approx(0.016)  # waited 5 ms each


def test_adaptive_still_batches_under_load() -> None:
    sizes, st = run(simulate(0.002, 100, policy="adaptive"))  # 500 req/s
    assert sum(sizes) == 100 and max(sizes) >= 8
    assert st.request_latency_seconds["p99"] < 0.050
    assert st.cost_per_item_seconds == pytest.approx(0.001, rel=1e-3)
    assert st.cost_per_batch_seconds == pytest.approx(0.010, rel=1e-3)


@pytest.mark.parametrize(
    ("rate", "want"),
    [(0.0, 0.0), (100.0, 100 * 0.01 / 1.1), (500.0, 500 * 0.01 / 1.5)],
    ids=["idle", "100/s", "500/s"],
)
def test_wait_threshold(rate: float, want: float) -> None:
    from fastinfer.batching._cost_model import wait_threshold

    assert wait_threshold(rate, 0.001, 0.010) == pytest.approx(want)


def test_latency_target_rejects_early_instead_of_missing_it() -> None:
    async def main() -> None:
        clock = ManualClock()
        model = Model(gated=True)
        b = DynamicBatcher(
            model,
            max_batch_size=4,
            max_wait_ms=0,
            latency_target_ms=50,
            clock=clock,
            policy="adaptive",
        )
        # teach the cost model: 20 ms per batch
        for i in range(2):
            t = asyncio.create_task(b.submit(i))
            await settle()
            clock.advance(0.020)
            model.release()
            await t
        first = [asyncio.create_task(b.submit(0))]  # runs now, done at ~20 ms
        await settle()
        queued = [asyncio.create_task(b.submit(i)) for i in range(4)]  # done at ~40 ms
        await settle()
        with pytest.raises(QueueFull, match="latency_target_ms=50") as info:
            await b.submit(99)  # a third batch would finish at ~60 ms
        assert info.value.retry_after and info.value.retry_after > 0
        assert b.statistics().requests_rejected == 1
        model.release()
        await settle()
        model.release()
        await asyncio.gather(*first, *queued)
        await b.aclose()

    run(main())


def test_latency_target_expires_admitted_requests_at_the_target() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(
            model, max_batch_size=4, max_wait_ms=0, latency_target_ms=30, clock=clock
        )
        t = asyncio.create_task(b.submit(1))
        await settle()
        clock.advance(0.030)
        with pytest.raises(DeadlineExceeded):
            await t
        model.release()
        await b.aclose()
        assert b.statistics().requests_expired == 1

    run(main())


# ------------------------------------------------------------------------------- sizes, cost


def test_preferred_sizes_cut_batches_without_padding() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(
            model,
            max_batch_size=8,
            max_wait_ms=5,
            preferred_batch_sizes=[1, 2, 4, 8],
            clock=clock,
        )
        tasks = [asyncio.create_task(b.submit(i)) for i in range(6)]
        await settle()
        clock.advance(0.005)
        await asyncio.gather(*tasks)
        assert [len(x) for x in model.batches] == [4, 2]
        await b.aclose()

    run(main())


def test_pad_to_preferred_pads_and_drops_the_padding() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(
            model,
            max_batch_size=8,
            max_wait_ms=5,
            preferred_batch_sizes=[4, 8],
            pad_to_preferred=True,
            clock=clock,
        )
        tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
        await settle()
        clock.advance(0.005)
        assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]
        assert model.batches == [[0, 1, 2, 3, 4, 4, 4, 4]]  # the last item repeated
        st = b.statistics()
        assert st.padded_items == 3 and st.batch_size_counts == {5: 1}
        await b.aclose()

    run(main())


def test_cost_budget_keeps_fifo_order() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(
            model,
            max_batch_size=32,
            max_wait_ms=5,
            cost_fn=lambda x: x,
            max_batch_cost=8,
            clock=clock,
        )
        tasks = [asyncio.create_task(b.submit(x)) for x in (3, 3, 5, 1, 1)]
        await settle()
        clock.advance(0.005)
        await asyncio.gather(*tasks)
        # the 5 does not fit after 3+3: it waits at the front, the 1s are not pulled past it
        assert model.batches == [[3, 3], [5, 1, 1]]
        await b.aclose()

    run(main())


def test_priorities_serve_higher_levels_first() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=2, max_wait_ms=0, clock=clock)
        first = asyncio.create_task(b.submit(0))
        await settle()
        low = [asyncio.create_task(b.submit(i, priority=0)) for i in (1, 2)]
        high = [asyncio.create_task(b.submit(i, priority=5)) for i in (3, 4)]
        await settle()
        model.release()
        await settle()
        assert model.batches[1] == [3, 4]
        model.release()
        await settle()
        model.release()
        await asyncio.gather(first, *low, *high)
        assert model.batches[2] == [1, 2]
        await b.aclose()

    run(main())


# ------------------------------------------------------------------------------- collation


def test_stack_collate_stacks_and_splits() -> None:
    async def main() -> None:
        seen: list[tuple[int, ...]] = []

        async def fn(x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return x.sum(dim=1, keepdim=True)  # (B, 1)

        clock = ManualClock()
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=5, collate="stack", clock=clock)
        tasks = [asyncio.create_task(b.submit(torch.full((4,), float(i)))) for i in range(3)]
        await settle()
        clock.advance(0.005)
        out = await asyncio.gather(*tasks)
        assert seen == [(3, 4)]
        assert [float(o) for o in out] == [0.0, 4.0, 8.0]
        await b.aclose()

    run(main())


@pytest.mark.parametrize("side", ["right", "left"], ids=["right", "left"])
def test_pad_collate_pads_masks_and_unpads(side: str) -> None:
    async def main() -> None:
        seen = []

        async def fn(batch: Any) -> torch.Tensor:
            seen.append(batch)
            return batch.data * 2  # (B, T): per-token output

        clock = ManualClock()
        collate = PadCollate(pad_value=-1, side=side, return_lengths=True, sequence_dims=1)
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=5, collate=collate, clock=clock)
        items = [[1, 2, 3], [4], [5, 6]]
        tasks = [asyncio.create_task(b.submit(x)) for x in items]
        await settle()
        clock.advance(0.005)
        out = await asyncio.gather(*tasks)
        assert [o.tolist() for o in out] == [[2, 4, 6], [8], [10, 12]]
        data, mask, lengths = seen[0]
        if side == "right":
            assert data.tolist() == [[1, 2, 3], [4, -1, -1], [5, 6, -1]]
            assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
        else:
            assert data.tolist() == [[1, 2, 3], [-1, -1, 4], [-1, 5, 6]]
            assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
        assert lengths.tolist() == [3, 1, 2]
        await b.aclose()

    run(main())


def test_pad_collate_on_tokenizer_dicts_matches_one_by_one() -> None:
    model = bert_like_classifier(num_layers=1, enable_nested_tensor=False)
    tok = HashTokenizer()
    texts = ["a short one", "a much longer text with many more words in it", "mid size text"]

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert set(batch) == {"input_ids", "attention_mask"}
        with torch.inference_mode():
            return model(batch["input_ids"], batch["attention_mask"])

    async def main() -> list[torch.Tensor]:
        collate = PadCollate(sequence_dims=None)  # (B, classes) logits: no sequence dim
        async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50, collate=collate) as b:
            return await asyncio.gather(*(b.submit(tok(t)) for t in texts))

    out = run(main())
    with torch.inference_mode():
        alone = [model(**tok(t))[0] for t in texts]
    for got, want in zip(out, alone):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_collators_directly() -> None:
    from fastinfer.batching import StackCollate

    stack = StackCollate()
    batch, ctx = stack.collate([{"x": torch.ones(2), "y": 1}, {"x": torch.zeros(2), "y": 2}])
    assert batch["x"].shape == (2, 2) and batch["y"].tolist() == [1, 2]
    out = stack.split((torch.arange(2), {"z": torch.arange(4).view(2, 2)}), ctx, 2)
    assert int(out[1][0]) == 1 and out[1][1]["z"].tolist() == [2, 3]
    with pytest.raises(BatchError, match=r"different shapes: item 0 is \(2,\), but \{1: \(3,\)\}"):
        stack.collate([torch.ones(2), torch.ones(3)])
    with pytest.raises(BatchError, match="first dimension must be the batch"):
        stack.split(torch.ones(3, 2), ctx, 2)

    pad = PadCollate(pad_value={"input_ids": 7}, return_lengths=True, pad_to_multiple_of=4)
    tok = HashTokenizer()
    batch, ctx = pad.collate([tok("one two"), tok("one two three four five")])
    assert batch["input_ids"].shape == (2, 8)  # 6 tokens rounded up to a multiple of 4
    assert batch["input_ids"][0, 3:].tolist() == [7] * 5
    assert batch["attention_mask"].sum(1).tolist() == [3, 6]
    assert batch["lengths"].tolist() == [3, 6]
    with pytest.raises(ConfigError, match="side must be 'right' or 'left'"):
        PadCollate(side="middle")  # type: ignore[arg-type]


def test_an_item_over_the_cost_budget_runs_alone() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(
            model,
            max_batch_size=8,
            max_wait_ms=5,
            cost_fn=lambda x: x,
            max_batch_cost=4,
            clock=clock,
        )
        tasks = [asyncio.create_task(b.submit(x)) for x in (9, 1, 1)]
        await settle()
        assert model.batches == [[9]]  # over budget on its own: dispatched at once, alone
        clock.advance(0.005)
        assert await asyncio.gather(*tasks) == [90, 10, 10]
        assert model.batches == [[9], [1, 1]]
        await b.aclose()

    run(main())


def test_collate_errors_are_isolated_to_the_odd_item() -> None:
    async def main() -> None:
        clock = ManualClock()

        async def fn(x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=1)

        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=5, collate="stack", clock=clock)
        good = [asyncio.create_task(b.submit(torch.ones(3))) for _ in range(3)]
        odd = asyncio.create_task(b.submit("not a tensor"))
        await settle()
        clock.advance(0.005)
        assert [float(x) for x in await asyncio.gather(*good)] == [3.0] * 3
        with pytest.raises(BatchError, match="item 0 is a str"):
            await odd
        await b.aclose()

    run(main())


def test_length_bucketing_groups_similar_lengths_and_always_takes_the_oldest() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)

        async def fn(items: list[list[int]]) -> list[int]:
            return await model([len(x) for x in items])

        b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=0, bucket_window=8, clock=clock)
        blocker = asyncio.create_task(b.submit([0]))
        await settle()
        lengths = [100, 5, 6, 101, 7, 99]
        tasks = [asyncio.create_task(b.submit([1] * n)) for n in lengths]
        await settle()
        for _ in range(4):
            model.release()
            await settle()
        await asyncio.gather(blocker, *tasks)
        # oldest (100) goes first, with its nearest length (101); then 5 with 6; then 7 with 99
        assert model.batches[1:] == [[100, 101], [5, 6], [7, 99]]
        await b.aclose()

    run(main())


# ------------------------------------------------------------------------------- deadlines etc.


def test_queued_request_expires_eagerly_while_a_batch_runs() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=4, max_wait_ms=0, clock=clock)
        running = asyncio.create_task(b.submit(1))
        await settle()
        waiting = asyncio.create_task(b.submit(2, timeout=0.010))
        await settle()
        clock.advance(0.010)
        await settle()
        assert waiting.done()  # before the running batch ended
        with pytest.raises(DeadlineExceeded, match="in the queue"):
            await waiting
        model.release()
        assert await running == 10
        assert model.batches == [[1]]  # the expired item never ran
        assert b.statistics().requests_expired == 1
        await b.aclose()

    run(main())


def test_running_request_past_its_deadline_gets_deadline_exceeded() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=4, max_wait_ms=0, clock=clock, timeout=0.5)
        slow = asyncio.create_task(b.submit(1, timeout=0.010))
        other = asyncio.create_task(b.submit(2))
        await settle()
        clock.advance(0.010)
        with pytest.raises(DeadlineExceeded, match="while its batch was running"):
            await slow
        model.release()  # the expired item's result is dropped
        await settle()
        model.release()  # `other` ran in the next batch
        assert await other == 20
        assert model.batches == [[1], [2]]
        st = b.statistics()
        assert (st.requests_ok, st.requests_expired) == (1, 1)
        await b.aclose()

    run(main())


def test_queue_full_is_immediate_with_retry_after() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=2, max_wait_ms=0, max_queue_size=2, clock=clock)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]  # 1 runs, 2 queue
        await settle()
        with pytest.raises(QueueFull, match="max_queue_size=2") as info:
            await b.submit(9)
        assert info.value.retry_after is not None and info.value.retry_after > 0
        model.release()
        await settle()
        model.release()
        await asyncio.gather(*tasks)
        await b.aclose()

    run(main())


def test_cancelled_queued_item_never_runs_and_running_result_is_discarded() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=4, max_wait_ms=5, clock=clock)
        running = asyncio.create_task(b.submit(1))
        keep = asyncio.create_task(b.submit(2))
        await settle()
        clock.advance(0.005)
        await settle()
        queued = asyncio.create_task(b.submit(3))
        other = asyncio.create_task(b.submit(4))
        await settle()
        queued.cancel()
        running.cancel()
        await settle()
        assert b.statistics().queue_depth == 1
        model.release()
        await settle()
        clock.advance(0.005)
        await settle()
        model.release()
        assert await keep == 20 and await other == 40
        assert model.batches == [[1, 2], [4]]  # 3 was withdrawn before it ran
        st = b.statistics()
        assert (st.requests_ok, st.requests_cancelled) == (2, 2)
        await b.aclose()

    run(main())


# ------------------------------------------------------------------------------- errors


def test_a_bad_item_fails_alone_with_its_own_exception() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(bad=lambda x: x in (3, 6))
        b = DynamicBatcher(model, max_batch_size=8, max_wait_ms=5, clock=clock)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(8)]
        await settle()
        clock.advance(0.005)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, r in enumerate(results):
            if i in (3, 6):
                assert isinstance(r, ValueError) and str(r) == f"bad items [{i}]"
            else:
                assert r == i * 10
        st = b.statistics()
        assert (st.requests_ok, st.requests_failed, st.bisections) == (6, 2, 1)
        await b.aclose()

    run(main())


def test_a_sync_fn_starts_in_its_thread_when_the_batch_is_sealed() -> None:
    """The worker thread gets the batch at once, not after the loop's next turn."""

    async def main() -> None:
        started, release = threading.Event(), threading.Event()

        def fn(items: list[int]) -> list[int]:
            started.set()
            assert release.wait(10)
            return [x + 1 for x in items]

        b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0)
        task = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)  # submit() runs up to its await: the batch is sealed
        # The loop is blocked here, so only a call already handed to the thread can start.
        assert started.wait(5)
        release.set()
        assert await task == 2
        await b.aclose()

    run(main())


def test_a_batch_cancelled_before_its_first_step_still_resolves_its_callers() -> None:
    """A loop that shuts down can cancel a batch task before it ever runs: no caller is lost."""

    async def main() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

        def fn(items: list[int]) -> list[int]:
            raise ValueError("the model failed")

        b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0)
        caller = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)  # sealed and launched; the batch task has not run yet
        (task,) = b._tasks
        task.cancel()
        with pytest.raises(BatchError, match="cancelled before it ran"):
            await caller
        await settle()
        st = b.statistics()
        assert (st.batches_in_flight, st.requests_failed) == (0, 1)
        await b.aclose()
        import gc

        gc.collect()  # an unretrieved future exception is logged when the future is collected
        await settle()
        assert errors == []

    run(main())


def test_a_sync_fn_in_its_thread_isolates_bad_items_and_collate_errors() -> None:
    async def main() -> None:
        clock = ManualClock()

        def fn(x: torch.Tensor) -> torch.Tensor:
            if (x < 0).any():
                raise ValueError("negative input")
            return x.sum(dim=1)

        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=5, collate="stack", clock=clock)
        items: list[Any] = [torch.ones(3), -torch.ones(3), "not a tensor", 2 * torch.ones(3)]
        tasks = [asyncio.create_task(b.submit(x)) for x in items]
        await settle()
        clock.advance(0.005)
        ok1, neg, odd, ok2 = await asyncio.gather(*tasks, return_exceptions=True)
        assert (float(ok1), float(ok2)) == (3.0, 6.0)
        assert isinstance(neg, ValueError) and str(neg) == "negative input"
        assert isinstance(odd, BatchError) and "item 0 is a str" in str(odd)
        assert b.statistics().requests_failed == 2
        await b.aclose()

    run(main())


def test_fail_batch_mode_fails_every_caller_with_batch_error() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(bad=lambda x: x == 1)
        b = DynamicBatcher(
            model, max_batch_size=8, max_wait_ms=5, on_error="fail_batch", clock=clock
        )
        tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await settle()
        clock.advance(0.005)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, BatchError) for r in results)
        assert isinstance(results[0].__cause__, ValueError)
        assert len(model.batches) == 1
        await b.aclose()

    run(main())


def test_an_exception_returned_at_a_position_fails_only_that_item() -> None:
    async def main() -> None:
        async def fn(items: list[int]) -> list[Any]:
            return [KeyError(x) if x == 2 else x for x in items]

        async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50) as b:
            results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        assert results[:2] == [0, 1] and results[3] == 3
        assert isinstance(results[2], KeyError)

    run(main())


def test_a_wrong_length_result_fails_the_batch_and_never_hangs() -> None:
    async def main() -> None:
        async def fn(items: list[int]) -> list[int]:
            return items[:-1]

        async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50) as b:
            results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, BatchError) for r in results)
        assert "fn returned 2 results for a batch of 3 items" in str(results[0])

    run(main())


# ------------------------------------------------------------------------------- lifecycle


def test_close_drains_queued_work_and_then_refuses() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model()
        b = DynamicBatcher(model, max_batch_size=32, max_wait_ms=1000, clock=clock)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await settle()
        await b.aclose()  # no wait: closing dispatches at once ("idle")
        assert [t.result() for t in tasks] == [0, 10, 20]
        assert b.statistics().dispatch_reasons["idle"] == 1
        with pytest.raises(ClosedError) as info:
            await b.submit(1)
        assert str(info.value) == "cannot submit to a closed DynamicBatcher"
        assert b.statistics().closed

    run(main())


def test_close_with_cancel_pending_fails_queued_requests() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=1, max_wait_ms=0, clock=clock)
        running = asyncio.create_task(b.submit(1))
        queued = asyncio.create_task(b.submit(2))
        await settle()
        closing = asyncio.create_task(b.aclose(cancel_pending=True))
        await settle()
        with pytest.raises(ClosedError) as info:
            await b.submit(3)
        assert str(info.value) == "cannot submit to a DynamicBatcher that is closing"
        with pytest.raises(ClosedError, match="cancel_pending=True"):
            await queued
        model.release()
        await closing
        assert await running == 10

    run(main())


def test_sync_context_manager_and_submit_sync_from_threads() -> None:
    with DynamicBatcher(lambda xs: [x * 2 for x in xs], max_batch_size=8, max_wait_ms=1) as b:
        results: dict[int, int] = {}

        def worker(i: int) -> None:
            results[i] = b.submit_sync(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: 2 * i for i in range(8)}
    with pytest.raises(ClosedError, match="closed DynamicBatcher"):
        b.submit_sync(1)
    assert not any(t.name.startswith("fastinfer-DynamicBatcher") for t in threading.enumerate())


def test_submit_sync_inside_a_running_loop_does_not_deadlock() -> None:
    # A Jupyter cell runs on a thread whose event loop is running; calling blocking code there
    # must still work: the batcher moves to its own loop thread.
    b = DynamicBatcher(lambda xs: [x + 1 for x in xs], max_batch_size=8, max_wait_ms=1)

    async def cell() -> tuple[int, int, int]:
        first = await b.submit(1)  # binds to this loop
        second = b.submit_sync(2)  # idle: moves to a private loop thread
        third = await b.submit(3)  # bridges to that thread
        return first, second, third

    assert run(cell()) == (2, 3, 4)
    b.close()


def test_submit_sync_on_a_busy_home_loop_raises_instead_of_deadlocking() -> None:
    async def main() -> None:
        model = Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=4, max_wait_ms=0)
        t = asyncio.create_task(b.submit(1))
        await settle()
        with pytest.raises(WouldBlockError, match="would deadlock"):
            b.submit_sync(2)
        with pytest.raises(WouldBlockError, match="aclose"):
            b.close()
        model.release()
        await t
        await b.aclose()

    run(main())


def test_a_batcher_survives_its_loop_closing() -> None:
    b = DynamicBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=0)
    assert run(b.submit(1)) == 1
    assert run(b.submit(2)) == 2  # a fresh asyncio.run: rebinds while idle
    b.close()


def test_a_batcher_leaves_a_stopped_idle_home_loop_for_the_callers() -> None:
    # A loop kept for run_until_complete, or a pytest-asyncio session fixture's loop between
    # tests: stopped, not closed. A submit from another loop used to wait for it forever.
    b = DynamicBatcher(lambda xs: [x * 2 for x in xs], max_batch_size=4, max_wait_ms=0)
    kept = asyncio.new_event_loop()
    try:
        assert kept.run_until_complete(b.submit(1)) == 2  # binds to `kept`, which then stops
        assert run(asyncio.wait_for(b.submit(2), 10)) == 4  # idle: rebinds to this loop
        assert kept.run_until_complete(b.submit(3)) == 6  # that one closed: back to `kept`
        run(asyncio.wait_for(b.aclose(), 10))  # from another loop: nothing to drain
        assert b.closed and b.statistics().closed
    finally:
        kept.close()


def test_submit_refuses_a_stopped_home_loop_that_holds_requests() -> None:
    model = Model(gated=True)
    b = DynamicBatcher(model, max_batch_size=4, max_wait_ms=0)
    kept = asyncio.new_event_loop()
    try:
        first = kept.create_task(b.submit(1))
        kept.run_until_complete(settle())  # its batch runs (gated), then the loop stops
        assert b.statistics().batches_in_flight == 1
        with pytest.raises(WouldBlockError, match=r"not running.*own_loop=True"):
            run(b.submit(2))  # a clear error, not a request that waits forever
        with pytest.raises(WouldBlockError, match="aclose"):
            run(b.aclose())
        model.release()
        assert kept.run_until_complete(first) == 10
        kept.run_until_complete(b.aclose())
    finally:
        kept.close()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition another thread makes true (polled; fails loudly on timeout)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


def test_own_loop_bridges_async_callers_and_their_cancellation() -> None:
    started, release = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        seen.append(items)
        started.set()
        release.wait(10)
        return [x + 1 for x in items]

    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=0, own_loop=True)

    async def main() -> None:
        first = asyncio.create_task(b.submit(1))
        await until(started.is_set)
        queued = asyncio.create_task(b.submit(2))
        await until(lambda: b.statistics().queue_depth == 1)
        queued.cancel()
        await until(lambda: b.statistics().requests_cancelled == 1)
        release.set()
        assert await first == 2
        assert b.statistics().queue_depth == 0

    run(main())
    b.close()
    assert seen == [[1]]  # the cancelled item never ran
    assert not any(t.name.startswith("fastinfer-DynamicBatcher") for t in threading.enumerate())


# ------------------------------------------------------------------------------- reconfigure, stats


def test_runtime_reconfiguration() -> None:
    async def main() -> None:
        clock, model = ManualClock(), Model(gated=True)
        b = DynamicBatcher(model, max_batch_size=8, max_wait_ms=5, clock=clock)
        b.configure(max_batch_size=4, max_concurrent_batches=2)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
        await settle()
        assert model.batches == [[0, 1], [2, 3]]  # a full batch shared by the two free slots
        model.release()
        await asyncio.gather(*tasks)
        b.configure(max_wait_ms=0)
        t = asyncio.create_task(b.submit(7))
        await settle()
        assert model.batches[-1] == [7]  # dispatched without waiting
        model.release()
        assert await t == 70
        st = b.statistics()
        assert (st.max_batch_size, st.max_wait_ms, st.max_concurrent_batches) == (4, 0.0, 2)
        with pytest.raises(ConfigError, match="max_batch_size must be a positive int"):
            b.configure(max_batch_size=0)
        await b.aclose()

    run(main())


def test_statistics_and_callbacks_agree() -> None:
    batches: list[BatchRecord] = []
    requests: list[RequestRecord] = []

    async def main() -> None:
        clock, model = ManualClock(), Model(bad=lambda x: x == 2)
        b = DynamicBatcher(
            model,
            max_batch_size=8,
            max_wait_ms=5,
            max_queue_size=4,
            clock=clock,
            on_batch=batches.append,
            on_request=requests.append,
        )
        tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
        await settle()
        with pytest.raises(QueueFull):
            await b.submit(9)
        clock.advance(0.005)
        await asyncio.gather(*tasks, return_exceptions=True)
        st = b.statistics()
        assert st.requests_submitted == 5
        assert (st.requests_ok, st.requests_failed, st.requests_rejected) == (3, 1, 1)
        assert st.batch_size_counts[4] == 1 and st.batches_run >= 1
        assert st.queue_wait_seconds["count"] == 4
        assert st.queue_depth == 0 and st.batches_in_flight == 0
        await b.aclose()
        with pytest.raises(Exception):  # frozen
            st.queue_depth = 3  # type: ignore[misc]

    run(main())
    assert batches[0].size == 4 and batches[0].reason == "wait_expired" and batches[0].failed == 1
    outcomes = sorted(r.outcome for r in requests)
    assert outcomes == ["failed", "ok", "ok", "ok", "rejected"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be a positive int"),
        ({"max_wait_ms": -1}, "max_wait_ms must be a number >= 0"),
        ({"policy": "greedy"}, "policy must be 'fixed' or 'adaptive'"),
        ({"pad_to_preferred": True}, "pad_to_preferred=True needs preferred_batch_sizes"),
        ({"preferred_batch_sizes": [64]}, "above max_batch_size"),
        ({"max_batch_cost": 10}, "cost_fn and max_batch_cost go together"),
        ({"collate": "zip"}, "collate must be None, 'stack', 'pad'"),
        ({"on_error": "ignore"}, "on_error must be 'isolate' or 'fail_batch'"),
        ({"bucket_window": 1}, "bucket_window must be >= 2"),
        ({"timeout": 0}, "timeout must be None or a number > 0"),
    ],
    ids=[
        "size",
        "wait",
        "policy",
        "pad",
        "preferred",
        "cost",
        "collate",
        "on_error",
        "bucket",
        "timeout",
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(
    kwargs: dict[str, Any], message: str
) -> None:
    options = {"max_batch_size": 8, "max_wait_ms": 5, **kwargs}
    with pytest.raises(ConfigError, match=message):
        DynamicBatcher(lambda xs: xs, **options)


# ------------------------------------------------------------------------------- decorator


def test_batch_decorator_on_functions_and_methods() -> None:
    calls: list[list[str]] = []

    @fastinfer.batch(max_batch_size=4, max_wait_ms=50)
    def shout(items: list[str]) -> list[str]:
        calls.append(items)
        return [s.upper() for s in items]

    class Service:
        def __init__(self, k: int) -> None:
            self.k = k

        @fastinfer.batch(max_batch_size=4, max_wait_ms=0)
        async def scale(self, items: list[int]) -> list[int]:
            return [x * self.k for x in items]

    async def main() -> None:
        assert await asyncio.gather(*(shout(s) for s in "abcd")) == list("ABCD")
        s2, s3 = Service(2), Service(3)
        assert await s2.scale(5) == 10 and await s3.scale(5) == 15
        assert s2.scale.batcher is not s3.scale.batcher
        await shout.batcher.aclose()
        await s2.scale.batcher.aclose()
        await s3.scale.batcher.aclose()

    run(main())
    assert calls == [list("abcd")]
    assert shout.__name__ == "shout"


@pytest.mark.serve
def test_batch_decorator_in_a_fastapi_endpoint() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    @fastinfer.batch(max_batch_size=8, max_wait_ms=2)
    def double(items: list[int]) -> list[int]:
        return [2 * x for x in items]

    app = FastAPI()

    @app.get("/double/{x}")
    async def endpoint(x: int) -> dict[str, int]:
        return {"y": await double(x)}

    with TestClient(app) as client:
        assert client.get("/double/21").json() == {"y": 42}
    double.batcher.close()


# ------------------------------------------------------------------------------- docs


def _doc_blocks() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "batching.md").read_text()
    return [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]


def test_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(_doc_blocks()[0], "docs/batching.md", "exec"), {})
    assert "[0, 1, 2]" in capsys.readouterr().out


@pytest.mark.serve
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_docs_fastapi_snippet_serves_and_maps_errors() -> None:
    from fastapi.testclient import TestClient

    ns: dict[str, Any] = {}
    exec(compile(_doc_blocks()[1], "docs/batching.md", "exec"), ns)
    with TestClient(ns["app"]) as client:
        r = client.post("/classify", params={"text": "a small test"})
        assert r.status_code == 200 and r.json()["label"] in (0, 1)
    ns["classify"].batcher.close()

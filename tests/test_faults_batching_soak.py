"""Soak (issue 17): under a random schedule of slow, hung, raising and SystemExit-ing batches, with
random cancellations, deadlines and batch timeouts, every submitted item resolves exactly once and
the batcher keeps serving afterwards (hypothesis on a fake clock; bounded to run in seconds)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastinfer import BatchError, ClosedError, DeadlineExceeded, DynamicBatcher, QueueFull
from fastinfer.testing import ManualClock

# item % 10: what the batch that holds it does
OK, RAISES, EXITS, HANGS, STUBBORN, SLOW = 0, 1, 2, 3, 4, 5


class FaultyModel:
    """An async fn: each call waits for ``release()``; then the worst item in the batch decides.

    HANGS never returns (until cancelled); STUBBORN ignores its first cancellation; SLOW moves
    the fake clock on by 5 ms inside the call; RAISES raises ValueError (bisected to the item);
    EXITS raises SystemExit (contained to the batch).
    """

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.gates: list[asyncio.Event] = []
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        flags = {x % 10 for x in items}
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if HANGS in flags:
            await asyncio.Event().wait()
        if STUBBORN in flags:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.Event().wait()  # the second cancellation ends it
        if SLOW in flags:
            self.clock.advance(0.005)
        if EXITS in flags:
            raise SystemExit(2)
        if RAISES in flags:
            raise ValueError("bad item")
        return [x * 2 for x in items]

    def release(self) -> None:
        gates, self.gates = self.gates, []
        for g in gates:
            g.set()


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


op = st.one_of(
    st.tuples(
        st.just("submit"),
        st.sampled_from([None, 0.003, 0.012]),  # timeout
        st.sampled_from([OK, OK, OK, RAISES, EXITS, HANGS, STUBBORN, SLOW]),
        st.sampled_from([0, 0, 1]),  # priority
    ),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("advance"), st.sampled_from([0.001, 0.004, 0.011])),
    st.tuples(st.just("release")),
)

config = st.fixed_dictionaries(
    {
        "max_batch_size": st.integers(1, 4),
        "max_wait_ms": st.sampled_from([0, 2]),
        "max_concurrent_batches": st.integers(1, 2),
        "max_queue_size": st.sampled_from([None, 4]),
        "on_error": st.sampled_from(["isolate", "fail_batch"]),
        "policy": st.sampled_from(["fixed", "adaptive"]),
        "batch_timeout": st.sampled_from([0.006, 0.02]),
    }
)


async def scenario(cfg: dict[str, Any], ops: list[tuple[Any, ...]], cancel_pending: bool) -> None:
    try:
        await _scenario(cfg, ops, cancel_pending)
    finally:  # end what a failed example left behind (a STUBBORN fn outlives one cancellation)
        for _ in range(3):
            for t in asyncio.all_tasks() - {asyncio.current_task()}:
                t.cancel()
            await settle()


async def _scenario(cfg: dict[str, Any], ops: list[tuple[Any, ...]], cancel_pending: bool) -> None:
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    clock = ManualClock()
    model = FaultyModel(clock)
    b = DynamicBatcher(model, clock=clock, **cfg)
    tasks: list[asyncio.Task[Any]] = []
    items: list[int] = []
    resolutions: dict[int, int] = {}

    def submit(item: int, timeout: float | None = None, priority: int = 0) -> None:
        task = asyncio.create_task(b.submit(item, timeout=timeout, priority=priority))
        k = len(tasks)
        task.add_done_callback(lambda _t: resolutions.__setitem__(k, 1 + resolutions.get(k, 0)))
        items.append(item)
        tasks.append(task)

    for o in ops:
        if o[0] == "submit":
            _, timeout, flag, priority = o
            submit(len(tasks) * 10 + flag, timeout, priority)
        elif o[0] == "cancel" and tasks:
            tasks[o[1] % len(tasks)].cancel()
        elif o[0] == "advance":
            clock.advance(o[1])
        elif o[0] == "release":
            model.release()
        await settle()

    # Every item resolves without closing, and every slot frees: hung batches (whose callers may
    # all have gone) pass batch_timeout.
    for _ in range(200):
        await settle()
        st = b.statistics()
        if all(t.done() for t in tasks) and st.batches_in_flight == 0 and st.queue_depth == 0:
            break
        model.release()
        clock.advance(0.005)
    assert all(t.done() for t in tasks), "an item never resolved while the batcher was open"
    assert b.statistics().batches_in_flight == 0, "a slot stayed taken"

    # The batcher keeps serving afterwards: a plain item runs and succeeds.
    submit(len(tasks) * 10 + OK)
    served = tasks[-1]
    for _ in range(20):
        await settle()
        if served.done():
            break
        model.release()
        clock.advance(0.001)  # max_wait_ms may hold a lone item for company
    assert served.done() and served.result() == items[-1] * 2, "the batcher stopped serving"

    # A hung batch at close time: aclose(timeout=...) still returns and fails it.
    submit(len(tasks) * 10 + HANGS)
    await settle()
    closer = asyncio.create_task(b.aclose(cancel_pending=cancel_pending, timeout=0.05))
    for _ in range(200):
        await settle()
        if closer.done() and all(t.done() for t in tasks):
            break
        model.release()
        clock.advance(0.005)
    assert closer.done(), "aclose(timeout=...) did not return"
    await closer
    assert all(t.done() for t in tasks), "a submitted item never resolved"
    assert all(resolutions.get(k) == 1 for k in range(len(tasks))), "resolved more than once"
    assert loop_errors == [], loop_errors  # a future resolved twice, a task's error unretrieved

    outcome = dict.fromkeys(("ok", "failed", "rejected", "expired", "cancelled"), 0)
    for item, t in zip(items, tasks):
        if t.cancelled():
            outcome["cancelled"] += 1
            continue
        e = t.exception()
        if e is None:
            assert t.result() == item * 2
            outcome["ok"] += 1
        elif isinstance(e, QueueFull):
            outcome["rejected"] += 1
        elif isinstance(e, DeadlineExceeded):
            outcome["expired"] += 1
        elif isinstance(e, ClosedError):
            outcome["cancelled"] += 1
        else:
            assert isinstance(e, ValueError | BatchError), repr(e)
            if isinstance(e, BatchError) and isinstance(e.__cause__, SystemExit):
                pass  # contained to its batch
            outcome["failed"] += 1
    stats = b.statistics()
    assert stats.requests_submitted == len(tasks)
    assert {
        "ok": stats.requests_ok,
        "failed": stats.requests_failed,
        "rejected": stats.requests_rejected,
        "expired": stats.requests_expired,
        "cancelled": stats.requests_cancelled,
    } == outcome
    assert stats.queue_depth == 0 and stats.batches_in_flight == 0
    model.release()
    await settle()


@pytest.mark.timeout(120)
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(cfg=config, ops=st.lists(op, max_size=30), cancel_pending=st.booleans())
def test_faults_never_lose_an_item_and_the_batcher_keeps_serving(
    cfg: dict[str, Any], ops: list[tuple[Any, ...]], cancel_pending: bool
) -> None:
    asyncio.run(scenario(cfg, ops, cancel_pending))

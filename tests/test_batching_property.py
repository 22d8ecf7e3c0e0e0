"""Every submitted item resolves exactly once, whatever the schedule (hypothesis, fake clock)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastinfer import BatchError, ClosedError, DeadlineExceeded, DynamicBatcher, QueueFull
from fastinfer.testing import ManualClock

BAD, RETURNS_ERROR = 1, 2  # item % 10 flags


class GatedModel:
    """Each call waits for ``release()``; flagged items raise or come back as an Exception."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, items: list[int]) -> list[Any]:
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if any(x % 10 == BAD for x in items):
            raise ValueError("bad item in batch")
        return [KeyError(x) if x % 10 == RETURNS_ERROR else x * 2 for x in items]

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
        st.sampled_from([None, 0.002, 0.010]),  # timeout
        st.sampled_from([0, 0, 0, BAD, RETURNS_ERROR]),  # flag
        st.sampled_from([0, 0, 1]),  # priority
    ),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.sampled_from([0.0005, 0.002, 0.006])),
    st.tuples(st.just("release")),
    st.tuples(st.just("configure"), st.integers(1, 4)),
)

config = st.fixed_dictionaries(
    {
        "max_batch_size": st.integers(1, 4),
        "max_wait_ms": st.sampled_from([0, 1, 3]),
        "max_concurrent_batches": st.integers(1, 2),
        "max_queue_size": st.sampled_from([None, 3]),
        "on_error": st.sampled_from(["isolate", "fail_batch"]),
        "policy": st.sampled_from(["fixed", "adaptive"]),
        "bucket_window": st.sampled_from([None, 4]),
        "latency_target_ms": st.sampled_from([None, None, 8]),
    }
)


async def scenario(cfg: dict[str, Any], ops: list[tuple[Any, ...]], cancel_pending: bool) -> None:
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    clock, model = ManualClock(), GatedModel()
    length_fn = (lambda x: x // 10 % 5) if cfg["bucket_window"] else None
    b = DynamicBatcher(model, clock=clock, length_fn=length_fn, **cfg)
    tasks: list[asyncio.Task[Any]] = []
    items: list[int] = []
    cancelled_before_run: set[int] = set()
    for o in ops:
        if o[0] == "submit":
            _, timeout, flag, priority = o
            item = len(tasks) * 10 + flag
            items.append(item)
            tasks.append(asyncio.create_task(b.submit(item, timeout=timeout, priority=priority)))
        elif o[0] == "cancel" and tasks:
            k = o[1] % len(tasks)
            if not tasks[k].done():
                seen = {x for batch in model.batches for x in batch}
                if items[k] not in seen:
                    cancelled_before_run.add(items[k])
                tasks[k].cancel()
        elif o[0] == "advance":
            clock.advance(o[1])
        elif o[0] == "release":
            model.release()
        elif o[0] == "configure":
            b.configure(max_batch_size=o[1])
        await settle()
    closer = asyncio.create_task(b.aclose(cancel_pending=cancel_pending))
    for _ in range(500):  # drive the fake world until everything is resolved
        await settle()
        if closer.done() and all(t.done() for t in tasks):
            break
        model.release()
        clock.advance(0.005)
    assert closer.done(), "aclose() never finished: something hangs"
    await closer
    assert all(t.done() for t in tasks), "a submitted item never resolved"
    assert loop_errors == [], loop_errors  # e.g. a future resolved twice

    outcome = {"ok": 0, "failed": 0, "rejected": 0, "expired": 0, "cancelled": 0}
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
            assert cancel_pending
            outcome["cancelled"] += 1
        else:
            assert isinstance(e, ValueError | KeyError | BatchError), e
            if isinstance(e, KeyError):
                assert item % 10 == RETURNS_ERROR
            if isinstance(e, ValueError) and cfg["on_error"] == "isolate":
                assert item % 10 == BAD  # isolation: only bad items fail
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
    ran = {x for batch in model.batches for x in batch}
    assert not (ran & cancelled_before_run), "a cancelled queued item ran"


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(cfg=config, ops=st.lists(op, max_size=40), cancel_pending=st.booleans())
def test_every_item_resolves_exactly_once(
    cfg: dict[str, Any], ops: list[tuple[Any, ...]], cancel_pending: bool
) -> None:
    asyncio.run(scenario(cfg, ops, cancel_pending))

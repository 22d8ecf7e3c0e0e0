"""A queued request and the records the batcher keeps while it runs (private)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastinfer.batching._loop import Handle
from fastinfer.batching._threads import Aborted, Call

__all__ = [
    "DISCARD",
    "DONE",
    "QUEUED",
    "RUNNING",
    "Aborted",
    "BatchRun",
    "ContractError",
    "Request",
    "Started",
]

QUEUED, RUNNING, DONE = 0, 1, 2  # request states
DISCARD = object()


class ContractError(Exception):
    """fn broke the result contract (wrong length, unsplittable output): fail, do not bisect."""


class Request:
    __slots__ = (
        "arrival",
        "cost",
        "deadline",
        "future",
        "item",
        "length",
        "priority",
        "probe",
        "started",
        "state",
        "timer",
    )

    def __init__(self, item: Any, future: asyncio.Future[Any], arrival: float, priority: int):
        self.item = item
        self.future = future
        self.arrival = arrival
        self.priority = priority
        self.deadline: float | None = None
        self.cost = 1.0
        self.length = 0
        self.started: float | None = None
        self.state = QUEUED
        self.timer: Handle | None = None
        self.probe = False  # runs although the cost model predicts it cannot make its deadline


class Started:
    """A first call of ``fn`` already running in the worker thread (see ``_start``)."""

    __slots__ = ("call", "ctx", "future", "size", "t0")

    def __init__(
        self, future: asyncio.Future[Any], call: Call, ctx: Any, size: int, t0: float
    ) -> None:
        self.future, self.call, self.ctx, self.size, self.t0 = future, call, ctx, size, t0


class BatchRun:
    """A batch from its launch until its callers are resolved: by its task when ``fn`` returns,
    or earlier when it is given up (``batch_timeout``, a close that timed out)."""

    __slots__ = (
        "active",
        "bid",
        "call",
        "calls",
        "compute_at",
        "end_at",
        "finished",
        "probe",
        "reason",
        "reqs",
        "task",
    )

    def __init__(self, bid: int, reqs: list[Request], reason: str, end_at: float) -> None:
        self.bid, self.reqs, self.reason = bid, reqs, reason
        self.end_at = end_at  # predicted end, for admission and retry_after
        # when fn began computing it (None: prefetched, queued in fn behind a running batch)
        self.compute_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.call: Call | None = None  # the sync call running in a worker thread now
        self.calls = 0  # calls of fn started so far (the first, then bisection's)
        self.active = False  # call number ``calls`` has not returned yet
        self.finished = False  # its slot is free and its callers are resolved (or being)
        self.probe = any(r.probe for r in reqs)

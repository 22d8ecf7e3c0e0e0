"""A queued request and the records the batcher keeps while it runs (private)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastinfer.batching._loop import Handle

__all__ = ["DISCARD", "DONE", "QUEUED", "RUNNING", "ContractError", "Request", "Started"]

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


class Started:
    """A first call of ``fn`` already running in the worker thread (see ``_start``)."""

    __slots__ = ("ctx", "future", "size", "t0")

    def __init__(self, future: asyncio.Future[Any], ctx: Any, size: int, t0: float) -> None:
        self.future, self.ctx, self.size, self.t0 = future, ctx, size, t0

"""Admission: what ``submit`` does on the batcher's loop before a request waits (private part).

A request is refused at once (``QueueFull``) when the queue is full or, with a latency target,
when its predicted latency misses the target, except on an idle batcher, where a request the
cost model calls hopeless runs as a probe that corrects the model: an estimate inflated by one
slow call cannot refuse everything for good.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import math
import operator
from collections import deque
from typing import Any

from fastinfer.batching._config import optional_positive
from fastinfer.batching._core import HEADROOM, OPEN, BatcherCore, stop_error
from fastinfer.batching._records import RequestRecord
from fastinfer.batching._request import Request
from fastinfer.errors import ConfigError, QueueFull

__all__ = ["Admission"]


class Admission(BatcherCore):
    """Admission control and queueing of one request."""

    def _enqueue(self, item: Any, timeout: float | None, priority: int) -> asyncio.Future[Any]:
        if self._state != OPEN:
            raise self._closed_error()
        if timeout is not None:
            optional_positive("timeout", timeout, " (seconds)")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"priority must be an int (higher runs first), got {priority!r}")
        now = self._clock.time()
        self._arrivals.observe(now)
        self._counts["submitted"] += 1
        if self._max_queue_size is not None and self._depth >= self._max_queue_size:
            retry = self._retry_after(now)
            self._reject(now, priority)
            raise QueueFull(
                f"{self._name} queue is full ({self._depth} requests waiting, "
                f"max_queue_size={self._max_queue_size}); retry after ~{retry * 1000:.0f} ms",
                retry_after=retry,
            )
        probe = False
        if self._target is not None:
            predicted = self._predict_latency(now, self._depth + 1)
            plan = self._target * HEADROOM
            if predicted is not None and predicted > plan and self._idle() and self._may_probe(now):
                # Idle, yet even a lone request is predicted to miss the target: refusing it
                # would refuse everything for good, with nothing run to correct the estimate.
                # It runs as a probe (it gets DeadlineExceeded at the target if it is slow).
                probe = True
            elif predicted is not None and predicted > plan:
                retry = max(predicted - plan, self._cost.predict(1))
                self._reject(now, priority)
                raise QueueFull(
                    f"{self._name} would miss latency_target_ms={self._target * 1000:g}: predicted "
                    f"latency {predicted * 1000:.1f} ms with {self._depth} requests waiting (over "
                    f"the {plan * 1000:.3g} ms it plans for, {HEADROOM:.0%} of the target); retry after "
                    f"~{retry * 1000:.0f} ms",
                    retry_after=retry,
                )
        assert self._loop is not None
        who = "cost_fn"
        try:
            cost = float(self._cost_fn(item)) if self._cost_fn is not None else 1.0
            who = "length_fn"
            length = self._length_fn(item) if self._bucket_window is not None else 0
        except (StopIteration, StopAsyncIteration) as e:  # would end the caller's iteration
            self._counts["failed"] += 1
            raise stop_error(self._name, who, e) from e
        except BaseException:
            self._counts["failed"] += 1
            raise
        fut: asyncio.Future[Any] = self._loop.create_future()
        req = Request(item, fut, now, priority)
        req.cost, req.length, req.probe = cost, length, probe
        limit = timeout if timeout is not None else self._timeout
        deadline = None if limit is None else now + limit
        if self._target is not None:
            deadline = now + self._target if deadline is None else min(deadline, now + self._target)
        if deadline is not None:
            req.deadline = deadline
            req.timer = self._clock.call_at(
                deadline, functools.partial(self._on_loop, self._expire, req)
            )
        fut.add_done_callback(functools.partial(self._future_done, req))
        q = self._queues.get(priority)
        if q is None:
            q = self._queues[priority] = deque()
            bisect.insort(self._priorities, priority, key=operator.neg)  # descending
        q.append(req)
        self._depth += 1
        self._queued_cost += cost
        self._schedule()
        return fut

    def _reject(self, now: float, priority: int) -> None:
        self._counts["rejected"] += 1
        self._emit_request(RequestRecord("rejected", 0.0, None, None, priority))

    def _retry_after(self, now: float) -> float:
        if self._cost.ready:
            free = self._slot_free_in(now)
            return free + self._cost.predict(self._effective_max())
        return max(self._max_wait, 0.001)

    def _slot_free_in(self, now: float) -> float:
        ends = [run.end_at for run in self._runs.values() if run.compute_at is not None]
        if len(ends) < self._max_concurrent or not ends:
            return 0.0
        return max(0.0, min(ends) - now)

    def _predict_latency(self, now: float, position: int) -> float | None:
        if not self._cost.ready:
            return None
        cap = self._effective_max()
        batches = math.ceil(position / cap)
        prefetched = sum(run.compute_at is None for run in self._runs.values())  # run first
        rounds = math.ceil((batches + prefetched) / self._max_concurrent)
        last = position - (batches - 1) * cap
        return (
            self._slot_free_in(now)
            + (rounds - 1) * self._cost.upper(cap)
            + self._cost.upper(last if rounds == 1 else cap)
        )

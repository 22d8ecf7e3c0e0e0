"""When a batch is sealed and which queued items go in it (private part of DynamicBatcher)."""

from __future__ import annotations

import bisect
import functools
import math
from collections import deque

from fastinfer.batching._core import HEADROOM, OPEN, BatcherCore
from fastinfer.batching._cost_model import wait_threshold
from fastinfer.batching._request import QUEUED, RUNNING, Request
from fastinfer.errors import DeadlineExceeded

__all__ = ["Forming"]


class Forming(BatcherCore):
    """Batch formation: the dispatch decision, the one timer, FIFO/priority/bucketed selection."""

    # ---------------------------------------------------------------- batch formation

    def _effective_max(self) -> int:
        if self._pad:
            return min(self._max_batch_size, self._preferred[-1])
        return self._max_batch_size

    def _oldest(self) -> Request | None:
        oldest = None
        for p in self._priorities:
            q = self._queues[p]
            while q and q[0].state != QUEUED:
                q.popleft()
            if q and (oldest is None or q[0].arrival < oldest.arrival):
                oldest = q[0]
        return oldest

    def _schedule(self, notify: bool = True) -> None:
        """Dispatch while a slot is free and the policy says go; else arm the one timer."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if len(self._queues) > 2 * self._depth + 8:
            self._compact()  # levels emptied by expiries and cancellations while slots were busy
        now = self._clock.time()
        wake: float | None = None
        shares, share_cap, reason = 0, self._effective_max(), None
        while self._depth > 0 and self._in_flight < self._max_concurrent + self._prefetch:
            if shares == 0 and self._in_flight >= self._max_concurrent:
                # Every slot is busy; fn can queue one more batch (prefetch): sealed by the same
                # policy, whole (not shared out: it runs after the others, not beside them).
                # Holding it until just before a slot frees measured slower (benchmarks/README.md).
                reason, wake = self._decide(now)
                if reason is None:
                    break
                shares, share_cap = 1, self._effective_max()
            elif shares == 0:
                reason, wake = self._decide(now)
                if reason is None:
                    break
                # Several free slots share what is queued: 32 requests and 2 free slots make two
                # batches of 16 running at once, not one of 32 beside an idle slot.
                shares = self._max_concurrent - self._in_flight
                share_cap = min(self._effective_max(), math.ceil(self._depth / shares))
            shares -= 1
            reqs = self._take(now, share_cap)
            if reqs:
                assert reason is not None
                self._launch(reqs, reason, now)
            wake = None
        if wake is None or self._depth == 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, None
        elif wake != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = wake
            self._timer = self._clock.call_at(
                wake, functools.partial(self._on_loop, self._on_timer)
            )
        if notify:
            self._notify_drained()

    def _notify_drained(self) -> None:
        if self._state != OPEN and self._idle():
            for w in self._drain_waiters:
                if not w.done():
                    w.set_result(None)
            self._drain_waiters.clear()

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        self._schedule()

    def _decide(self, now: float) -> tuple[str | None, float | None]:
        if self._state != OPEN:
            return "idle", None  # draining: nothing more can arrive
        if self._depth >= self._effective_max():
            return "full", None
        if self._max_cost is not None and self._queued_cost >= self._max_cost:
            return "full", None
        if self._max_wait <= 0:
            return "idle", None
        oldest = self._oldest()
        if oldest is None:
            return None, None
        wake = oldest.arrival + self._max_wait
        if now >= wake:
            return "wait_expired", None
        ready = self._cost.ready
        if self._target is not None and ready:
            latest = oldest.arrival + self._target * HEADROOM - self._cost.upper(self._depth)
            if now >= latest:
                return ("adaptive" if self._policy == "adaptive" else "wait_expired"), None
            wake = min(wake, latest)
        if self._policy == "adaptive":
            if not ready:
                return "adaptive", None  # cold start: run now and learn the cost
            rate = self._arrivals.rate(now)
            if self._depth >= wait_threshold(rate, self._cost.a, self._cost.b):
                return "adaptive", None
            # Re-decide when the next arrival is overdue: the rate estimate will have dropped
            # (a closed-loop caller never sends more while it waits for us).
            overdue = self._arrivals.overdue_at()
            if overdue is not None and overdue > now:
                wake = min(wake, overdue)
        return None, wake

    def _take(self, now: float, cap: int | None = None) -> list[Request]:
        cap = self._effective_max() if cap is None else cap
        window = max(cap, self._bucket_window or 0)
        cands: list[Request] = []
        for p in self._priorities:
            for r in self._queues[p]:
                if r.state != QUEUED:
                    continue
                if r.future.done():  # cancelled; its done-callback has not run yet
                    self._unqueue(r)
                    self._count("cancelled", r, None)
                    continue
                cands.append(r)
                if len(cands) >= window:
                    break
            if len(cands) >= window:
                break
        if self._bucket_window is not None and len(cands) > cap:
            cands = self._bucket(cands, cap)
        else:
            cands = cands[:cap]
        if self._max_cost is not None:
            total, kept = 0.0, list[Request]()
            for r in cands:
                if kept and total + r.cost > self._max_cost:
                    break  # it waits at the front: FIFO is kept
                kept.append(r)
                total += r.cost
            cands = kept
        if self._preferred and not self._pad and cands:
            i = bisect.bisect_right(self._preferred, len(cands))
            if i:
                cands = cands[: self._preferred[i - 1]]
        if cands and self._cost.ready:
            cands = self._shed_hopeless(cands, now)
        for r in cands:
            self._unqueue(r)
            r.state = RUNNING
            r.started = now
        self._compact()
        return cands

    def _shed_hopeless(self, cands: list[Request], now: float) -> list[Request]:
        """Expire items that cannot finish before their deadline: running them is wasted work.

        When *every* candidate would be shed, nothing would run and an estimate that is too high
        (one slow cold call) would never be corrected: the one with the most time left runs
        alone instead, as a probe, and the others stay queued until it reports the real cost.
        Probes back off while they keep confirming the estimate (see ``_running``).
        """
        done_at = now + self._cost.upper(len(cands))
        hopeless = [
            r for r in cands if not r.probe and r.deadline is not None and r.deadline < done_at
        ]
        if not hopeless:
            return cands
        if len(hopeless) == len(cands) and self._may_probe(now):
            probe = max(cands, key=lambda r: r.deadline or 0.0)
            probe.probe = True
            return [probe]
        keep = [r for r in cands if r.probe or r.deadline is None or r.deadline >= done_at]
        for r in hopeless:
            assert r.deadline is not None
            self._unqueue(r)
            self._count("expired", r, None)
            r.future.set_exception(
                DeadlineExceeded(
                    f"request dropped after {(now - r.arrival) * 1000:.1f} ms: its batch is "
                    f"predicted to finish {(done_at - r.deadline) * 1000:.1f} ms past its deadline"
                )
            )
        return keep

    def _bucket(self, cands: list[Request], cap: int) -> list[Request]:
        """Pick ``cap`` of the windowed candidates with the least padding, always with the oldest."""
        lengths = [r.length for r in cands]
        order = sorted(range(len(cands)), key=lambda i: (lengths[i], i))
        pos = order.index(0)
        prefix = [0]
        for i in order:
            prefix.append(prefix[-1] + lengths[i])
        best: tuple[float, int] | None = None
        best_start = 0
        for start in range(max(0, pos - cap + 1), min(pos, len(order) - cap) + 1):
            end = start + cap
            waste = lengths[order[end - 1]] * cap - (prefix[end] - prefix[start])
            key = (waste, sum(order[start:end]))
            if best is None or key < best:
                best, best_start = key, start
        chosen = sorted(order[best_start : best_start + cap])
        return [cands[i] for i in chosen]

    def _compact(self) -> None:
        """Drop what left the queues; a priority level left empty is dropped too, so a stream of
        distinct priority values cannot grow the structure (or slow every dispatch) for good."""
        emptied = False
        for p in list(self._priorities):
            q = self._queues.get(p)
            if q is None:
                continue
            while q and q[0].state != QUEUED:
                q.popleft()
            if not q:
                del self._queues[p]
                emptied = True
            elif len(q) > 64 and len(q) > 2 * self._depth:  # bucketing leaves holes
                self._queues[p] = deque(r for r in q if r.state == QUEUED)
        if emptied:
            self._priorities = [p for p in self._priorities if p in self._queues]

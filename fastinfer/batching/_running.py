"""Running fn on a sealed batch: hand-off, splitting, error isolation (private part)."""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import functools
import inspect
from collections.abc import Sequence
from typing import Any

from fastinfer.batching._collate import split_output
from fastinfer.batching._core import BatcherCore
from fastinfer.batching._records import BatchRecord
from fastinfer.batching._request import DISCARD, ContractError, Request, Started
from fastinfer.errors import BatchError

__all__ = ["Running"]


class Running(BatcherCore):
    """Executes batches in the executor slots; a failed batch is bisected to its bad items."""

    # ---------------------------------------------------------------- running batches

    def _launch(self, reqs: list[Request], reason: str, now: float) -> None:
        assert self._loop is not None
        self._in_flight += 1
        self._reasons[reason] += 1
        self._batch_ids += 1
        bid = self._batch_ids
        if self._cost.ready:
            self._running_ends[bid] = now + self._cost.predict(len(reqs))
        else:
            self._running_ends[bid] = now
        for r in reqs:
            self._waits.append(now - r.arrival)
        # A sync fn starts in its worker thread now, not when the task first runs: the thread
        # gets going while this loop turn wakes the previous batch's callers.
        started = self._start(reqs)
        task = self._loop.create_task(self._run_batch(bid, reqs, reason, now, started))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._batch_task_done, bid, reqs))

    def _batch_task_done(self, bid: int, reqs: list[Request], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if bid not in self._running_ends:
            return  # _run_batch's finally ran: every request is resolved
        # Cancelled before its first step (the loop shut down): its finally never ran.
        self._running_ends.pop(bid)
        self._in_flight -= 1
        for r in reqs:
            self._resolve(
                r, BatchError(f"{self._name}: the batch was cancelled before it ran"), len(reqs)
            )
        self._schedule()  # the slot is free again, as at the end of _run_batch

    async def _run_batch(
        self, bid: int, reqs: list[Request], reason: str, started: float, call: Started | None
    ) -> None:
        outcomes: list[Any] = []
        padded = self._padded_size(len(reqs))
        try:
            outcomes = await self._execute(reqs, call)
        finally:
            if len(outcomes) != len(reqs):  # interrupted (loop shutting down): still resolve all
                outcomes = [
                    BatchError(f"{self._name}: the batch was interrupted before it finished")
                    for _ in reqs
                ]
            end = self._clock.time()
            self._in_flight -= 1
            self._running_ends.pop(bid, None)
            # Seal and start the next batch before waking this batch's callers: their wake-ups
            # queue behind the new batch's first step, so the executor never idles for them.
            self._schedule(notify=False)
            failed = 0
            for r, o in zip(reqs, outcomes):
                if o is DISCARD:
                    o = BatchError(f"{self._name}: request was not run")  # pragma: no cover
                failed += isinstance(o, BaseException)
                self._resolve(r, o, len(reqs))
            self._batches_run += 1
            self._sizes[len(reqs)] = self._sizes.get(len(reqs), 0) + 1
            self._padded_items += padded - len(reqs)
            self._exec_times.append(end - started)
            if self._on_batch is not None:
                waits = tuple(started - r.arrival for r in reqs)
                self._callback(
                    self._on_batch,
                    BatchRecord(len(reqs), padded, reason, waits, end - started, failed),
                )
            self._notify_drained()  # after the callers are resolved: aclose() returns last

    def _padded_size(self, n: int) -> int:
        if not self._pad:
            return n
        i = bisect.bisect_left(self._preferred, n)
        return self._preferred[i] if i < len(self._preferred) else n

    async def _execute(self, reqs: list[Request], call: Started | None) -> list[Any]:
        try:
            return await self._call(reqs, call)
        except ContractError as e:
            return [BatchError(str(e)) for _ in reqs]
        except Exception as e:
            if len(reqs) == 1:
                return [e]
            if self._on_error == "fail_batch":
                out = []
                for _ in reqs:
                    err = BatchError(
                        f"{self._name}: fn raised {type(e).__name__}: {e} for a batch of "
                        f"{len(reqs)} items (on_error='fail_batch'; on_error='isolate' fails only "
                        "the items that cause it)"
                    )
                    err.__cause__ = e
                    out.append(err)
                return out
            self._bisections += 1
            results: dict[int, Any] = {}
            live = [r for r in reqs if not r.future.done()]
            mid = len(live) // 2
            if mid == 0:
                await self._isolate(live, results)
            else:
                await self._isolate(live[:mid], results)
                await self._isolate(live[mid:], results)
            return [results.get(id(r), DISCARD) for r in reqs]

    async def _isolate(self, group: list[Request], results: dict[int, Any]) -> None:
        group = [r for r in group if not r.future.done()]  # gone callers need no answer
        if not group:
            return
        try:
            values = await self._call(group)
        except ContractError as e:
            values = [BatchError(str(e)) for _ in group]
        except Exception as e:
            if len(group) == 1:
                values = [e]
            else:
                mid = len(group) // 2
                await self._isolate(group[:mid], results)
                await self._isolate(group[mid:], results)
                return
        for r, v in zip(group, values):
            results[id(r)] = v

    def _prepare(self, group: list[Request]) -> tuple[Any, Any, int]:
        """``fn``'s argument for ``group`` (padded to a preferred size, collated), its context."""
        items = [r.item for r in group]
        size = self._padded_size(len(items))
        if size > len(items):
            items.extend([items[-1]] * (size - len(items)))
        if self._collator is None:
            return items, None, size
        batch, ctx = self._collator.collate(items)
        return batch, ctx, size

    def _start(self, group: list[Request]) -> Started | None:
        """Hand a sync fn its batch in the worker thread at once (``None``: the task calls it)."""
        if self._is_async or not self._run_in_thread:
            return None
        assert self._loop is not None
        try:
            arg, ctx, size = self._prepare(group)
            t0 = self._clock.time()
            future = self._loop.run_in_executor(self._pool(), self._fn, arg)
        except Exception:
            return None  # the task tries again and hands the error to the callers like any other
        # If the batch task never runs (its loop shuts down first), nobody awaits this future:
        # read its outcome here so that asyncio does not log an unretrieved exception.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return Started(future, ctx, size, t0)

    async def _call(self, group: list[Request], call: Started | None = None) -> list[Any]:
        n = len(group)
        if call is None:
            arg, ctx, size = self._prepare(group)
            t0 = self._clock.time()
            output = await self._invoke(arg)
        else:
            ctx, size, t0 = call.ctx, call.size, call.t0
            output = await call.future
            if inspect.isawaitable(output):
                output = await output
        results: Sequence[Any]
        if self._collator is not None:
            try:
                results = self._collator.split(output, ctx, size)
            except BatchError as e:
                raise ContractError(f"{self._name}: {e}") from None
            if len(results) != size:
                raise ContractError(
                    f"{self._name}: the collator split fn's output into {len(results)} results for "
                    f"a batch of {size} items"
                )
        else:
            results = self._split_plain(output, size)
        self._cost.observe(size, self._clock.time() - t0)
        return list(results[:n])

    def _split_plain(self, output: Any, size: int) -> Sequence[Any]:
        if isinstance(output, list | tuple):
            if len(output) != size:
                raise ContractError(
                    f"{self._name}: fn returned {len(output)} results for a batch of {size} items; "
                    "it must return exactly one result per item, in order"
                )
            return output
        try:
            return split_output(output, size)
        except BatchError as e:
            raise ContractError(f"{self._name}: {e}") from None

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._max_concurrent, thread_name_prefix=f"fastinfer-{self._name}"
            )
        return self._executor

    async def _invoke(self, arg: Any) -> Any:
        if self._is_async:
            result = await self._fn(arg)
        elif self._run_in_thread:
            assert self._loop is not None
            result = await self._loop.run_in_executor(self._pool(), self._fn, arg)
        else:
            result = self._fn(arg)
        if inspect.isawaitable(result):
            result = await result
        return result

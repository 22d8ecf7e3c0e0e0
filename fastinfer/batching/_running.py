"""Running fn on a sealed batch: hand-off, splitting, error isolation, giving up (private part).

Faults stay inside the batch that met them: an ``Exception`` is bisected to the items that cause
it (a ``StopIteration`` or ``StopAsyncIteration``, which asyncio cannot hand to a caller as it is,
first becomes a ``BatchError``); a ``BaseException`` that is not a cancellation (``SystemExit``,
``KeyboardInterrupt``...) fails that batch's callers with a ``BatchError`` and never reaches the
event loop; a call that outlives ``batch_timeout`` is given up: an async ``fn`` is cancelled, a
sync one's thread is abandoned and replaced, its callers get ``DeadlineExceeded`` and its slot is
free at once. Whatever goes wrong, every caller of a batch is resolved.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import inspect
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastinfer.batching._collate import is_tensor_or_array, split_output
from fastinfer.batching._core import IN_FN, BatcherCore, stop_error
from fastinfer.batching._records import BatchRecord
from fastinfer.batching._request import DISCARD, BatchRun, ContractError, Request, Started
from fastinfer.batching._threads import Aborted, SlotPool
from fastinfer.errors import BatchError, DeadlineExceeded

__all__ = ["Running"]

logger = logging.getLogger("fastinfer.batching")

PROBE_BACKOFF_MAX = 30.0  # seconds between cost probes that keep confirming a high estimate
_PENDING = (types.CoroutineType, asyncio.Future)  # results that would reach callers unawaited


class Running(BatcherCore):
    """Executes batches in the executor slots; a failed batch is bisected to its bad items."""

    # ---------------------------------------------------------------- running batches

    def _launch(self, reqs: list[Request], reason: str, now: float) -> None:
        assert self._loop is not None
        self._in_flight += 1
        self._reasons[reason] += 1
        self._batch_ids += 1
        computing = sum(r.compute_at is not None for r in self._runs.values())
        run = BatchRun(self._batch_ids, reqs, reason, now)
        if computing < self._max_concurrent:  # else prefetched: it starts when a slot frees
            self._compute(run, now)
        self._runs[run.bid] = run
        self._probes += run.probe
        for r in reqs:
            self._waits.append(now - r.arrival)
        # A sync fn starts in its worker thread now, not when the task first runs: the thread
        # gets going while this loop turn wakes the previous batch's callers.
        started = self._start(run)
        run.task = self._loop.create_task(self._run_batch(run, now, started))
        self._tasks.add(run.task)
        run.task.add_done_callback(functools.partial(self._batch_task_done, run))

    def _compute(self, run: BatchRun, now: float) -> None:
        """``run`` holds a slot from ``now``: its predicted end (admission, prefetch timing)."""
        run.compute_at = now
        run.end_at = now + self._cost.predict(len(run.reqs)) if self._cost.ready else now

    def _release(self, run: BatchRun) -> None:
        """Free the batch's slot (once: by its task, or when it is given up); the oldest
        prefetched batch takes it (``fn`` queues them in order, as a pool's workers do)."""
        run.finished = True
        self._runs.pop(run.bid, None)
        self._in_flight -= 1
        if run.compute_at is not None:
            waiting = next((r for r in self._runs.values() if r.compute_at is None), None)
            if waiting is not None:
                self._compute(waiting, self._clock.time())

    def _batch_task_done(self, run: BatchRun, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:  # a bug in the batcher: its callers must not wait for good
            logger.error(
                "%s: a batch task failed (%s: %s); its unresolved callers get a BatchError",
                self._name,
                type(error).__name__,
                error,
                exc_info=error,
            )
        elif run.finished:
            return  # resolved by _run_batch's finally, or given up
        # Cancelled before its first step (the loop shut down: its finally never ran), or failed.
        if not run.finished:
            self._release(run)
        why = (
            "was cancelled before it ran"
            if error is None
            else f"failed inside the batcher ({type(error).__name__}: {error})"
        )
        for r in run.reqs:
            self._resolve(r, BatchError(f"{self._name}: the batch {why}"), len(run.reqs))
        self._schedule()  # the slot is free again, as at the end of _run_batch

    async def _run_batch(self, run: BatchRun, started: float, call: Started | None) -> None:
        outcomes: list[Any] = []
        dropped = False
        try:
            outcomes = await self._execute(run, call)
        except GeneratorExit:
            # The coroutine is being closed outside its loop: the loop was dropped with this batch
            # pending (a loop left stopped, then collected). That loop runs nothing any more, and
            # the batcher may be bound to another one by now: leave its state alone.
            dropped = True
            raise
        finally:
            if not run.finished and not dropped:  # else given up (batch_timeout, close)
                reqs = run.reqs
                if len(outcomes) != len(reqs):  # interrupted (loop shutting down): resolve all
                    outcomes = [
                        BatchError(f"{self._name}: the batch was interrupted before it finished")
                        for _ in reqs
                    ]
                end = self._clock.time()
                self._release(run)
                # Seal and start the next batch before waking this batch's callers: their
                # wake-ups queue behind the new batch's first step, so the executor never idles.
                self._schedule(notify=False)
                failed = 0
                for r, o in zip(reqs, outcomes):
                    if o is DISCARD:
                        o = BatchError(f"{self._name}: request was not run")  # pragma: no cover
                    failed += isinstance(o, BaseException)
                    self._resolve(r, o, len(reqs))
                self._account(run, started, end, failed)
                self._notify_drained()  # after the callers are resolved: aclose() returns last

    def _account(self, run: BatchRun, started: float, end: float, failed: int) -> None:
        n = len(run.reqs)
        padded = self._padded_size(n)
        self._batches_run += 1
        self._sizes[n] = self._sizes.get(n, 0) + 1
        self._padded_items += padded - n
        self._exec_times.append(end - started)
        if run.probe:
            self._probe_done(run, started, end)
        if self._on_batch is not None:
            waits = tuple(started - r.arrival for r in run.reqs)
            self._callback(
                self._on_batch,
                BatchRecord(n, padded, run.reason, waits, end - started, failed),
            )

    def _probe_done(self, run: BatchRun, started: float, end: float) -> None:
        """A probe that missed its deadline confirmed the estimate: back off before the next."""
        missed = any(r.probe and r.deadline is not None and end > r.deadline for r in run.reqs)
        if missed:
            self._probe_backoff = min(
                PROBE_BACKOFF_MAX, max(2 * self._probe_backoff, end - started, 1e-3)
            )
            self._probe_at = end + self._probe_backoff
        else:
            self._probe_backoff, self._probe_at = 0.0, float("-inf")

    def _give_up(self, run: BatchRun, error: Callable[[], BaseException], outcome: str) -> None:
        """Stop waiting for ``run``: free its slot, stop ``fn``, fail its remaining callers."""
        if run.finished:
            return
        now = self._clock.time()
        self._release(run)
        if run.call is not None and self._executor is not None:
            self._executor.abandon(run.call)  # a hung thread is replaced, not waited for
        if run.task is not None and not run.task.done():
            run.task.cancel()  # an async fn is cancelled at its current await
        n = len(run.reqs)
        for r in run.reqs:
            self._fail(r, error(), outcome, n)
        started = min((r.started for r in run.reqs if r.started is not None), default=now)
        self._account(run, started, now, n)
        self._schedule()

    def _call_timed_out(self, run: BatchRun, seq: int) -> None:
        if run.finished or run.calls != seq or not run.active:
            return  # that call returned meanwhile
        self._timed_out += 1
        limit = self._batch_timeout
        how = "its task was cancelled" if self._is_async else "its worker thread was abandoned"
        msg = (
            f"{self._name}: fn did not return within batch_timeout={limit:g} s, so its batch of "
            f"{len(run.reqs)} items was given up ({how}; the slot serves the next batch). Fix: "
            "find why fn hangs, or set batch_timeout above the slowest legitimate batch (a cold "
            "first call included)"
        )
        if self._timed_out == 1:
            logger.error("%s (logged once; counted in statistics().batches_timed_out)", msg)
        self._give_up(run, lambda: DeadlineExceeded(msg), "expired")

    def _padded_size(self, n: int) -> int:
        if not self._pad:
            return n
        i = bisect.bisect_left(self._preferred, n)
        return self._preferred[i] if i < len(self._preferred) else n

    def _aborted(self, e: Aborted, n: int) -> list[Any]:
        cause = e.cause
        self._aborted_batches += 1
        logger.error(
            "%s: fn raised %s (a BaseException) for a batch of %d items; contained: those callers "
            "get a BatchError",
            self._name,
            type(cause).__name__,
            n,
            exc_info=cause,
        )
        out = []
        for _ in range(n):
            err = BatchError(
                f"{self._name}: fn raised {type(cause).__name__}({cause}) for a batch of {n} "
                "items; a BaseException from fn fails only that batch's callers. Fix: raise an "
                "Exception subclass for a bad input, and do not exit the process from fn"
            )
            err.__cause__ = cause
            out.append(err)
        return out

    async def _execute(self, run: BatchRun, call: Started | None) -> list[Any]:
        reqs = run.reqs
        try:
            return await self._call(run, reqs, call)
        except ContractError as e:
            return [BatchError(str(e)) for _ in reqs]
        except Aborted as e:
            return self._aborted(e, len(reqs))
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
                await self._isolate(run, live, results)
            else:
                await self._isolate(run, live[:mid], results)
                await self._isolate(run, live[mid:], results)
            return [results.get(id(r), DISCARD) for r in reqs]

    async def _isolate(self, run: BatchRun, group: list[Request], results: dict[int, Any]) -> None:
        group = [r for r in group if not r.future.done()]  # gone callers need no answer
        if not group:
            return
        try:
            values = await self._call(run, group)
        except ContractError as e:
            values = [BatchError(str(e)) for _ in group]
        except Aborted as e:
            values = self._aborted(e, len(group))
        except Exception as e:
            if len(group) == 1:
                values = [e]
            else:
                mid = len(group) // 2
                await self._isolate(run, group[:mid], results)
                await self._isolate(run, group[mid:], results)
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

    def _start(self, run: BatchRun) -> Started | None:
        """Hand a sync fn its batch in the worker thread at once (``None``: the task calls it)."""
        if self._is_async or not self._run_in_thread:
            return None
        assert self._loop is not None
        try:
            arg, ctx, size = self._prepare(run.reqs)
            t0 = self._clock.time()
            call = run.call = self._pool().submit(self._run_fn, arg)
        except BaseException:  # the task tries again and contains it
            return None
        future = asyncio.wrap_future(call.future, loop=self._loop)
        # If the batch task never runs (its loop shuts down first), nobody awaits this future:
        # read its outcome here so that asyncio does not log an unretrieved exception.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return Started(future, call, ctx, size, t0)

    async def _call(
        self, run: BatchRun, group: list[Request], call: Started | None = None
    ) -> list[Any]:
        n = len(group)
        run.calls += 1
        seq = run.calls
        timer = None
        token = IN_FN.set(self)  # submit() to this batcher from inside fn would deadlock
        who = "fn"
        try:
            if call is None:
                who = "the collator's collate()"
                arg, ctx, size = self._prepare(group)
                who = "fn"
                t0 = self._clock.time()
                output: Any = self._invoke(run, arg)
            else:
                ctx, size, t0 = call.ctx, call.size, call.t0
                run.call = call.call
                output = call.future
            if self._batch_timeout is not None:
                run.active = True
                timer = self._clock.call_at(
                    t0 + self._batch_timeout,
                    functools.partial(self._on_loop, self._call_timed_out, run, seq),
                )
            output = await output
            if inspect.isawaitable(output):
                output = await output
        except (StopIteration, StopAsyncIteration) as e:  # never handed to a caller as it is
            raise stop_error(self._name, who, e) from e
        except (Exception, asyncio.CancelledError):
            raise  # a cancellation keeps its meaning; an Exception is isolated by the caller
        except BaseException as e:  # SystemExit, KeyboardInterrupt...: contained to this batch
            task = run.task
            if isinstance(e, GeneratorExit) and (
                task is None or asyncio.current_task(task.get_loop()) is not task
            ):
                raise  # not fn's: the coroutine is being closed from outside its task (see above)
            raise Aborted(e) from e
        finally:
            try:
                IN_FN.reset(token)
            except ValueError:  # closed from outside its task, in another context: nothing to undo
                pass
            run.active = False
            run.call = None
            if timer is not None:
                timer.cancel()
        results: Sequence[Any]
        if self._collator is not None:
            try:
                results = self._collator.split(output, ctx, size)
            except BatchError as e:
                raise ContractError(f"{self._name}: {e}") from None
            except (StopIteration, StopAsyncIteration) as e:
                raise stop_error(self._name, "the collator's split()", e) from e
            if len(results) != size:
                raise ContractError(
                    f"{self._name}: the collator split fn's output into {len(results)} results for "
                    f"a batch of {size} items"
                )
        else:
            results = self._split_plain(output, size)
        if not run.finished:  # a call that outlived batch_timeout is no measure of the cost
            # a prefetched batch waited in fn's queue until a slot freed: that is not its cost
            start = t0 if run.compute_at is None else max(t0, run.compute_at)
            self._cost.observe(size, self._clock.time() - start)
        return list(results[:n])

    def _split_plain(self, output: Any, size: int) -> Sequence[Any]:
        """fn's output (no collator) -> one result per item, as :func:`split_output` reads it.

        A list is one result per item; a tuple is batched outputs such as ``(logits, hidden)``,
        split element-wise; only a tuple of plain values (no tensor, array, list, tuple or dict
        in it, so it cannot be split so) with one per item is read as per-item results.
        """
        if isinstance(output, list) or (isinstance(output, tuple) and not output):
            if len(output) != size:
                raise ContractError(
                    f"{self._name}: fn returned {len(output)} results for a batch of {size} items; "
                    "it must return exactly one result per item, in order"
                )
            return self._refuse_pending(output)
        if isinstance(output, tuple):
            try:
                return split_output(output, size)
            except BatchError as e:
                if len(output) == size and not any(_splittable(v) for v in output):
                    return self._refuse_pending(output)
                raise ContractError(
                    f"{self._name}: fn returned a tuple of {len(output)} elements, read as "
                    "batched outputs (like (logits, hidden), each with the batch on dim 0) and "
                    f"split element-wise, but {e}. To return one result per item, return a list"
                ) from None
        try:
            return split_output(output, size)
        except BatchError as e:
            raise ContractError(f"{self._name}: {e}") from None

    def _refuse_pending(self, results: Sequence[Any]) -> Sequence[Any]:
        """Results go to the callers as they are: a coroutine among them would never run."""
        pending = [r for r in results if isinstance(r, _PENDING)]
        if not pending:
            return results
        for r in pending:
            if isinstance(r, types.CoroutineType):
                r.close()  # never started: closing it spares the "never awaited" warning
        first = pending[0]
        raise ContractError(
            f"{self._name}: fn returned {len(pending)} unawaited "
            f"{type(first).__name__}{'s' if len(pending) > 1 else ''} "
            f"({getattr(first, '__qualname__', first)!s:.80}) among its {len(results)} results; "
            "a result goes to its caller as it is, so it would never run. Fix: declare fn "
            "`async def` and await them inside it (results = await asyncio.gather(*coroutines))"
        )

    def _pool(self) -> SlotPool:
        if self._executor is None:
            self._executor = SlotPool(
                self._max_concurrent,  # prefetched batches queue in it
                self._name,
                max_abandoned=max(8, 4 * self._max_concurrent),
            )
        return self._executor

    def _run_fn(self, arg: Any) -> Any:
        """Call a sync ``fn`` (in a worker thread, or inline). A StopIteration it raises becomes
        a BatchError here: asyncio cannot copy one from the thread's future into its own (the
        batch hung), and inline, Python would make it a bare RuntimeError."""
        try:
            return self._fn(arg)
        except (StopIteration, StopAsyncIteration) as e:
            raise stop_error(self._name, "fn", e) from e

    async def _invoke(self, run: BatchRun, arg: Any) -> Any:
        if self._is_async:
            result = await self._fn(arg)
        elif self._run_in_thread:
            assert self._loop is not None
            call = run.call = self._pool().submit(self._run_fn, arg)
            result = await asyncio.wrap_future(call.future, loop=self._loop)
        else:
            result = self._run_fn(arg)
        if inspect.isawaitable(result):
            result = await result
        return result


def _splittable(value: Any) -> bool:
    """Could be (part of) a batched output: never read as one item's plain result."""
    return isinstance(value, list | tuple | Mapping) or is_tensor_or_array(value)

"""PinnedPool under faults: BaseExceptions raised in ``fn``, answers the parent cannot rebuild,
workers that die leaving a child holding their socket, ``fn`` changing its input in place, and
replacements that are slow to start, keep crashing or never start.

Each contained failure is checked three ways: what the caller gets, that the worker is the same
process afterwards (same pid, its call counter continuing: it was neither killed nor restarted),
and that the call ran exactly once (no retry, even with ``idempotent=True``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _pool_fault_helpers as h
import psutil
import pytest
import torch

from fastinfer import ClosedError, PinnedPool, WorkerCrashed, WorkerError
from fastinfer.pool import _link as pool_link
from fastinfer.pool import _slots as pool_slots

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pool() -> Iterator[PinnedPool]:
    # One worker, idempotent: a crash would be retried, so "ran once" and "same worker" catch any
    # path that still treats these answers as a crash.
    with PinnedPool(h.init, h.serve, workers=1, idempotent=True, load_warning_threshold=None) as p:
        yield p


def _outcome(fut: concurrent.futures.Future[Any]) -> BaseException | None:
    try:
        fut.result(timeout=60)
    except BaseException as exc:  # SystemExit / KeyboardInterrupt must not get this far
        return exc
    return None


def _same_worker_ran_once(pool: PinnedPool, before: tuple[int, int]) -> None:
    pid, calls = pool.submit("who").result(timeout=60)
    assert pid == before[0], "the worker was replaced"
    assert calls == before[1] + 2, "the failing call ran more than once (or not at all)"
    s = pool.statistics()
    assert s.crashes == 0 and s.retries == 0 and s.worker_restarts_total == 0


@pytest.mark.parametrize(
    ("item", "described", "original"),
    [
        (("sys.exit", 3), "SystemExit(3)", SystemExit),
        ("KeyboardInterrupt", "KeyboardInterrupt()", KeyboardInterrupt),
        ("Stop", "_pool_fault_helpers.Stop('stop here')", h.Stop),
    ],
    ids=["SystemExit", "KeyboardInterrupt", "custom-BaseException"],
)
def test_a_base_exception_in_fn_is_a_worker_error_and_the_worker_keeps_serving(
    pool: PinnedPool, item: Any, described: str, original: type[BaseException]
) -> None:
    before = pool.submit("who").result(timeout=60)
    got = _outcome(pool.submit(item))
    assert isinstance(got, WorkerError) and not isinstance(got, WorkerCrashed), repr(got)
    assert f"the call raised {described} in worker 0" in str(got)
    assert "keeps serving" in str(got) and "_pool_fault_helpers.py" in str(got)  # its traceback
    assert isinstance(got.__cause__, original)  # the original, for those who want it
    _same_worker_ran_once(pool, before)


def test_system_exit_in_fn_leaves_the_callers_event_loop_running(pool: PinnedPool) -> None:
    ticks: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(1)
            await asyncio.sleep(0)

    async def main() -> tuple[str, Any]:
        task = asyncio.create_task(ticker())
        try:
            await pool.run(("sys.exit", 0))
        except WorkerError as exc:
            caught = type(exc).__name__
        else:
            caught = "nothing"
        after = await pool.run(("echo", "still here"))  # the loop and the pool both carry on
        task.cancel()
        return caught, after

    try:
        caught, after = asyncio.run(main())
    except BaseException as exc:  # before the fix: SystemExit tore down asyncio.run
        pytest.fail(f"{type(exc).__name__} escaped into the event loop")
    assert caught == "WorkerError" and after == ("echo", "still here") and ticks


@pytest.mark.parametrize("via", ["submit", "run"])
def test_an_exception_the_parent_cannot_rebuild_is_a_worker_error_with_the_traceback(
    pool: PinnedPool, via: str
) -> None:
    before = pool.submit("who").result(timeout=60)
    if via == "submit":
        got = _outcome(pool.submit("NeedsTwo"))
    else:

        async def main() -> BaseException | None:
            try:
                await pool.run("NeedsTwo")
            except Exception as exc:
                return exc
            return None

        got = asyncio.run(main())
    assert isinstance(got, WorkerError) and not isinstance(got, WorkerCrashed), repr(got)
    message = str(got)
    assert "the call raised _pool_fault_helpers.NeedsTwo('a/b') in worker 0" in message
    assert "cannot be rebuilt in this process: TypeError" in message
    assert 'raise NeedsTwo("a", "b")' in message  # the worker's traceback text
    assert "SIGKILL" not in message
    _same_worker_ran_once(pool, before)


def test_a_result_the_parent_cannot_rebuild_fails_that_call_only(pool: PinnedPool) -> None:
    before = pool.submit("who").result(timeout=60)
    got = _outcome(pool.submit("OnlyHere"))
    assert isinstance(got, WorkerError) and not isinstance(got, WorkerCrashed), repr(got)
    assert "cannot be rebuilt in this process (RuntimeError" in str(got)
    _same_worker_ran_once(pool, before)


# ---------------------------------------------------------------- a worker that forked, then died


def _gone(pid: int) -> bool:
    """True once ``pid`` has ended (a zombie waiting for its new parent counts: it is dead)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def _read_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return int(pidfile.read_text())


def _kill_if_left(pidfile: Path) -> None:
    """Cleanup for a run where the pool did not kill it (a failing run)."""
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    ("how", "pidfd"),
    [("fork", True), ("popen-close_fds-False", True), ("fork", False)],
    ids=["fork", "popen-close_fds-False", "fork-no-pidfd"],
)
def test_a_worker_that_dies_while_its_child_holds_its_socket_is_seen_dead_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, pidfd: bool
) -> None:
    # The child inherits the worker's socket, so no EOF comes when the worker dies: before, the
    # call (and every later one) hung as long as the child lived, the worker a zombie that
    # statistics() called alive. Without a pidfd (a kernel before 5.3) the exit is polled.
    if not pidfd:
        monkeypatch.setattr(pool_link, "_pidfd", lambda pid: None)
    pidfile = tmp_path / "child.pid"
    with PinnedPool(h.init, h.serve, workers=1, load_warning_threshold=None) as pool:
        try:
            worker, _ = pool.submit("who").result(timeout=60)
            fds = psutil.Process().num_fds()
            got = _outcome(pool.submit(("fork-then-die", str(pidfile), how)))
            assert isinstance(got, WorkerCrashed), repr(got)
            assert f"worker 0 (pid {worker}, " in str(got) and "killed by SIGKILL" in str(got)
            assert _gone(_read_pid(pidfile)), "the dead worker's child was left running"
            # the replacement serves on a connection of its own; the old one is closed here
            replacement, calls = pool.submit("who").result(timeout=60)
            assert replacement != worker and calls == 1
            assert psutil.Process().num_fds() == fds, "descriptors of the dead worker leaked"
            s = pool.statistics()
            assert (s.crashes, s.worker_restarts_total, s.workers_alive) == (1, 1, 1)
        finally:
            _kill_if_left(pidfile)


def test_a_large_call_sent_ahead_to_a_worker_that_dies_holding_a_child_is_not_lost(
    tmp_path: Path,
) -> None:
    # The second call is prefetched to a worker busy with the first: its 4 MB (inline tensors)
    # cannot all enter the socket until the worker reads, which it never does. Before, the pool's
    # thread blocked in that send, for good once the worker died with a child holding the socket.
    pidfile = tmp_path / "child.pid"
    with PinnedPool(h.init, h.serve, workers=1, prefetch=1, load_warning_threshold=None) as pool:
        try:
            worker, _ = pool.submit("who").result(timeout=60)
            first = pool.submit(("fork-then-hang", str(pidfile), "fork"))
            _read_pid(pidfile)
            batch = [torch.full((1 << 16,), float(i)) for i in range(16)]  # 256 KB each: inline
            second = pool.submit(("echo", batch))
            os.kill(worker, signal.SIGKILL)
            assert isinstance(_outcome(first), WorkerCrashed)
            kind, back = second.result(timeout=60)  # it never started: re-queued, run once
            assert kind == "echo" and all(torch.equal(a, b) for a, b in zip(back, batch))
            assert pool.submit("who").result(timeout=60) == (pool.statistics().per_worker[0].pid, 2)
        finally:
            _kill_if_left(pidfile)


# ---------------------------------------------------------------- fn changing its input in place


@pytest.mark.parametrize("n", [16, 1 << 18], ids=["inline", "shared-memory"])
def test_fn_changing_its_input_in_place_leaves_the_callers_tensor_alone(
    pool: PinnedPool, n: int
) -> None:
    # Before, a tensor over 256 KB (sent through shared memory) was the caller's own memory in
    # the worker: x.mul_(2) there doubled the caller's x, and sending it again doubled it again.
    x = torch.ones(n)
    for _ in range(2):
        y = pool.submit(("scale-in-place", x)).result(timeout=60)
        assert torch.equal(y, torch.full((n,), 2.0)) and torch.equal(x, torch.ones(n))
    assert not x.is_shared()  # the caller's storage stays its own


def test_a_result_is_the_callers_own_not_the_workers_tensor(pool: PinnedPool) -> None:
    # The worker returns a tensor it keeps (1 MB: shared memory): changing the result here must
    # not change the worker's copy, which the next call returns again.
    first = pool.submit("table").result(timeout=60)
    first.add_(1)
    again = pool.submit("table").result(timeout=60)
    assert torch.equal(again, torch.arange(1 << 17, dtype=torch.float32))


def test_an_idempotent_retry_runs_on_the_original_input(tmp_path: Path) -> None:
    # fn doubles its input in place, then its worker dies; the retry must see the input as
    # submitted (before: the doubled one, and a silently wrong 4.0 instead of 2.0).
    x = torch.ones(1 << 18)  # 1 MB: shared memory
    with PinnedPool(
        h.init, h.serve, workers=1, idempotent=True, load_warning_threshold=None
    ) as pool:
        y = pool.submit(("scale-in-place", x, str(tmp_path / "crashed"))).result(timeout=60)
        assert pool.statistics().retries == 1
    assert torch.equal(y, torch.full((1 << 18,), 2.0)), f"the retry saw a changed input: {y[0]}"
    assert torch.equal(x, torch.ones(1 << 18))


# ---------------------------------------------------------------- replacements: slow, crashing, failing


def test_close_kills_a_replacement_still_in_a_slow_init(tmp_path: Path) -> None:
    # Before: the replacement was never killed (its link was dropped before the kill), so close()
    # waited out 5 s of grace and then 60 s more for an init that would take an hour.
    pidfile = tmp_path / "replacement.pids"
    init = functools.partial(h.init_slow_replacement, str(tmp_path / "first"), str(pidfile))
    pool = PinnedPool(init, h.crash, workers=1, load_warning_threshold=None)
    pids: list[int] = []
    try:
        with pytest.raises(WorkerCrashed, match="exited with code 3"):
            pool.submit("die").result(timeout=60)
        deadline = time.monotonic() + 60
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = [int(p) for p in pidfile.read_text().split()]  # the replacement, its child
        assert pool.statistics().per_worker[0].state == "starting"
        started = time.monotonic()
        pool.close(timeout=30)
        took = time.monotonic() - started
        assert pool.statistics().closed, f"close() still waiting after {took:.0f}s"
        assert took < 15, f"close() took {took:.1f}s"
        assert all(_gone(pid) for pid in pids), "the replacement (or its child) was left running"
    finally:
        pool.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_that_keeps_crashing_restarts_with_backoff_and_calls_fail_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: every crash was followed by an immediate restart (a torch import), and every call
    # queued behind it to crash the next one: a restart storm, 503s taking seconds each.
    monkeypatch.setattr(pool_slots, "_RESTART_BACKOFF_S", (30.0, 60.0), raising=False)
    pool = PinnedPool(h.init, h.crash, workers=1, load_warning_threshold=None)
    try:
        # one crash: replaced at once, as ever; a call that succeeds clears the count
        with pytest.raises(WorkerCrashed, match="exited with code 3"):
            pool.submit("die").result(timeout=60)
        assert pool.submit(("echo", 1)).result(timeout=60) == ("echo", 1)
        # three in a row (two are replaced at once: a crash and an idempotent retry's): the next
        # restart waits 30 s, and calls fail at once meanwhile
        dying = [pool.submit("die") for _ in range(3)]
        queued = pool.submit(("echo", 2))
        for fut in dying:
            with pytest.raises(WorkerCrashed, match="exited with code 3"):
                fut.result(timeout=60)
        with pytest.raises(WorkerCrashed, match="keep crashing"):
            queued.result(timeout=20)  # it was queued behind the restart; it is failed instead
        late = pool.submit(("echo", 3))
        assert late.done(), "a call waited for a restart that is 30 s away"
        error = late.exception()
        assert isinstance(error, WorkerCrashed), repr(error)
        message = str(error)
        assert "worker 0: 3 crashes in a row" in message and "exited with code 3" in message
        assert "the next restart is in " in message
        assert 20 < getattr(error, "retry_after", 0) <= 30
        s = pool.statistics()
        assert (s.consecutive_crashes, s.workers_alive, s.worker_restarts_total) == (3, 0, 3)
        assert 20 < s.restart_backoff_seconds <= 30 and s.per_worker[0].state == "backoff"
        assert s.per_worker[0].consecutive_crashes == 3 and not s.gave_up
        started = time.monotonic()
        pool.close()  # does not wait for the restart
        assert time.monotonic() - started < 10
    finally:
        pool.close()


def test_a_pool_whose_replacements_never_start_says_it_gave_up_and_why(tmp_path: Path) -> None:
    # Before: the pool closed itself and calls got "cannot submit to a closed PinnedPool", which
    # an HTTP service reports as shutting down.
    init = functools.partial(h.init_fails_in_replacements, str(tmp_path / "first"))
    with PinnedPool(init, h.crash, workers=1, load_warning_threshold=None) as pool:
        with pytest.raises(WorkerCrashed, match="exited with code 3"):
            pool.submit("die").result(timeout=60)
        assert not pool.wait_ready(timeout=60)  # its replacement failed to start, 3 times
        try:
            fut = pool.submit(("echo", 1))
        except ClosedError as exc:
            pytest.fail(f"submit said {exc!r}, as after close()")
        error = fut.exception(timeout=10)
        assert isinstance(error, WorkerCrashed), repr(error)
        message = str(error)
        assert "gave up" in message and "failed to start 3 times in a row" in message
        assert "model.bin vanished" in message  # the last error
        s = pool.statistics()
        assert s.gave_up and "model.bin vanished" in (s.gave_up_reason or "")
        assert s.workers_alive == 0

"""PinnedPool under faults that reach past one worker: a worker whose connection breaks while its
process lives on (the pool's thread must not wait for it, and the other workers' calls must not
pay for it), what a pool that gave up says (one line; the traceback to the log and to
operators), and client data the pool cannot send (invalid input, not a configuration error).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _pool_fault_helpers as fh
import _pool_helpers as h
import pytest

from fastinfer import ConfigError, InvalidInput, PinnedPool, WorkerCrashed, WorkerStartupError
from fastinfer.pool import _link as pool_link
from fastinfer.pool import _slots as pool_slots

pytestmark = pytest.mark.timeout(180)

# Run by the worker (exec is a builtin, so it pickles by name): drop every descriptor, the
# pool's socket included, and live on without ever answering.
CUT_LINK = "import os, time\nos.closerange(3, 65536)\ntime.sleep(600)"


def _pids(pool: PinnedPool) -> list[int | None]:
    return [w.pid for w in pool.statistics().per_worker]


def _wait_for(what: Any, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# A worker whose link breaks while its process lives on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polled"])
def test_a_worker_whose_link_breaks_is_killed_without_stalling_the_other_workers(
    monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    # Before: the pool's only thread waited 10 s for that worker to exit; the other worker's call
    # (answered after 2 s) was then found past its 5 s timeout, failed with WorkerTimeout and its
    # healthy worker was killed; the cut-off call failed after 10 s as "killed by SIGKILL".
    if not pidfd:
        monkeypatch.setattr(pool_link, "_pidfd", lambda pid: None)
    with PinnedPool(
        h.init_model, h.predict, workers=2, timeout=5, load_warning_threshold=None
    ) as p:
        assert p.wait_ready(timeout=60)
        before = _pids(p)
        started = time.monotonic()
        innocent = p.submit_call(time.sleep, 2.0)  # one worker
        cut = p.submit_call(exec, CUT_LINK)  # the other (the least loaded)
        assert innocent.result(timeout=60) is None  # not WorkerTimeout
        with pytest.raises(WorkerCrashed, match="lost its connection to the pool") as info:
            cut.result(timeout=60)
        assert time.monotonic() - started < 5 + 3, "the cut-off call waited past the timeout"
        assert "while running a call" in str(info.value)
        s = p.statistics()
        assert (s.timeouts, s.crashes) == (0, 1)
        assert p.wait_ready(timeout=60)
        after = _pids(p)
        assert len(set(after) & set(before)) == 1, "the healthy worker was replaced too"
        assert [p.submit(("echo", i)).result(timeout=60) for i in range(4)] == [0, 1, 2, 3]


def test_the_pools_thread_serves_the_others_while_a_cut_off_worker_is_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long grace makes the window wide: while the worker whose link broke is being ended, the
    # other worker's calls are answered at once; its exit, whenever it comes, is seen from the
    # loop (here our own SIGKILL), and its call fails then.
    monkeypatch.setattr(pool_slots, "LINK_GRACE_S", 120.0, raising=False)
    with PinnedPool(h.init_model, h.predict, workers=2, load_warning_threshold=None) as p:
        assert p.wait_ready(timeout=60)
        cut = p.submit_call(exec, CUT_LINK)
        _wait_for(lambda: "ending" in {w.state for w in p.statistics().per_worker}, timeout=30)
        ending = next(w for w in p.statistics().per_worker if w.state == "ending")
        for i in range(5):  # before: nothing was read or sent for 10 s
            assert p.submit(("echo", i)).result(timeout=8) == i
        assert not cut.done()
        s = p.statistics()
        assert s.workers_alive == 1 and s.calls_in_flight == 1
        assert ending.pid is not None
        os.kill(ending.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed, match="was killed by SIGKILL while running a call"):
            cut.result(timeout=30)
        assert p.wait_ready(timeout=60)
        assert p.statistics().crashes == 1


def test_a_call_answered_while_the_pools_thread_was_busy_is_not_timed_out() -> None:
    # The thread is held up (here by a slow on_call, which runs on it) past the other call's
    # timeout; that call's answer came long before, and waits in its socket. Before: the thread
    # came back, checked deadlines before reading, and failed it with WorkerTimeout, killing a
    # healthy worker.
    first = threading.Event()

    def on_call(record: Any) -> None:
        if not first.is_set():
            first.set()
            time.sleep(6.0)

    with PinnedPool(
        h.init_model, h.predict, workers=2, timeout=4, on_call=on_call, load_warning_threshold=None
    ) as p:
        assert p.wait_ready(timeout=60)
        slow = p.submit_call(time.sleep, 1.0)
        quick = p.submit(("echo", "quick"))  # answered first: its on_call holds the thread 6 s
        assert quick.result(timeout=60) == "quick"
        assert slow.result(timeout=60) is None
        s = p.statistics()
        assert (s.timeouts, s.crashes, s.worker_restarts_total) == (0, 0, 0)


# --------------------------------------------------------------------------------------------
# What a failed start says: one line to callers, the traceback to the log and to operators
# --------------------------------------------------------------------------------------------


def test_a_startup_error_names_the_cause_on_its_first_line() -> None:
    # Before: the first line was "worker 0's init() raised:", the cause on later lines, so a
    # one-line summary (the HTTP layer's "setup failed (...)") lost it.
    with pytest.raises(WorkerStartupError) as info:
        PinnedPool(h.init_fails, h.predict, workers=1, load_warning_threshold=None)
    first = str(info.value).splitlines()[0]
    assert first == (
        "worker 0's init() raised ValueError: cannot load the model: weights.bin is missing"
    )
    tb = getattr(info.value, "worker_traceback", None)
    assert tb is not None and tb.startswith("Traceback") and "init_fails" in tb


def test_a_pool_that_gave_up_says_why_in_one_line_and_logs_the_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: gave_up_reason and every call's WorkerCrashed (sent to HTTP clients) held the
    # worker's whole traceback: file paths and source lines.
    init = functools.partial(fh.init_fails_in_replacements, str(tmp_path / "first"))
    caplog.set_level(logging.ERROR, logger="fastinfer.pool")
    with PinnedPool(init, fh.crash, workers=1, load_warning_threshold=None) as pool:
        with pytest.raises(WorkerCrashed, match="exited with code 3"):
            pool.submit("die").result(timeout=60)
        assert not pool.wait_ready(timeout=60)
        error = pool.submit(("echo", 1)).exception(timeout=10)
        assert isinstance(error, WorkerCrashed), repr(error)
        s = pool.statistics()
    reason = s.gave_up_reason or ""
    for text in (reason, str(error)):
        assert "\n" not in text and "Traceback" not in text and 'File "' not in text, text
        assert "worker 0's init() raised RuntimeError: model.bin vanished" in text
    tb = getattr(error, "worker_traceback", None) or ""
    assert tb.startswith("Traceback") and "init_fails_in_replacements" in tb
    w = s.per_worker[0]
    assert w.start_traceback == tb and w.start_error and "\n" not in w.start_error
    # the traceback is logged once per failed start, never in the give-up line
    logged = [r.getMessage() for r in caplog.records]
    with_tb = [m for m in logged if "Traceback (most recent call last)" in m]
    assert len(with_tb) == pool_slots.START_TRIES
    gave_up = [m for m in logged if "gave up:" in m]
    assert len(gave_up) == 1 and "\n" not in gave_up[0]


def test_a_long_cause_is_cut_to_one_short_line() -> None:
    text = "RuntimeError: " + "bad weights\n\t" * 100
    line = pool_slots.one_line(text)
    assert "\n" not in line and len(line) <= 300 and line.endswith("...")
    assert line.startswith("RuntimeError: bad weights bad weights")
    assert pool_slots.one_line("KeyError: 'x'") == "KeyError: 'x'"


# --------------------------------------------------------------------------------------------
# Data the pool cannot send
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[PinnedPool]:
    with PinnedPool(h.init_model, h.predict, workers=1, load_warning_threshold=None) as p:
        yield p


def _nested(depth: int) -> list[Any]:
    x: list[Any] = []
    for _ in range(depth):
        x = [x]
    return x


def test_data_nested_too_deeply_to_send_is_invalid_input(pool: PinnedPool) -> None:
    # Before: ConfigError ("cannot send this item to a worker"), which the HTTP layer answers as
    # a server bug (500); such an input is valid JSON a client can send.
    deep = _nested(5000)
    with pytest.raises(InvalidInput, match=r"this item \(list\).*nested too deeply") as info:
        pool.submit(deep)
    assert not isinstance(info.value, ConfigError)
    assert "RecursionError" in str(info.value) and "limit the nesting depth" in str(info.value)
    with pytest.raises(InvalidInput, match="call's arguments"):
        pool.submit_call(len, deep)
    assert pool.submit(("echo", 1)).result(timeout=60) == 1  # nothing else changed
    assert pool.statistics().queue_depth == 0


def test_an_item_that_cannot_be_pickled_is_still_a_config_error(pool: PinnedPool) -> None:
    with pytest.raises(ConfigError, match="cannot send this item to a worker"):
        pool.submit(threading.Lock())

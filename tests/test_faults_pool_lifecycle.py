"""PinnedPool's lifecycle under misuse: a pool dropped without ``close()``, a pool used in a
process forked from its own, and a Future's done-callback (run on the pool's thread) that waits
for the same pool.

Before: a dropped pool was never collected (its thread held it), so its thread, its pinned
workers and its CPU claim files stayed until the process exited; a forked child's ``submit``
returned a Future that never resolved, and a pool it created on the same CPUs wrote no claim file;
a done-callback waiting for another call of the pool stalled every caller for its timeout, and
``close(cancel_pending=True)`` deadlocked when a cancelled call's callback used the pool.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _pool_helpers as h
import psutil
import pytest
from conftest import run_python, until

from fastinfer import PinnedPool, WorkerCrashed, WouldBlockError

pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------------- dropped without close


def test_a_pool_dropped_without_close_is_closed_by_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastinfer.pool import _claims

    claims = tmp_path / "claims"
    claims.mkdir()
    monkeypatch.setattr(_claims, "claims_dir", lambda: str(claims))
    pool = PinnedPool(h.init_model, h.predict, workers=1, load_warning_threshold=None)
    thread = pool._thread
    worker = pool.statistics().per_worker[0].pid
    assert worker is not None and os.listdir(claims)  # pinned: its CPUs are claimed
    marker = tmp_path / "go"
    running = pool.submit(("wait-file", str(marker)))  # still running when the pool goes
    ref = weakref.ref(pool)
    with pytest.warns(ResourceWarning, match="unclosed PinnedPool"):
        del pool
        gc.collect()
    assert ref() is None, "the pool's thread (or its Future) keeps the pool alive"
    marker.write_text("")
    assert running.result(timeout=60) == "opened"  # a dropped pool's call still finishes
    thread.join(60)
    assert not thread.is_alive(), "the dropped pool's thread still runs"
    assert not psutil.pid_exists(worker), "the dropped pool's worker still runs"
    assert os.listdir(claims) == [], "the dropped pool's CPUs are still claimed"


# ------------------------------------------------------------------------------- after a fork

POOL_IN_A_FORKED_CHILD = """
import os, signal, sys
sys.path.insert(0, "tests")
import _pool_helpers as h
from fastinfer import ClosedError, PinnedPool

pool = PinnedPool(h.init_model, h.predict, workers=1, load_warning_threshold=None)
assert pool.submit(("echo", 1)).result(timeout=60) == 1
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a hang here ends the child (the parent reports it)
    lines = []
    for what, use in [
        ("submit", lambda: pool.submit(("echo", 2)).result(timeout=5)),
        ("statistics", pool.statistics),
        ("wait_ready", lambda: pool.wait_ready(5)),
    ]:
        try:
            lines.append(f"{what}: no error: {use()!r}")
        except BaseException as exc:
            lines.append(f"{what}: {type(exc).__name__}: {exc}")
    lines.append(f"closed: {pool.closed}")
    pool.close(timeout=3)  # the parent's pool: not this process's to close
    print("\\n".join(lines), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child exit:", os.waitstatus_to_exitcode(status))
print("parent:", os.getpid(), pool.submit(("echo", 3)).result(timeout=60))
pool.close()
"""


def test_a_pool_used_in_a_forked_child_refuses_naming_its_process_and_the_fix() -> None:
    out = run_python(POOL_IN_A_FORKED_CHILD, timeout=150).stdout
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["child exit"] == "0", out
    parent = lines["parent"].split()[0]
    assert lines["submit"].startswith(f"ClosedError: this PinnedPool belongs to process {parent}")
    assert "Create the pool in each process, after the fork" in lines["submit"]
    assert "gunicorn --preload" in lines["submit"]
    assert lines["statistics"].startswith("ClosedError: this PinnedPool belongs to process")
    assert lines["wait_ready"].startswith("ClosedError: this PinnedPool belongs to process")
    assert lines["closed"] == "True"
    assert lines["parent"].split()[1] == "3", "the parent's pool was disturbed by the child"


CLAIMS_IN_A_FORKED_CHILD = """
import os, signal, threading
from fastinfer.pool import _claims
from fastinfer.pool._claims import CpuClaim

d = {directory!r}
parent = CpuClaim([0], directory=d)


def child(check_files):
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a hang here ends the child
        mine = CpuClaim([0], directory=d)  # the parent's pool is on CPU 0 too
        ok = f"cpu0.{{os.getpid()}}" in os.listdir(d) if check_files else True
        parent.release()  # the parent's claim: a no-op here
        mine.release()
        names = os.listdir(d)
        ok = ok and f"cpu0.{{os.getppid()}}" in names and f"cpu0.{{os.getpid()}}" not in names
        os._exit(0 if ok else 3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


print("own file:", child(True))
held, done = threading.Event(), threading.Event()


def hold():
    with _claims._lock:  # another thread of the parent holds the lock at the fork
        held.set()
        done.wait()


threading.Thread(target=hold, daemon=True).start()
held.wait()
print("lock held at fork:", child(False))
done.set()
print("parent's file:", sorted(os.listdir(d)))
parent.release()
print("after release:", sorted(os.listdir(d)))
"""


def test_a_forked_child_claims_its_cpus_afresh(tmp_path: Path) -> None:
    out = run_python(CLAIMS_IN_A_FORKED_CHILD.format(directory=str(tmp_path)), timeout=60).stdout
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    # 3: the child wrote no claim file of its own (it inherited the parent's count)
    assert lines["own file"] == "0", out
    # -14 (SIGALRM): the child hung on the claims lock another parent thread held at the fork
    assert lines["lock held at fork"] == "0", out
    assert lines["after release"] == "[]", out


# ----------------------------------------------------------------- done-callbacks on the pool


@pytest.fixture(scope="module")
def pool() -> Iterator[PinnedPool]:
    with PinnedPool(h.init_model, h.predict, workers=2, load_warning_threshold=None) as p:
        yield p


def test_waiting_in_a_done_callback_for_the_same_pool_raises_at_once(
    pool: PinnedPool, tmp_path: Path
) -> None:
    marker = tmp_path / "go"
    got: list[Any] = []

    def chain(fut: concurrent.futures.Future[Any]) -> None:
        got.append(threading.current_thread().name)
        start = time.monotonic()
        try:
            got.append(pool.submit(("echo", fut.result() + "!")).result(timeout=6))
        except Exception as exc:
            got.append(exc)
        got.append(time.monotonic() - start)

    first = pool.submit(("wait-file", str(marker)))
    first.add_done_callback(chain)  # still running: the callback runs on the pool's thread
    marker.write_text("")
    start = time.monotonic()
    assert pool.submit(("echo", "next")).result(timeout=60) == "next"
    took = time.monotonic() - start
    until(lambda: len(got) == 3, "the done-callback", timeout=30)
    assert got[0] == "fastinfer-pool"
    assert isinstance(got[1], WouldBlockError), got
    assert "pool's own thread" in str(got[1]) and "add_done_callback" in str(got[1])
    assert got[2] < 1.0  # raised at once, not after the timeout
    assert took < 4.0, f"another caller waited {took:.1f}s for the blocked callback"


def test_wait_ready_in_a_done_callback_while_a_worker_restarts_raises(
    pool: PinnedPool, tmp_path: Path
) -> None:
    assert pool.wait_ready(120)
    marker = tmp_path / "go"
    got: list[Any] = []

    def check(fut: concurrent.futures.Future[Any]) -> None:
        start = time.monotonic()
        try:
            got.append(pool.wait_ready(6))
        except Exception as exc:
            got.append(exc)
        got.append(time.monotonic() - start)

    slow = pool.submit(("wait-file", str(marker)))  # on one worker
    crash = pool.submit("exit")  # on the other: it dies and restarts
    with pytest.raises(WorkerCrashed):
        crash.result(timeout=60)
    slow.add_done_callback(check)
    until(lambda: "starting" in {w.state for w in pool.statistics().per_worker}, "a restart")
    marker.write_text("")  # the callback runs while the other worker starts
    assert slow.result(timeout=60) == "opened"
    until(lambda: len(got) == 2, "the done-callback", timeout=30)
    assert isinstance(got[0], WouldBlockError), got
    assert "wait_ready()" in str(got[0]) and got[1] < 1.0
    assert pool.wait_ready(120)


def test_close_cancelling_a_call_whose_callback_uses_the_pool_does_not_deadlock(
    tmp_path: Path,
) -> None:
    pool = PinnedPool(h.init_model, h.predict, workers=1, prefetch=0, load_warning_threshold=None)
    marker = tmp_path / "go"
    running = pool.submit(("wait-file", str(marker)))
    until(running.running, "the first call to start")
    queued = pool.submit(("echo", 1))  # prefetch=0: it waits in the queue
    seen: list[Any] = []
    queued.add_done_callback(lambda f: seen.append((f.cancelled(), pool.statistics().workers)))
    closer = threading.Thread(target=lambda: pool.close(cancel_pending=True), daemon=True)
    closer.start()
    try:
        until(lambda: bool(seen), "the cancelled call's callback")
    finally:
        marker.write_text("")
    closer.join(60)
    assert not closer.is_alive(), "close() deadlocked"
    assert seen == [(True, 1)]
    assert running.result(timeout=1) == "opened"
    assert pool.statistics().requests_cancelled == 1

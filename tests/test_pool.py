"""PinnedPool: pinning, transport, Executor/asyncio use, faults, lifecycle, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import _pool_helpers as h
import psutil
import pytest
import torch
from conftest import ROOT, run_python

import fastinfer.pool as pool_mod
from fastinfer import (
    ClosedError,
    ConfigError,
    CorePlan,
    PinnedPool,
    WorkerCrashed,
    WorkerStartupError,
    WorkerTimeout,
)
from fastinfer.pool import Core

pytestmark = pytest.mark.timeout(120)  # a hang fails fast

N = min(2, CorePlan.detect().physical_cores)
REPORTS: list[tuple[int, Any]] = []
CALLS: list[pool_mod.CallRecord] = []


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PinnedPool]:
    cache = str(tmp_path_factory.mktemp("inductor-cache"))
    with PinnedPool(
        h.init_model,
        h.predict,
        workers=N,
        env={"TORCHINDUCTOR_CACHE_DIR": cache},
        worker_report=h.report,
        on_worker_report=lambda w, payload: REPORTS.append((w, payload)),
        on_call=CALLS.append,
        load_warning_threshold=None,
    ) as p:
        yield p
    assert p.statistics().closed


def probes(pool: PinnedPool) -> dict[int, dict[str, Any]]:
    """One probe per worker: sequential calls alternate (the longest-idle worker goes first)."""
    assert pool.wait_ready(timeout=60)
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(4 * pool.workers):
        info = pool.submit("probe").result(timeout=60)
        seen[info["pid"]] = info
        if len(seen) == pool.workers:
            break
    return seen


def test_workers_are_pinned_before_torch_sizes_its_threads(pool: PinnedPool) -> None:
    split = pool.split
    infos = probes(pool)
    assert len(infos) == N
    assert sorted(tuple(i["affinity"]) for i in infos.values()) == sorted(w.cpus for w in split)
    for info in infos.values():
        assert info["threads"] == 1 and info["omp"] == info["mkl"] == "1"
        assert info["interop"] == 1
    stats = pool.statistics()
    # the ready report (os.sched_getaffinity / torch.get_num_threads measured in the child)
    assert [w.cpus for w in stats.per_worker] == [w.cpus for w in split]
    assert all(w.threads == 1 for w in stats.per_worker)


def test_env_reaches_workers_before_torch(pool: PinnedPool) -> None:
    info = next(iter(probes(pool).values()))
    assert info["inductor_cache"] and Path(info["inductor_cache"]).is_dir()


def test_results_match_eager_and_tensors_travel_in_shared_memory(pool: PinnedPool) -> None:
    model = h.init_model()["model"]
    x = torch.randn(8, 16)
    y = pool.submit(x).result(timeout=60)
    with torch.inference_mode():
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    big = torch.randn(1 << 18)  # 1 MB: above the inline limit
    assert not big.is_shared()
    back = pool.submit(("echo", big)).result(timeout=60)
    assert not big.is_shared(), (
        "the caller's tensor stays its own (a copy went through shared memory)"
    )
    assert back.is_shared(), "the result came back through shared memory"
    torch.testing.assert_close(back, big, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 6).t(),  # non-contiguous
        lambda: torch.randn(3, 5, dtype=torch.bfloat16),
        lambda: torch.tensor(3.5),  # 0-dim
        lambda: torch.empty(0, 4),
        lambda: torch.arange(10) > 4,  # bool
        lambda: torch.randn(3, requires_grad=True),
    ],
    ids=["non-contiguous", "bfloat16", "scalar", "empty", "bool", "requires-grad"],
)
def test_small_tensors_travel_inline_and_intact(pool: PinnedPool, make: Any) -> None:
    t = make()
    back = pool.submit(("echo", t)).result(timeout=60)
    assert not t.is_shared() and back.dtype == t.dtype and back.shape == t.shape
    assert back.requires_grad == t.requires_grad
    torch.testing.assert_close(back.detach(), t.detach(), rtol=0, atol=0)


def test_worker_exception_keeps_its_type_and_traceback(pool: PinnedPool) -> None:
    with pytest.raises(KeyError, match="missing") as info:
        pool.submit("raise").result(timeout=60)
    assert "_pool_helpers.py" in str(info.value.__cause__)
    assert pool.submit(("echo", 5)).result(timeout=60) == 5  # the worker is still fine


def test_executor_protocol_and_asyncio(pool: PinnedPool) -> None:
    async def main() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        a = await loop.run_in_executor(pool.executor(), os.getpid)
        b = await pool.run(("echo", "hi"))
        c = await asyncio.gather(*(pool.run(("echo", i)) for i in range(6)))
        d = await loop.run_in_executor(pool.executor(), h.state_calls)
        e = await pool.run_call(os.getpid)
        return a, b, c, d, e

    pid, echoed, many, calls, pid2 = asyncio.run(main())
    assert pid in {w.pid for w in pool.statistics().per_worker} and pid != os.getpid()
    assert pid2 in {w.pid for w in pool.statistics().per_worker}
    assert echoed == "hi" and many == list(range(6)) and calls >= 1
    assert list(pool.executor().map(abs, [-1, -2, 3])) == [1, 2, 3]
    with pytest.raises(TypeError):
        pool.submit("batch", 1)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="needs a callable"):
        pool.submit_call("not a function")  # type: ignore[arg-type]


def test_a_callable_item_is_an_item_not_a_function_to_run(pool: PinnedPool) -> None:
    """submit(x) never looks at whether x is callable: x is data for fn(state, x)."""
    assert pool.submit(("echo", abs)).result(timeout=60) is abs
    assert pool.submit_call(abs, -3).result(timeout=60) == 3


def test_submit_is_thread_safe_and_load_is_spread(pool: PinnedPool) -> None:
    before = {w.worker: w.calls_ok for w in pool.statistics().per_worker}
    results: list[Any] = []
    barrier = threading.Barrier(4)

    def client(k: int) -> None:
        barrier.wait()
        futs = [pool.submit(("echo", (k, i))) for i in range(10)]
        results.extend(f.result(timeout=60) for f in futs)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(k, i) for k in range(4) for i in range(10)]
    after = pool.statistics()
    done = {w.worker: w.calls_ok - before[w.worker] for w in after.per_worker}
    assert sum(done.values()) == 40
    if N > 1:
        assert all(v > 0 for v in done.values()), done


def test_statistics_reports_and_call_records(pool: PinnedPool) -> None:
    pool.submit(("echo", 1)).result(timeout=60)
    s = pool.statistics()
    assert s.workers == N and s.workers_alive == N and s.worker_restarts_total == 0
    assert s.requests_ok >= 1 and s.queue_depth == 0 and s.calls_in_flight == 0
    assert set(s.queue_per_worker) == set(range(N))
    assert 0.0 < s.busy_ratio <= 1.0
    w = max(s.per_worker, key=lambda w: w.latency_seconds["count"])
    lat = w.latency_seconds
    assert lat["count"] >= 1 and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    with pytest.raises(AttributeError):
        s.workers = 3  # type: ignore[misc]
    assert REPORTS and {"calls", "pid"} <= set(REPORTS[-1][1])
    assert REPORTS[-1][0] in range(N)
    assert (
        CALLS
        and CALLS[-1].outcome == "ok"
        and CALLS[-1].latency_seconds >= CALLS[-1].service_seconds > 0
    )


# --------------------------------------------------------------------------------------------
# Faults: crash, segfault, SIGKILL, hang, retry
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fragile() -> Iterator[PinnedPool]:
    with PinnedPool(
        h.init_model, h.predict, workers=N, timeout=3.0, load_warning_threshold=None
    ) as p:
        yield p


@pytest.mark.parametrize(
    ("batch", "how"),
    [("exit", "exited with code 3"), ("segfault", "SIGSEGV"), ("sigkill", "SIGKILL")],
    ids=["os_exit", "segfault", "sigkill"],
)
def test_crash_fails_the_call_and_the_worker_restarts_on_the_same_cores(
    fragile: PinnedPool, batch: str, how: str
) -> None:
    before = fragile.statistics()
    with pytest.raises(WorkerCrashed, match=how):
        fragile.submit(batch).result(timeout=60)
    # the pool keeps serving while the worker restarts, and then with every worker back
    assert fragile.submit(("echo", "after")).result(timeout=60) == "after"
    infos = probes(fragile)
    assert len(infos) == N
    assert sorted(tuple(i["affinity"]) for i in infos.values()) == sorted(
        w.cpus for w in fragile.split
    )
    after = fragile.statistics()
    assert after.worker_restarts_total == before.worker_restarts_total + 1
    assert after.crashes == before.crashes + 1 and after.workers_alive == N


def test_calls_queued_behind_a_crash_are_not_lost(fragile: PinnedPool, tmp_path: Path) -> None:
    # fill every worker (one running + prefetched) with calls that wait on a gate, crash one
    # worker's running call: the calls it had prefetched never started and must still succeed
    assert fragile.wait_ready(timeout=60)
    gate = tmp_path / "gate"
    crash = fragile.submit("exit")
    others = [fragile.submit(("wait-file", str(gate))) for _ in range(4 * fragile.workers)]
    with pytest.raises(WorkerCrashed):
        crash.result(timeout=60)
    gate.write_text("go")
    assert [f.result(timeout=60) for f in others] == ["opened"] * len(others)


def test_hang_past_timeout_fails_and_the_worker_is_replaced(fragile: PinnedPool) -> None:
    before = fragile.statistics()
    with pytest.raises(WorkerTimeout, match="timeout of 3s"):
        fragile.submit("hang").result(timeout=60)
    assert fragile.submit(("echo", 1)).result(timeout=60) == 1
    assert len(probes(fragile)) == N
    after = fragile.statistics()
    assert after.timeouts == before.timeouts + 1
    assert after.worker_restarts_total == before.worker_restarts_total + 1


def test_every_worker_runs_the_warmup_batch_before_its_first_call() -> None:
    """A replacement (after a crash) is warmed too, so its first call is never a cold one."""
    with PinnedPool(h.init_model, h.predict, workers=1, warmup=("echo", "warm")) as p:
        assert p.submit("calls").result(timeout=60) == 2  # the warm-up, then this call
        with pytest.raises(WorkerCrashed):
            p.submit("exit").result(timeout=60)
        assert p.submit("calls").result(timeout=60) == 2  # the new worker was warmed as well


def test_a_failing_warmup_fails_the_start_with_its_traceback() -> None:
    with pytest.raises(
        WorkerStartupError, match=r"(?s)init\(\) or its warm-up call raised.*KeyError"
    ):
        PinnedPool(h.init_model, h.predict, workers=1, warmup="raise", startup_timeout=60)


def test_idempotent_calls_are_retried_once(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    with PinnedPool(
        h.init_model, h.predict, workers=1, idempotent=True, load_warning_threshold=None
    ) as p:
        assert p.submit(("crash-once", str(marker))).result(timeout=60) == "survived"
        assert marker.exists()
        s = p.statistics()
        assert s.retries == 1 and s.crashes == 1 and s.requests_ok == 1
        with pytest.raises(WorkerCrashed, match="retried once already"):
            p.submit("exit").result(timeout=60)
        assert p.submit(("echo", 2)).result(timeout=60) == 2


@pytest.mark.parametrize(
    ("init", "match"),
    [(h.init_fails, "weights.bin is missing"), (h.init_exits, "exited with code 7")],
    ids=["raises", "exits"],
)
def test_init_failure_surfaces_with_the_workers_traceback(init: Any, match: str) -> None:
    with pytest.raises(WorkerStartupError, match=match) as info:
        PinnedPool(init, h.predict, workers=1, load_warning_threshold=None)
    if init is h.init_fails:
        assert "Traceback" in str(info.value) and "init_fails" in str(info.value)


# --------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------


def test_close_drains_then_refuses_and_warns_about_busy_cores(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="fastinfer.pool"),
        mock.patch.object(pool_mod._pool, "_sample_cpu_load", return_value={0: 97.0}),
    ):
        p = PinnedPool(h.init_model, h.predict, workers=1, numa="bind")
    s = p.statistics()
    assert s.foreign_load_warning and "cpu0 97%" in s.foreign_load_warning
    assert any("busy with foreign load" in r.getMessage() for r in caplog.records)
    assert any("one NUMA node" in n for n in s.notes)
    pid = s.per_worker[0].pid
    futs = [p.submit(("echo", i)) for i in range(20)]
    p.close()
    assert [f.result(timeout=0) for f in futs] == list(range(20))  # drained, nothing lost
    with pytest.raises(ClosedError, match="cannot submit to a closed PinnedPool"):
        p.submit(("echo", 1))
    assert p.statistics().closed and not psutil.pid_exists(pid or -1)
    p.close()  # idempotent


def test_close_can_cancel_queued_calls() -> None:
    p = PinnedPool(h.init_model, h.predict, workers=1, load_warning_threshold=None)
    first = p.submit(("echo", 0))
    queued = [p.submit(("echo", i)) for i in range(1, 50)]
    p.close(cancel_pending=True)
    assert first.cancelled() or first.result(timeout=0) == 0
    assert any(f.cancelled() for f in queued)
    for f in queued:
        assert f.cancelled() or f.result(timeout=0) in range(50)
    assert p.statistics().requests_cancelled >= 1


def test_bad_arguments_fail_before_any_process_starts() -> None:
    with pytest.raises(ConfigError, match="cannot be pickled"):
        PinnedPool(lambda: None, h.predict, workers=1)
    with pytest.raises(ConfigError, match="exceeds the"):
        PinnedPool(h.init_model, h.predict, workers=10_000)
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        PinnedPool(h.init_model, h.predict, timeout=0)
    with pytest.raises(ConfigError, match="numa must be one of"):
        PinnedPool(h.init_model, h.predict, numa="yes")  # type: ignore[arg-type]


PARENT = """
import json, sys, time
import _pool_helpers as h
from fastinfer import PinnedPool
pool = PinnedPool(h.init_model, h.predict, workers={n}, load_warning_threshold=None)
print(json.dumps([w.pid for w in pool.statistics().per_worker]), flush=True)
pool.submit("hang")  # a worker busy in a call must die too
time.sleep(600)
"""


def test_killing_the_parent_leaves_no_orphans() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(n=N)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == N and all(psutil.pid_exists(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    assert alive == [], f"orphaned workers still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_numa_binding_syscall_works_on_node0() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('w', {str(ROOT / 'fastinfer/pool/_worker.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.set_mempolicy(0, bind=False), 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["None", "False"]  # no error, and the worker entry imports no torch


def test_a_queued_call_can_be_cancelled(pool: PinnedPool, tmp_path: Path) -> None:
    gate = tmp_path / "open"
    before = pool.statistics().requests_cancelled
    # every worker runs one call and holds `prefetch` more: the next call stays in the queue
    held = pool.workers * (1 + pool.prefetch)
    busy = [pool.submit(("wait-file", str(gate))) for _ in range(held)]
    queued = pool.submit(("echo", "never"))
    assert queued.cancel(), "a call still in the queue can be cancelled"
    gate.write_text("go")
    assert [f.result(timeout=60) for f in busy] == ["opened"] * held
    assert pool.submit(("echo", "next")).result(timeout=60) == "next"
    assert pool.statistics().requests_cancelled == before + 1


def test_a_failed_process_start_is_a_startup_error() -> None:
    enomem = OSError(12, "Cannot allocate memory")
    with (
        mock.patch.object(pool_mod._supervisor.subprocess, "Popen", side_effect=enomem),
        pytest.raises(WorkerStartupError, match=r"cannot start worker 0: .*Cannot allocate memory"),
    ):
        PinnedPool(h.init_model, h.predict, workers=1, load_warning_threshold=None)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_numa_binding_runs_in_each_worker_before_torch() -> None:
    # A plan claiming two NUMA nodes on this machine's CPUs 0 and 1: worker 0 binds to node 0
    # (exists everywhere), worker 1 to node 1, which a one-node machine refuses (a note, no crash).
    cpus = sorted(os.sched_getaffinity(0))[:2]
    plan = CorePlan((Core((cpus[0],), 0, 0, 0), Core((cpus[1],), 1, 0, 1)))
    with PinnedPool(
        h.init_model, h.predict, plan=plan, workers=2, numa="preferred", load_warning_threshold=None
    ) as p:
        notes = p.statistics().notes
        assert not any(n.startswith("worker 0:") for n in notes), notes
        has_node1 = 1 in CorePlan.detect().nodes
        assert has_node1 or any(
            n.startswith("worker 1: set_mempolicy(node 1) failed") for n in notes
        )
        assert p.submit(("echo", 1)).result(timeout=60) == 1


WATCHDOG = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("w", {path!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
parent = os.getpid()  # read before fork: the parent may be gone before the child runs
pid = os.fork()
if pid == 0:  # no PR_SET_PDEATHSIG here: only the watchdog can notice the parent's exit
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1); os.dup2(null, 2)  # let the test's pipes close
    m._watch_parent(parent)
    os._exit(3)
print(pid, flush=True)
os._exit(0)
"""


def test_watchdog_exits_a_worker_whose_parent_is_gone() -> None:
    code = WATCHDOG.format(path=str(ROOT / "fastinfer" / "pool" / "_worker.py"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the orphan's watchdog did not exit it"


def test_a_first_submit_imports_nothing_so_an_event_loop_never_stalls_on_it() -> None:
    # The message encoder imports torch (1-2 s cold); made when the pool starts, not on the
    # caller's first submit (an event loop's thread, whose timers and deadlines would stall).
    code = (
        "import operator, sys\n"
        "import fastinfer\n"
        "pool = fastinfer.PinnedPool(list, operator.concat, workers=1, pin=False)\n"
        "before = set(sys.modules)\n"
        "assert pool.submit([1]).result(60) == [1]\n"
        "print('NEW', sorted(set(sys.modules) - before))\n"
        "print('CLOSED', pool.closed)\n"
        "pool.close()\n"
        "print('CLOSED', pool.closed)\n"
    )
    out = run_python(code, timeout=180).stdout
    assert "NEW []" in out
    assert "CLOSED False" in out and "CLOSED True" in out

"""Cleanup that the garbage collector runs (weakref finalizers) can run inside any allocation of
the thread it interrupts, including a locked section of the same module. Such cleanup must never
wait on a lock that thread holds.

Found by CI: a pinned pool's CPU claim is released by a finalizer; the collector ran the finalizer
of a pool dropped by an earlier test while the next pool wrote its own claim under the module's
lock, and the suite hung until CI's time ran out.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fastinfer.pool import _claims
from fastinfer.pool._claims import CpuClaim


def _in_thread(fn) -> threading.Thread:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout=20)
    return t


def test_a_claims_finalizer_run_inside_another_claims_locked_write_does_not_deadlock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = CpuClaim([0], directory=str(tmp_path))  # an earlier pool's claim, now unreachable
    write = _claims.atomic_write_text
    ran: list[str] = []

    def write_with_collection(path: str, text: str) -> None:
        old.release()  # what the collector does when it collects the old pool right here
        ran.append("released")
        write(path, text)

    monkeypatch.setattr(_claims, "atomic_write_text", write_with_collection)
    made: list[CpuClaim] = []
    t = _in_thread(lambda: made.append(CpuClaim([1], directory=str(tmp_path))))
    assert not t.is_alive(), "a claim deadlocked on the finalizer of another claim"
    assert ran == ["released"]
    pid = os.getpid()
    assert sorted(os.listdir(tmp_path)) == [f"cpu1.{pid}"]  # the old claim's file went
    made[0].release()
    assert os.listdir(tmp_path) == []


def test_a_claims_finalizer_on_the_same_cpu_keeps_the_new_claims_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old pool and the new one pin the same CPUs: the new claim counted CPU 0 already when
    # the old one is released during its write of CPU 1; CPU 0's file must stay.
    old = CpuClaim([0, 1], directory=str(tmp_path))
    old.release()
    older = CpuClaim([0], directory=str(tmp_path))
    write = _claims.atomic_write_text

    def write_with_collection(path: str, text: str) -> None:
        older.release()
        write(path, text)

    monkeypatch.setattr(_claims, "atomic_write_text", write_with_collection)
    made: list[CpuClaim] = []
    t = _in_thread(lambda: made.append(CpuClaim([0, 1], directory=str(tmp_path))))
    assert not t.is_alive(), "a claim deadlocked on the finalizer of another claim"
    pid = os.getpid()
    assert sorted(os.listdir(tmp_path)) == [f"cpu0.{pid}", f"cpu1.{pid}"]
    made[0].release()
    assert os.listdir(tmp_path) == []


class _ShardsRetiredWhileCopied(list):  # type: ignore[type-arg]
    """The series' shard list, whose copy is interrupted once by a thread's shard being retired
    (its finalizer runs when the thread ends; here, inside the read's locked section)."""

    def __init__(self, items, retire) -> None:  # type: ignore[no-untyped-def]
        super().__init__(items)
        self.retire = retire

    def __iter__(self):  # type: ignore[no-untyped-def]
        retire, self.retire = self.retire, None
        if retire is not None:
            retire()
        return super().__iter__()


def test_a_histogram_shard_retired_inside_a_read_neither_deadlocks_nor_miscounts() -> None:
    from fastinfer.metrics import MetricsRecorder

    rec = MetricsRecorder()
    h = rec.histogram("app_latency_seconds", "latency")

    def record() -> None:
        for _ in range(3):
            h.observe(0.5)

    _in_thread(record)  # a thread that ended: its shard was retired into the base
    h.observe(0.25)  # this thread's own shard
    series = h._unlabelled()
    shard = series._local.shard
    series._shards = _ShardsRetiredWhileCopied(series._shards, lambda: series._retire(shard))
    snaps: list[object] = []
    t = _in_thread(lambda: snaps.append(rec.snapshot()))
    assert not t.is_alive(), "a read deadlocked on a shard's finalizer"
    s = snaps[0]["app_latency_seconds"].get()  # type: ignore[index]
    assert s.count == 4 and s.sum == pytest.approx(1.75)  # each observation once

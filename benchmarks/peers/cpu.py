"""Where the CPU goes during a load point: the server's process tree, the process at its root,
the load generator (this process's children) and the machine as a whole, in cores.

On a machine whose cores are shared by the server, its model workers and the load generator, a
stack's share of its offline ceiling is bounded by the cores left to the model: this measures
them in the same run as the throughput (``bench_peers.py`` reports it for every stack)."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Snapshot:
    wall: float
    processes: dict[int, float]  # pid -> user + system seconds, the server tree's processes
    root: int
    children: float  # user + system seconds of this process's waited-for children (wrk)
    busy: float  # machine: non-idle seconds over every CPU


def _cpu(p: Any) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def snapshot(root: int) -> Snapshot:
    """CPU seconds so far of ``root`` and its descendants, of this process's children, of the
    machine."""
    import psutil

    procs: dict[int, float] = {}
    try:
        top = psutil.Process(root)
        for p in [top, *top.children(recursive=True)]:
            try:
                procs[p.pid] = _cpu(p)
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = psutil.cpu_times()
    idle = m.idle + getattr(m, "iowait", 0.0)
    busy = sum(m) - idle
    return Snapshot(time.monotonic(), procs, root, kids.ru_utime + kids.ru_stime, busy)


def between(a: Snapshot, b: Snapshot) -> dict[str, float]:
    """Cores used from ``a`` to ``b``: ``server`` (the whole tree; a process that started in
    between counts whole), ``root`` (the tree's root process), ``workers`` (the rest),
    ``load_generator`` and ``machine``, with ``cpus`` for scale."""
    wall = max(b.wall - a.wall, 1e-9)
    deltas = {pid: t - a.processes.get(pid, 0.0) for pid, t in b.processes.items()}
    server = sum(max(0.0, d) for d in deltas.values()) / wall
    root = max(0.0, deltas.get(b.root, 0.0)) / wall
    return {
        "server": server,
        "root": root,
        "workers": max(0.0, server - root),
        "load_generator": max(0.0, b.children - a.children) / wall,
        "machine": max(0.0, b.busy - a.busy) / wall,
        "cpus": float(os.cpu_count() or 1),
    }

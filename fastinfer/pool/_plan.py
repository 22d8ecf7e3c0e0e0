"""CorePlan: the physical cores this process may use, split into disjoint worker slots."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastinfer._common.tables import render_table
from fastinfer.errors import ConfigError
from fastinfer.pool._topology import RawTopology, read_topology

__all__ = ["Core", "CorePlan", "Split", "WorkerCores", "cpus_str"]


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Core:
    """One physical core: its usable logical CPUs (SMT siblings), core id, socket and NUMA node."""

    cpus: tuple[int, ...]
    core_id: int
    socket: int
    node: int


class _OnCores:
    """Sockets and NUMA nodes of a set of cores (a worker's slot, or the whole plan)."""

    cores: tuple[Core, ...]

    @property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cores}))

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.node for c in self.cores}))


@dataclass(frozen=True)
class WorkerCores(_OnCores):
    """The share of one worker: the CPUs it is pinned to, its physical cores and thread count."""

    index: int
    cpus: tuple[int, ...]
    cores: tuple[Core, ...]
    threads: int


def cpus_str(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    for _, grp in itertools.groupby(enumerate(sorted(cpus)), lambda t: t[1] - t[0]):
        run = [c for _, c in grp]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


@dataclass(frozen=True)
class Split:
    """The result of :meth:`CorePlan.split`: one :class:`WorkerCores` per worker; prints a table."""

    workers: tuple[WorkerCores, ...]
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self) -> Any:
        return iter(self.workers)

    def __getitem__(self, i: int) -> WorkerCores:
        return self.workers[i]

    def __str__(self) -> str:
        rows = [
            (w.index, cpus_str(w.cpus), len(w.cores), w.threads, cpus_str(w.sockets),
             cpus_str(w.nodes))
            for w in self.workers
        ]  # fmt: skip
        text = render_table(["worker", "cpus", "cores", "threads", "socket", "node"], rows)
        return "\n".join([text, *(f"note: {n}" for n in self.notes)])


@dataclass(frozen=True)
class CorePlan(_OnCores):
    """The CPUs this process may use, grouped into physical cores, sockets and NUMA nodes.

    Build it with :meth:`detect`; ``print(plan)`` shows the layout and ``plan.split(n)`` divides
    the physical cores between ``n`` workers.
    """

    cores: tuple[Core, ...]
    quota_cpus: float | None = None
    online_cpus: int = 0
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.cores:
            raise ConfigError("a CorePlan needs at least one core")
        seen: set[int] = set()
        for core in self.cores:
            if not core.cpus or seen & set(core.cpus):
                raise ConfigError(f"cores must have disjoint, non-empty CPU sets; got {core}")
            seen |= set(core.cpus)
        if self.quota_cpus is not None and self.quota_cpus <= 0:
            raise ConfigError(f"quota_cpus must be > 0 or None, got {self.quota_cpus!r}")

    @classmethod
    def detect(
        cls,
        *,
        sysfs_root: str | os.PathLike[str] = "/sys",
        proc_root: str | os.PathLike[str] = "/proc",
        cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
    ) -> CorePlan:
        """Read the topology from sysfs/procfs/cgroups (the roots can point at a fake tree)."""
        return cls.from_raw(read_topology(sysfs_root, proc_root, cgroup_root))

    @classmethod
    def from_raw(cls, raw: RawTopology) -> CorePlan:
        by_key: dict[tuple[int, ...], list[int]] = {}
        for cpu in raw.usable:
            by_key.setdefault(raw.siblings[cpu], []).append(cpu)
        cores = [
            Core(tuple(cpus), raw.core_id[cpus[0]], raw.socket[cpus[0]], raw.node[cpus[0]])
            for cpus in by_key.values()
        ]
        cores.sort(key=lambda c: (c.node, c.socket, c.cpus[0]))
        return cls(tuple(cores), raw.quota_cpus, len(raw.online), raw.sources)

    @property
    def cpus(self) -> tuple[int, ...]:
        """Usable logical CPUs."""
        return tuple(sorted(c for core in self.cores for c in core.cpus))

    @property
    def physical_cores(self) -> int:
        return len(self.cores)

    @property
    def core_budget(self) -> int:
        """Physical cores worth of compute: the usable cores, capped by the cgroup quota."""
        if self.quota_cpus is None:
            return len(self.cores)
        return max(1, min(len(self.cores), int(self.quota_cpus + 1e-9)))

    def default_workers(self) -> int:
        """One single-thread worker per physical core the process may use (quota-capped)."""
        return self.core_budget

    def split(self, workers: int, *, smt: bool = False) -> Split:
        """Give each of ``workers`` workers a disjoint set of physical cores and a thread count.

        Workers never span sockets or NUMA nodes when the counts allow it (workers are shared out
        between nodes in proportion to their cores, then each node's cores are cut into
        contiguous runs that differ by at most one core). A worker gets one thread per physical
        core (``smt=True``: per logical CPU, and it is pinned to the siblings too); a cgroup
        quota caps the total. More workers than physical cores share cores one logical CPU each.
        Raises :class:`ConfigError` when there are more workers than usable CPUs.
        """
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
        notes: list[str] = []
        n_cpus = len(self.cpus)
        if workers > len(self.cores):
            if workers > n_cpus:
                raise ConfigError(
                    f"workers={workers} exceeds the {n_cpus} usable CPUs ({cpus_str(self.cpus)}); "
                    f"pass workers <= {n_cpus} (best: <= {len(self.cores)}, one per physical core)"
                )
            # Share SMT siblings: each worker gets whole logical CPUs, one thread.
            order = [(cpu, core) for core in self.cores for cpu in core.cpus]
            chunks = _even_chunks(len(order), workers)
            out, i = [], 0
            for w, size in enumerate(chunks):
                part = order[i : i + size]
                i += size
                held = tuple(dict.fromkeys(core for _, core in part))
                out.append(WorkerCores(w, tuple(sorted(c for c, _ in part)), held, 1))
            notes.append(
                f"{workers} workers > {len(self.cores)} physical cores: SMT siblings are shared"
            )
            return Split(tuple(out), tuple(notes))

        groups: dict[tuple[int, int], list[Core]] = {}
        for core in self.cores:
            groups.setdefault((core.node, core.socket), []).append(core)
        glist = list(groups.values())
        assigned: list[list[Core]] = []
        if workers >= len(glist):
            counts = [1] * len(glist)
            for _ in range(workers - len(glist)):
                # next worker to the group whose workers would have the most cores each
                best = max(
                    (g for g in range(len(glist)) if counts[g] < len(glist[g])),
                    key=lambda g: (len(glist[g]) / (counts[g] + 1), -g),
                )
                counts[best] += 1
            for g, cores in enumerate(glist):
                i = 0
                for size in _even_chunks(len(cores), counts[g]):
                    assigned.append(cores[i : i + size])
                    i += size
        else:
            # Fewer workers than nodes/sockets: spanning is unavoidable; give whole groups.
            assigned = [[] for _ in range(workers)]
            for cores in sorted(glist, key=len, reverse=True):
                min(assigned, key=len).extend(cores)
            notes.append(
                f"{workers} worker(s) for {len(glist)} socket/NUMA groups: workers span groups"
            )
        assigned.sort(key=lambda cs: (cs[0].node, cs[0].socket, cs[0].cpus[0]))
        want = [sum(len(c.cpus) for c in cs) if smt else len(cs) for cs in assigned]
        threads = list(want)
        if self.quota_cpus is not None:
            cap = max(workers, int(self.quota_cpus + 1e-9))
            if sum(want) > cap:
                threads = _apportion(want, cap)
                notes.append(
                    f"cgroup quota of {self.quota_cpus:g} CPUs caps threads at {cap} in total"
                )
        out = [
            WorkerCores(
                w,
                tuple(sorted(c for core in cs for c in (core.cpus if smt else core.cpus[:1]))),
                tuple(cs),
                threads[w],
            )
            for w, cs in enumerate(assigned)
        ]
        return Split(tuple(out), tuple(notes))

    def __str__(self) -> str:
        quota = "none" if self.quota_cpus is None else f"{self.quota_cpus:g} CPUs"
        head = (
            f"CorePlan: {len(self.cpus)} usable CPUs (of {self.online_cpus or '?'} online), "
            f"{len(self.cores)} physical cores, {len(self.sockets)} socket(s), "
            f"{len(self.nodes)} NUMA node(s), cgroup quota {quota}"
        )
        rows = [(c.core_id, cpus_str(c.cpus), c.socket, c.node) for c in self.cores]
        return head + "\n" + render_table(["core", "cpus", "socket", "node"], rows)


def _even_chunks(n: int, k: int) -> list[int]:
    """Sizes of ``k`` contiguous chunks of ``n`` items, differing by at most one (larger first)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _apportion(weights: Sequence[int], total: int) -> list[int]:
    """Split ``total`` (>= len(weights)) in proportion to ``weights``, each >= 1 (largest remainder)."""
    s = sum(weights)
    exact = [w * total / s for w in weights]
    out = [max(1, int(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(out) < total:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > total:
        j = max(range(len(out)), key=lambda i: out[i])
        out[j] -= 1
    return out

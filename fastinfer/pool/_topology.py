"""CPU topology (private): sysfs/procfs/cgroup parsing, :class:`CorePlan` and :func:`configure_threads`.

The public names are re-exported by :mod:`fastinfer.pool` and :mod:`fastinfer`.

Everything is read from files under three roots so the parsing can be tested on fake trees:

- ``{sysfs}/devices/system/cpu/online`` and ``cpuN/topology/{core_id,physical_package_id,
  thread_siblings_list|core_cpus_list}``: logical CPUs, their physical core and socket. The core
  is identified by its sibling list, never by lscpu-style numbering, so adjacent-sibling layouts
  (cpu0+cpu1 on one core) and split layouts (cpu0+cpuN/2) both come out right.
- ``{sysfs}/devices/system/node/nodeN/cpulist``: NUMA nodes.
- ``{proc}/self/status`` (``Cpus_allowed_list``): the affinity mask this process inherited.
- ``{proc}/self/cgroup`` and ``{cgroup}``: the cpuset (v1 ``cpuset.cpus``/``cpuset.effective_cpus``,
  v2 ``cpuset.cpus.effective``) and the CPU quota (v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``,
  v2 ``cpu.max``), walking from the process's cgroup up to the root and keeping the tightest.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastinfer.errors import ConfigError

__all__ = [
    "THREAD_VARS",
    "Core",
    "CorePlan",
    "RawTopology",
    "Split",
    "ThreadSettings",
    "WorkerCores",
    "configure_threads",
    "cpus_str",
    "parse_cpulist",
    "read_topology",
]


def parse_cpulist(text: str) -> list[int]:
    """Parse a kernel CPU list such as ``"0-3,8,10-11"`` (empty string -> [])."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                stride = 1
                if ":" in hi:  # "0-15:2" (rare, used by some cpusets)
                    hi, s = hi.split(":", 1)
                    stride = int(s)
                cpus.update(range(int(lo), int(hi) + 1, stride))
            else:
                cpus.add(int(part))
        except ValueError:
            raise ConfigError(f"cannot parse CPU list {text!r} (bad part {part!r})") from None
    return sorted(cpus)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class RawTopology:
    """What was read: usable CPUs and, per usable CPU, its core key, core id, socket and node."""

    online: tuple[int, ...]
    usable: tuple[int, ...]
    siblings: dict[int, tuple[int, ...]]  # cpu -> all its SMT siblings (usable or not)
    core_id: dict[int, int]
    socket: dict[int, int]
    node: dict[int, int]
    quota_cpus: float | None
    cpuset: tuple[int, ...] | None
    affinity: tuple[int, ...]
    sources: tuple[str, ...]


def _cgroup_paths(proc: Path) -> tuple[str | None, dict[str, str]]:
    """(v2 path, {v1 controller: path}) from /proc/self/cgroup."""
    text = _read(proc / "self" / "cgroup")
    v2: str | None = None
    v1: dict[str, str] = {}
    if text is None:
        return "/", {"cpu": "/", "cpuset": "/"}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        for c in controllers.split(","):
            if c:
                v1[c] = path
    return v2, v1


def _walk(root: Path, path: str) -> list[Path]:
    """Directories from the process's cgroup up to the mount root (the root alone if not found).

    In a container /proc/self/cgroup may name the host path while the mount is the container's
    own cgroup, so a path that does not exist under the root falls back to the root.
    """
    leaf = root / path.lstrip("/")
    if not leaf.is_dir():
        return [root]
    dirs = []
    cur = leaf
    while True:
        dirs.append(cur)
        if cur == root or root not in cur.parents:
            break
        cur = cur.parent
    return dirs


def _v2_quota(d: Path) -> float | None:
    text = _read(d / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(d: Path) -> float | None:
    q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    try:
        quota, period = int(q or "-1"), int(p or "100000")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_limits(
    proc: Path, cgroup: Path, sources: list[str]
) -> tuple[float | None, list[int] | None]:
    v2_path, v1 = _cgroup_paths(proc)
    quotas: list[float] = []
    cpuset: list[int] | None = None
    # cgroup v2 (unified): the root itself, or /sys/fs/cgroup/unified on hybrid hosts.
    if v2_path is not None:
        for root in (cgroup, cgroup / "unified"):
            if not (root / "cgroup.controllers").exists() and not (root / "cpu.max").exists():
                continue
            for d in _walk(root, v2_path):
                q = _v2_quota(d)
                if q is not None:
                    quotas.append(q)
                    sources.append(f"quota {q:g} CPUs from {d / 'cpu.max'}")
                if cpuset is None and (text := _read(d / "cpuset.cpus.effective")):
                    cpuset = parse_cpulist(text)
                    sources.append(f"cpuset from {d / 'cpuset.cpus.effective'}")
    # cgroup v1: one hierarchy per controller, mounted as cpu, cpu,cpuacct or cpuacct,cpu.
    for controller in ("cpu", "cpuset"):
        if controller not in v1:
            continue
        names: list[str] = [controller]
        if controller == "cpu":
            names += ["cpu,cpuacct", "cpuacct,cpu"]
        for name in names:
            root = cgroup / name
            if not root.is_dir():
                continue
            for d in _walk(root, v1[controller]):
                if controller == "cpu":
                    q = _v1_quota(d)
                    if q is not None:
                        quotas.append(q)
                        sources.append(f"quota {q:g} CPUs from {d / 'cpu.cfs_quota_us'}")
                elif cpuset is None:
                    for fname in ("cpuset.effective_cpus", "cpuset.cpus"):
                        if text := _read(d / fname):
                            cpuset = parse_cpulist(text)
                            sources.append(f"cpuset from {d / fname}")
                            break
            break
    return (min(quotas) if quotas else None), cpuset


def read_topology(
    sysfs_root: str | os.PathLike[str] = "/sys",
    proc_root: str | os.PathLike[str] = "/proc",
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
) -> RawTopology:
    """Read the CPU topology under the three roots (see the module docstring)."""
    sysfs, proc, cgroup = Path(sysfs_root), Path(proc_root), Path(cgroup_root)
    cpu_dir = sysfs / "devices" / "system" / "cpu"
    sources: list[str] = []
    online_text = _read(cpu_dir / "online")
    if online_text:
        online = parse_cpulist(online_text)
    else:
        online = sorted(
            int(m.group(1))
            for p in (cpu_dir.iterdir() if cpu_dir.is_dir() else [])
            if (m := re.fullmatch(r"cpu(\d+)", p.name))
        )
    if not online:
        n = os.cpu_count() or 1
        online = list(range(n))
        sources.append(f"no CPUs under {cpu_dir}; assumed {n} CPUs without topology")

    status = _read(proc / "self" / "status")
    affinity: list[int] | None = None
    if status:
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                affinity = parse_cpulist(line.split(":", 1)[1])
                sources.append(f"affinity from {proc / 'self' / 'status'}")
    if affinity is None:
        if hasattr(os, "sched_getaffinity") and Path(proc_root) == Path("/proc"):
            affinity = sorted(os.sched_getaffinity(0))
        else:
            affinity = list(online)

    quota, cpuset = _cgroup_limits(proc, cgroup, sources)
    usable_set = set(online) & set(affinity)
    if cpuset is not None:
        usable_set &= set(cpuset)
    usable = sorted(usable_set)
    if not usable:
        raise ConfigError(
            f"no usable CPU: online {online}, affinity {affinity}, cpuset {cpuset}; "
            "check the roots passed to CorePlan.detect()"
        )

    siblings: dict[int, tuple[int, ...]] = {}
    core_id: dict[int, int] = {}
    socket: dict[int, int] = {}
    for cpu in usable:
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        sib = _read(topo / "thread_siblings_list") or _read(topo / "core_cpus_list")
        siblings[cpu] = tuple(parse_cpulist(sib)) if sib else (cpu,)
        if cpu not in siblings[cpu]:
            siblings[cpu] = tuple(sorted({*siblings[cpu], cpu}))
        cid, pkg = _read(topo / "core_id"), _read(topo / "physical_package_id")
        core_id[cpu] = int(cid) if cid and cid.lstrip("-").isdigit() else cpu
        socket[cpu] = max(0, int(pkg)) if pkg and pkg.lstrip("-").isdigit() else 0

    node: dict[int, int] = {}
    node_dir = sysfs / "devices" / "system" / "node"
    if node_dir.is_dir():
        for p in sorted(node_dir.iterdir()):
            m = re.fullmatch(r"node(\d+)", p.name)
            if m and (text := _read(p / "cpulist")) is not None:
                for cpu in parse_cpulist(text):
                    node[cpu] = int(m.group(1))
    for cpu in usable:
        node.setdefault(cpu, 0)

    return RawTopology(
        online=tuple(online),
        usable=tuple(usable),
        siblings=siblings,
        core_id=core_id,
        socket=socket,
        node={c: node[c] for c in usable},
        quota_cpus=quota,
        cpuset=None if cpuset is None else tuple(cpuset),
        affinity=tuple(affinity),
        sources=tuple(sources),
    )


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


@dataclass(frozen=True)
class WorkerCores:
    """The share of one worker: the CPUs it is pinned to, its physical cores and thread count."""

    index: int
    cpus: tuple[int, ...]
    cores: tuple[Core, ...]
    threads: int

    @property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cores}))

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.node for c in self.cores}))


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, cells)])


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
        text = _table(["worker", "cpus", "cores", "threads", "socket", "node"], rows)
        return "\n".join([text, *(f"note: {n}" for n in self.notes)])


@dataclass(frozen=True)
class CorePlan:
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
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cores}))

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.node for c in self.cores}))

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
        return head + "\n" + _table(["core", "cpus", "socket", "node"], rows)


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


# --------------------------------------------------------------------------------------------
# Single-process thread configuration
# --------------------------------------------------------------------------------------------

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`configure_threads` set."""

    threads: int
    interop: int
    env: Mapping[str, str]


def configure_threads(threads: int | None = None, *, interop: int | None = None) -> ThreadSettings:
    """Set torch's intra-op threads, OMP/MKL/OpenBLAS variables and (optionally) inter-op threads.

    ``threads`` defaults to the physical cores this process may use, capped by the cgroup quota
    (:attr:`CorePlan.core_budget`), which is what torch gets wrong in containers and with SMT.

    Ordering caveat: torch sizes its pools when it is imported and OpenMP reads OMP_NUM_THREADS
    once, so for the *environment variables* to matter to this process set them (or call this)
    before ``import torch``; ``torch.set_num_threads`` still takes effect afterwards, and the
    variables reach child processes. Inter-op threads can be set only once per process, before
    any inter-op work: a later attempt raises :class:`ConfigError`.

        >>> configure_threads(4, interop=1)   # at the top of the service
    """
    import torch  # here, not at module level: importing fastinfer must not import torch

    if threads is None:
        threads = CorePlan.detect().core_budget
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    if interop is not None and (
        not isinstance(interop, int) or isinstance(interop, bool) or interop < 1
    ):
        raise ConfigError(f"interop must be an int >= 1 or None, got {interop!r}")
    if interop is not None and torch.get_num_interop_threads() != interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot set inter-op threads to {interop} (now {torch.get_num_interop_threads()}): "
                "torch allows it only once per process, before any inter-op work has started. "
                "Call configure_threads(interop=...) at the very start of the program, or leave "
                f"interop=None. ({exc})"
            ) from exc
    env = {name: str(threads) for name in THREAD_VARS}
    os.environ.update(env)
    torch.set_num_threads(threads)
    return ThreadSettings(threads, torch.get_num_interop_threads(), env)

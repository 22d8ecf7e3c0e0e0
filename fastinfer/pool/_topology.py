"""Reading the CPU topology (private): sysfs, procfs and cgroup parsing into a RawTopology.

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

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fastinfer.errors import ConfigError

__all__ = ["RawTopology", "parse_cpulist", "read_topology"]


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

"""CorePlan on synthetic sysfs/procfs/cgroup trees, and configure_threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_python

from fastinfer import ConfigError, CorePlan, configure_threads
from fastinfer.pool import parse_cpulist


def fake_tree(
    root: Path,
    *,
    cores: list[tuple[int, int, list[int]]],  # (socket, core_id, sibling cpus)
    nodes: dict[int, list[int]] | None = None,
    allowed: str | None = None,
    cgroup_lines: str | None = None,
    files: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Build sys/, proc/ and cgroup/ under ``root``; returns the three roots for CorePlan.detect."""
    sysfs, proc, cgroup = root / "sys", root / "proc", root / "cgroup"
    all_cpus = sorted(c for _, _, sib in cores for c in sib)
    cpu_dir = sysfs / "devices/system/cpu"
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "online").write_text(f"{all_cpus[0]}-{all_cpus[-1]}\n")
    for socket_id, core_id, sib in cores:
        for cpu in sib:
            topo = cpu_dir / f"cpu{cpu}" / "topology"
            topo.mkdir(parents=True)
            (topo / "core_id").write_text(f"{core_id}\n")
            (topo / "physical_package_id").write_text(f"{socket_id}\n")
            (topo / "thread_siblings_list").write_text(",".join(map(str, sib)) + "\n")
    for node, cpus in (nodes or {}).items():
        d = sysfs / f"devices/system/node/node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(",".join(map(str, cpus)) + "\n")
    (proc / "self").mkdir(parents=True)
    (proc / "self/status").write_text(
        f"Name:\tpython\nCpus_allowed_list:\t{allowed or f'{all_cpus[0]}-{all_cpus[-1]}'}\n"
    )
    (proc / "self/cgroup").write_text(cgroup_lines if cgroup_lines is not None else "0::/\n")
    cgroup.mkdir()
    for rel, text in (files or {}).items():
        p = cgroup / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return {"sysfs_root": sysfs, "proc_root": proc, "cgroup_root": cgroup}


# 4 cores with adjacent sibling numbering: core k = cpus 2k and 2k+1 (what lscpu-id launchers get wrong)
ADJACENT = [(0, k, [2 * k, 2 * k + 1]) for k in range(4)]
# 2 sockets x 4 cores, siblings split (cpu i and i+8), one NUMA node per socket
TWO_SOCKETS = [(s, k, [s * 4 + k, s * 4 + k + 8]) for s in range(2) for k in range(4)]
TWO_NODES = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-3", [0, 1, 2, 3]),
        ("0,2,4-5", [0, 2, 4, 5]),
        ("", []),
        ("1\n", [1]),
        ("0-6:2", [0, 2, 4, 6]),
    ],
    ids=["range", "mixed", "empty", "newline", "stride"],
)
def test_parse_cpulist(text: str, expected: list[int]) -> None:
    assert parse_cpulist(text) == expected


def test_parse_cpulist_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="x-y"):
        parse_cpulist("x-y")


def test_adjacent_siblings_are_one_core(tmp_path: Path) -> None:
    plan = CorePlan.detect(**fake_tree(tmp_path, cores=ADJACENT))
    assert plan.physical_cores == 4
    assert [c.cpus for c in plan.cores] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    split = plan.split(2)
    # one CPU per physical core (never two siblings of one core), one thread per core
    assert [w.cpus for w in split] == [(0, 2), (4, 6)]
    assert [w.threads for w in split] == [2, 2]
    smt = plan.split(2, smt=True)
    assert [w.cpus for w in smt] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [w.threads for w in smt] == [4, 4]


def test_two_sockets_never_spanned(tmp_path: Path) -> None:
    plan = CorePlan.detect(**fake_tree(tmp_path, cores=TWO_SOCKETS, nodes=TWO_NODES))
    assert plan.sockets == (0, 1) and plan.nodes == (0, 1) and plan.physical_cores == 8
    for n in (2, 3, 4, 5, 8):
        split = plan.split(n)
        assert len(split) == n
        for w in split:
            assert len(w.sockets) == 1 and len(w.nodes) == 1, (n, w)
        used = [c for w in split for c in w.cpus]
        assert len(used) == len(set(used)), "workers must get disjoint CPUs"
    # uneven: 3 workers -> socket 0 holds two workers of 2 cores, socket 1 one of 4
    assert [(w.cpus, w.threads) for w in plan.split(3)] == [
        ((0, 1), 2),
        ((2, 3), 2),
        ((4, 5, 6, 7), 4),
    ]
    one = plan.split(1)
    assert one[0].sockets == (0, 1) and one[0].threads == 8
    assert any("span" in note for note in one.notes)


def test_cpuset_and_affinity_restrict_the_plan(tmp_path: Path) -> None:
    roots = fake_tree(
        tmp_path,
        cores=TWO_SOCKETS,
        nodes=TWO_NODES,
        allowed="0-7,8-15",
        cgroup_lines="3:cpuset:/job\n1:cpu,cpuacct:/job\n0::/\n",
        files={"cpuset/job/cpuset.cpus": "4-7,12-15\n"},
    )
    plan = CorePlan.detect(**roots)
    assert plan.cpus == (4, 5, 6, 7, 12, 13, 14, 15)
    assert plan.sockets == (1,) and plan.physical_cores == 4
    # and an inherited affinity mask narrower than the cpuset wins too (never widened)
    (roots["proc_root"] / "self/status").write_text("Cpus_allowed_list:\t5,13\n")
    plan = CorePlan.detect(**roots)
    assert plan.cpus == (5, 13) and plan.physical_cores == 1
    assert plan.split(1)[0].cpus == (5,)


def test_cgroup_v1_quota_caps_threads(tmp_path: Path) -> None:
    roots = fake_tree(
        tmp_path,
        cores=ADJACENT,
        cgroup_lines="2:cpu,cpuacct:/docker/abc\n",
        files={
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        },
    )
    plan = CorePlan.detect(**roots)
    assert plan.quota_cpus == pytest.approx(1.5)
    assert plan.core_budget == 1 and plan.default_workers() == 1
    split = plan.split(2)
    assert [w.threads for w in split] == [1, 1]  # 4 cores but 1.5 CPUs of quota
    assert any("quota" in n for n in split.notes)
    assert "1.5 CPUs" in str(plan)


def test_cgroup_v2_quota_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    roots = fake_tree(
        tmp_path,
        cores=TWO_SOCKETS,
        nodes=TWO_NODES,
        cgroup_lines="0::/kubepods/pod1\n",
        files={
            "cgroup.controllers": "cpuset cpu\n",
            "kubepods/cpu.max": "300000 100000\n",
            "kubepods/pod1/cpu.max": "max 100000\n",
            "kubepods/pod1/cpuset.cpus.effective": "0-3,8-11\n",
        },
    )
    plan = CorePlan.detect(**roots)
    assert plan.quota_cpus == pytest.approx(3.0)
    assert plan.physical_cores == 4 and plan.core_budget == 3
    assert sum(w.threads for w in plan.split(2)) == 3


def test_container_path_missing_falls_back_to_the_mount_root(tmp_path: Path) -> None:
    roots = fake_tree(
        tmp_path,
        cores=ADJACENT,
        cgroup_lines="0::/system.slice/docker-123.scope\n",
        files={"cgroup.controllers": "cpu\n", "cpu.max": "200000 100000\n"},
    )
    assert CorePlan.detect(**roots).quota_cpus == pytest.approx(2.0)


def test_more_workers_than_cores_share_siblings_and_too_many_is_an_error(tmp_path: Path) -> None:
    plan = CorePlan.detect(**fake_tree(tmp_path, cores=ADJACENT))
    split = plan.split(8)
    assert [w.cpus for w in split] == [(c,) for c in range(8)]
    assert all(w.threads == 1 for w in split)
    with pytest.raises(ConfigError, match=r"workers=9 exceeds the 8 usable CPUs"):
        plan.split(9)
    with pytest.raises(ConfigError, match="workers must be an int >= 1"):
        plan.split(0)


def test_plan_and_split_print_tables(tmp_path: Path) -> None:
    plan = CorePlan.detect(**fake_tree(tmp_path, cores=TWO_SOCKETS, nodes=TWO_NODES))
    text = str(plan)
    assert "16 usable CPUs" in text and "2 socket(s)" in text and "2 NUMA node(s)" in text
    assert "core  cpus  socket  node" in text and "0,8" in text
    table = str(plan.split(2))
    assert table.splitlines()[0].split() == ["worker", "cpus", "cores", "threads", "socket", "node"]
    assert "0-3" in table and "4-7" in table


def test_detect_on_this_machine_matches_the_affinity_mask() -> None:
    plan = CorePlan.detect()
    assert set(plan.cpus) <= os.sched_getaffinity(0)
    assert plan.physical_cores >= 1 and plan.core_budget >= 1


def test_configure_threads_sets_torch_and_env_together() -> None:
    settings = configure_threads(1)
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    assert settings.threads == 1 and settings.env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ConfigError, match="threads must be an int >= 1"):
        configure_threads(0)


def test_configure_threads_interop_only_once() -> None:
    code = (
        "import json, torch, fastinfer\n"
        "s = fastinfer.configure_threads(interop=1)\n"
        "torch.ones(4).add_(1)\n"
        "out = {'threads': torch.get_num_threads(), 'interop': torch.get_num_interop_threads(),\n"
        "       'default': s.threads, 'budget': fastinfer.CorePlan.detect().core_budget}\n"
        "fastinfer.configure_threads(interop=1)  # same value again: fine\n"
        "try:\n"
        "    fastinfer.configure_threads(interop=2)\n"
        "except fastinfer.ConfigError as e:\n"
        "    out['error'] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(run_python(code).stdout)
    assert out["interop"] == 1 and out["threads"] == out["default"] == out["budget"]
    assert "only once per process" in out["error"]

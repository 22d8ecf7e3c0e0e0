"""benchmarks/bench_peers.py's parts that need no peer: wrk's script and output, the table."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # serve_fastinfer (imported by the benchmark) builds a FastAPI app

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "peers"))
import bench_peers  # noqa: E402 (after the importorskip)
import common  # noqa: E402
import cpu  # noqa: E402
import load  # noqa: E402

WRK_OUT = """Running 3s test @ http://127.0.0.1:8000/predict
  1 threads and 64 connections
  Latency Distribution
     50%   35.00ms
WRK_JSON {"requests": 600, "duration_us": 3000000, "connect": 0, "read": 2, "write": 0, \
"status": 10, "timeout": 1, "malformed": 3, "p50_us": 35000, "p90_us": 80000, \
"p99_us": 250000, "max_us": 300000, "mean_us": 47000.5}
"""


def test_parse_wrk_counts_non_200_errors_and_latency() -> None:
    p = load.parse_wrk(WRK_OUT, 64)
    assert (p.kind, p.level, p.seconds, p.requests) == ("closed", 64, 3.0, 600)
    assert (p.ok, p.non_200, p.errors) == (587, 10, 6)  # errors: read + timeout + malformed
    assert p.rps == pytest.approx(587 / 3.0)
    assert (p.p50_s, p.p99_s) == (0.035, 0.25)


def test_parse_wrk_with_no_answer_has_no_latency() -> None:
    empty = WRK_OUT.replace('"requests": 600', '"requests": 0').replace(
        '"status": 10', '"status": 0'
    )
    p = load.parse_wrk(empty, 64)
    assert (p.ok, p.rps) == (0, 0.0)
    assert math.isnan(p.p50_s) and math.isnan(p.p99_s)


def test_parse_wrk_without_summary_line_fails_loudly() -> None:
    with pytest.raises(ValueError, match="WRK_JSON"):
        load.parse_wrk("Running 3s test\nsocket errors", 1)


def test_wrk_script_holds_every_body_escaped() -> None:
    bodies = [json.dumps({"text": t}) for t in ('say "hi"', "back\\slash", "plain words")]
    lua = load.wrk_script(bodies)
    for b in bodies:
        assert load.lua_string(b) in lua
    assert lua.count("WRK_JSON ") == 1
    assert "%(" not in lua  # every template field filled


def test_the_models_match_the_issue_and_the_demo() -> None:
    enc = common.MODELS["encoder64"]
    assert {k: enc.model_kw[k] for k in ("d_model", "nhead", "num_layers", "dim_feedforward")} == {
        "d_model": 256,
        "nhead": 4,
        "num_layers": 4,
        "dim_feedforward": 1024,
    }
    ids = enc.tokenizer()(enc.texts(4))["input_ids"]
    assert ids.shape == (4, 64)  # every request exactly 64 tokens
    mini = common.MODELS["bert-mini"]
    from fastinfer._cli.demo import model as demo_model

    assert mini.model_kw == demo_model.MODEL_KW
    assert mini.texts(3, seed=2) == demo_model.texts(3, seed=2)


def _point(kind: str, level: float, rps: float) -> load.PointResult:
    return load.PointResult(kind, level, 3.0, int(rps * 3), int(rps * 3), 0, 0, rps, 0.02, 0.1)


def test_table_shows_measured_and_missing_stacks() -> None:
    plan = bench_peers.Plan(connections=(1, 64), rates=(50.0,), seconds=3, warmup_seconds=1,
                            ceiling_seconds=1)  # fmt: skip
    ok = bench_peers.StackResult("plain", "bert-mini", shape="1 proc x default threads")
    ok.ceiling, ok.answers = 200.0, "ok"
    ok.points = [_point("closed", 1, 40), _point("closed", 64, 100), _point("open", 50, 49)]
    missing = bench_peers.StackResult(
        "torchserve", "bert-mini", "not installed", "pip install failed (1): no Java"
    )
    table = bench_peers.model_table([ok, missing], plan)
    lines = table.splitlines()
    assert "c=64 / ceiling" in lines[0] and "open 50/s" in lines[0]
    assert "100 (20/100)" in lines[2] and "50%" in lines[2]  # 100 req/s of a 200 ceiling
    assert "not installed: pip install failed (1): no Java" in lines[3]
    assert "CPU at c=64" in lines[0] and lines[2].count(" - ") >= 1  # no CPU measured: "-"
    ok.points[1].detail["cpu"] = {"server": 1.9, "root": 0.2, "workers": 1.7,
                                  "load_generator": 0.05, "machine": 2.0, "cpus": 2.0}  # fmt: skip
    assert "1.90 (0.20 + 1.70) / 0.05 / 2.00" in bench_peers.model_table([ok], plan)


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 2: pass"
SERVER = (
    "import subprocess, sys, time\n"
    f"c = subprocess.Popen([sys.executable, '-c', {BURN!r}])\n"
    "time.sleep(3)\nc.kill()"
)


def test_cpu_accounting_splits_the_servers_root_from_its_workers() -> None:
    import time

    server = subprocess.Popen([sys.executable, "-c", SERVER])  # sleeps while its child burns
    try:
        time.sleep(0.5)  # the child is running
        before = cpu.snapshot(server.pid)
        time.sleep(1.0)
        used = cpu.between(before, cpu.snapshot(server.pid))
    finally:
        server.kill()
        server.wait()
    assert used["workers"] > 0.2  # the child burned CPU in the window
    assert used["root"] < 0.1  # the root slept
    assert used["server"] == pytest.approx(used["root"] + used["workers"])
    assert used["machine"] >= used["workers"] * 0.9 and used["cpus"] >= 1


def test_every_stack_is_selectable_and_fastinfer_stacks_are_not_peers() -> None:
    stacks = bench_peers.STACKS
    assert set(stacks) == {"plain", "torchserve", "torchserve-omp1", "litserve", "ray",
                           "fastinfer-batching", "fastinfer-inprocess", "fastinfer-full"}  # fmt: skip
    assert bench_peers.TARGET_STACK in stacks
    assert not stacks["fastinfer-full"].peer and stacks["torchserve"].peer
    assert not stacks["fastinfer-inprocess"].peer
    # the docs' configuration: one single-thread worker process per physical core
    assert stacks["fastinfer-full"].shape.slots == 1 and stacks["fastinfer-full"].shape.threads == 1
    assert stacks["torchserve-omp1"].shape.describe() == "2 proc x 1 thread"
    for s in stacks.values():
        assert (BENCH / "peers" / s.script).exists()

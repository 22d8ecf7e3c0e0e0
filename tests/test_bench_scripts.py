"""The issue-15 benchmark scripts: the FLOP count bench_ceiling divides by, and gpu_check on a
machine without a GPU (a clear message and a clean exit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_python

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_ceiling
import gpu_check


def test_valid_token_flops_count_only_valid_tokens() -> None:
    shape = {"d": 4, "layers": 2, "heads": 1, "ffn": 8}
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    d, f, c = 4, 8, bench_ceiling.LABELS

    def seq(length: int) -> float:
        layer = 2 * length * (4 * d * d + 2 * d * f) + 4 * length * length * d
        return 2 * layer + 2 * d * d + 2 * d * c

    assert bench_ceiling.valid_flops(shape, mask) == seq(3) + seq(1)
    padded = torch.tensor([[1, 1, 1, 0, 0, 0]])  # more padding, same work
    assert bench_ceiling.valid_flops(shape, padded) == seq(3)


def _run_gpu_check(*args: str) -> tuple[int, str, str]:
    script = str(Path(gpu_check.__file__))
    argv = [script, *args]
    code = (
        f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({script!r}, run_name='__main__')"
    )
    # CUDA_VISIBLE_DEVICES="": no GPU even on a machine that has one
    proc = run_python(code, env={"CUDA_VISIBLE_DEVICES": ""}, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_gpu_check_without_a_gpu_says_so_and_exits_cleanly() -> None:
    rc, out, err = _run_gpu_check()
    assert rc == 0, err
    assert "gpu_check: no CUDA GPU on this machine" in out and "nothing to check" in out
    assert "Traceback" not in err
    rc, out, _ = _run_gpu_check("--require-gpu")
    assert rc == 2 and "no CUDA GPU" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_check_reports_why_and_the_table_renders() -> None:
    assert gpu_check.no_gpu_message() is not None
    rows = gpu_check.run(limit_seconds=0)  # past the deadline: every step is reported, none run
    assert [r["status"] for r in rows] == ["not run"] * 5
    assert "compile cache on GPU" in gpu_check.table(rows)


def test_every_benchmark_script_imports() -> None:
    """A module a benchmark imports can move (the layout change did, and bench_dense.py kept the
    old path): every script is imported in a fresh interpreter, its main() left unrun."""
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
    assert "bench_dense" in names and len(names) >= 10
    code = (
        "import importlib, sys; sys.path.insert(0, 'benchmarks'); "
        f"[importlib.import_module(n) for n in {names!r}]; print('ok')"
    )
    assert run_python(code, timeout=240).stdout.strip().endswith("ok")

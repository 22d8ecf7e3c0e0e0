"""`fastinfer demo` (the README's first command) runs end to end and reports both stacks."""

import json
from pathlib import Path

import pytest
from conftest import run_python

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def warning_lines(text: str) -> list[str]:
    """Lines of a warning a library printed (``UserWarning: ...``, ``WARNING: ...``)."""
    return [line for line in text.splitlines() if "warning" in line.lower()]


def test_demo_quick_compares_both_stacks_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code = f"import sys; from fastinfer.__main__ import main; sys.exit(main(['demo', '--quick', '--out', {str(out)!r}]))"
    # stdout and stderr are pipes, as when a newcomer's run goes to a log file
    proc = run_python(code, timeout=300, env={"FASTINFER_PROGRESS": ""})
    printed = proc.stdout
    # clean output: no library warning the user cannot act on (torch's nested-tensor prototype
    # warning was printed twice before), and no progress bar drawn into a file
    assert warning_lines(proc.stderr) == [] and warning_lines(printed) == [], proc.stderr
    assert "\r" not in printed + proc.stderr, "a progress bar was drawn into a pipe"
    stages = [line for line in printed.splitlines() if line.startswith("  ") and " s" in line]
    assert any(line.strip().startswith("starting fastinfer") for line in stages), printed
    assert any(line.strip().startswith("fastinfer c=64") for line in stages), printed
    assert "plain req/s" in printed and "fastinfer req/s" in printed
    assert "dynamic batching" in printed and "attention swap" in printed
    report = json.loads((out / "report.json").read_text())
    modes = {(r["mode"], r["concurrency"]): r for r in report["rows"]}
    for level in report["levels"]:
        for mode in ("plain", "fastinfer"):
            row = modes[(mode, level)]
            assert row["ok"] == row["sent"] > 0, row  # every request answered 200
    assert modes[("fastinfer", max(report["levels"]))]["mean_batch"] > 1  # it batched
    assert (out / "report.png").stat().st_size > 10_000

"""Every example runs, as a user would run it."""

import ast
import asyncio
import sys

import pytest
from conftest import ROOT, run_python

EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.serve


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ("text_classification_service.py", "batches run"),
        ("image_service.py", "graphs compiled while serving: 0"),
        ("sync_endpoint.py", "requests in"),
        ("pool_service.py", "256 results"),
    ],
)
def test_example_runs(script: str, expect: str) -> None:
    code = f"import runpy, sys; sys.argv = [{script!r}]; runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')"
    proc = run_python(code, timeout=240)
    assert expect in proc.stdout, proc.stdout
    # a newcomer's run prints no library warning (stderr is a pipe here, as in a log file)
    warnings = [line for line in proc.stderr.splitlines() if "Warning" in line]
    assert warnings == [], proc.stderr


def test_notebook_example_runs_with_top_level_await(capsys: pytest.CaptureFixture[str]) -> None:
    source = (EXAMPLES / "notebook_batching.py").read_text()
    code = compile(source, "notebook_batching.py", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

    async def cell_runner() -> None:  # what Jupyter does: run cells inside its running loop
        result = eval(code, {"__name__": "__notebook__"})
        if asyncio.iscoroutine(result):
            await result

    asyncio.run(cell_runner())
    out = capsys.readouterr().out
    assert "100 results from" in out and "torch.Size([8])" in out
    assert sys.modules.get("fastinfer") is not None

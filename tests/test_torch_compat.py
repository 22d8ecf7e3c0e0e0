"""Every private torch API fastinfer uses still has the shape fastinfer relies on.

One test per entry of :data:`fastinfer._torch_compat.ENTRIES`: on a torch where an API changed,
CI fails here by name, instead of a statistic silently reading 0 or a reason being silently wrong.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_python

from fastinfer import _torch_compat as compat

# The probes compile, load kernels and set process-wide caches (inductor's ISA probe, dynamo's
# counters): they run once, in a fresh interpreter, so the rest of the suite sees a clean process.
_PROBES = """
import json
from fastinfer import _torch_compat as c
print(json.dumps({n: c.check(n) for n in c.ENTRIES}))
"""


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str]:
    out = run_python(_PROBES, timeout=240).stdout.strip().splitlines()[-1]
    return dict(json.loads(out))


@pytest.mark.parametrize("name", sorted(compat.ENTRIES))
def test_probe_holds_on_this_torch(name: str, verdicts: dict[str, str]) -> None:
    entry = compat.ENTRIES[name]
    verdict = verdicts[name]
    assert verdict == "", (
        f"private torch API {entry.api!r} (used by {entry.used_by}; known for torch "
        f"{entry.known_versions}) no longer holds on torch {torch.__version__}: {verdict}"
    )


@pytest.mark.parametrize("name", sorted(compat.ENTRIES))
def test_entry_is_documented(name: str) -> None:
    entry = compat.ENTRIES[name]
    assert entry.api and entry.used_by
    assert re.fullmatch(r"\d+\.\d+ - \d+\.\d+", entry.known_versions), entry.known_versions
    high = entry.known_versions.split(" - ")[1]
    assert high == compat.TESTED_TORCH, "bump known_versions when a new torch is verified"


def test_the_tested_torch_is_the_one_installed() -> None:
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if major_minor != compat.TESTED_TORCH:
        pytest.skip(f"torch {torch.__version__}: the probes above are what matters here")


def test_a_failing_probe_is_reported_not_raised() -> None:
    def broken() -> str:
        raise AttributeError("module 'torch' has no attribute '_gone'")

    compat.ENTRIES["_test_broken"] = compat.Entry(
        "_test_broken", "torch._gone", "tests", "2.0 - 2.13", broken
    )
    try:
        assert "AttributeError" in compat.check("_test_broken")
    finally:
        del compat.ENTRIES["_test_broken"]


def test_torch_floor_in_pyproject_is_the_tested_release() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([0-9.]+)"', text)
    assert floor is not None
    assert floor.group(1) == compat.TESTED_TORCH, (
        "the declared torch floor must be a release the suite (and these probes) ran on"
    )

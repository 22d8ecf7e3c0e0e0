"""`import fastinfer` is light: no optional dependency, no torch setting changed, no logging set up.

The public names load on first use, so each check below resolves every one of them: what is judged
is the whole public API, not only the package's ``__init__``.
"""

import json

from conftest import run_python

FORBIDDEN = [
    "fastapi",
    "httpx",
    "matplotlib",
    "optimum",
    "prometheus_client",
    "ray",
    "safetensors",
    "tqdm",
    "transformers",
    "uvicorn",
    # Heavy parts of torch that only compiling users should pay for.
    "torch._dynamo",
    "torch._inductor",
]

# Import the package and resolve every public name (each subpackage loads on first use).
IMPORT_ALL = "import fastinfer; [getattr(fastinfer, n) for n in fastinfer.__all__]"

SNAPSHOT = """
import logging, torch
def snap():
    b = torch.backends
    return {
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "dtype": str(torch.get_default_dtype()),
        "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn": b.mkldnn.enabled,
        "cudnn": [b.cudnn.enabled, b.cudnn.benchmark, b.cudnn.deterministic],
        "tf32": [b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32],
        "sdp": [b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled()],
        "root_handlers": len(logging.getLogger().handlers),
        "root_level": logging.getLogger().level,
        "loggers": sorted(n for n in logging.root.manager.loggerDict),
    }
"""


def test_import_pulls_in_no_optional_dependency() -> None:
    # Judged against `import torch` alone: some torch versions pull in e.g. tqdm themselves.
    code = (
        "import sys, json; import torch; before = set(sys.modules); " + IMPORT_ALL + "; "
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules and m not in before)))"
    )
    loaded = json.loads(run_python(code).stdout)
    assert loaded == [], f"import fastinfer imported {loaded}"


def test_import_changes_no_torch_setting_and_no_logging() -> None:
    code = (
        SNAPSHOT
        + "import json\nbefore = snap()\n"
        + IMPORT_ALL
        + "\nafter = snap()\n"
        + "fi = [n for n in after['loggers'] if n.startswith('fastinfer')]\n"
        + "handlers = [n for n in fi if logging.getLogger(n).handlers]\n"
        + "after['loggers'] = before['loggers']\n"
        + "print(json.dumps({'same': before == after, 'before': before, 'after': after, 'handlers': handlers}))"
    )
    out = json.loads(run_python(code).stdout)
    assert out["same"], f"import fastinfer changed global state: {out['before']} -> {out['after']}"
    assert out["handlers"] == [], f"fastinfer loggers got handlers: {out['handlers']}"


def _best_of_five(
    base: str, more: str, env: dict[str, str] | None = None, runs: int = 5
) -> tuple[float, float]:
    """The best of ``runs`` fresh-interpreter timings of ``base`` and of ``more``, taken in turn
    (base, more, base, more...). Five, not three: a full garbage collection of torch's objects
    (about 85 ms here) lands in whichever module imports when it triggers, and on a shared
    2-core machine one slow start in three made the ratio flake past 1.2. In turn, not five of
    one then five of the other: the machine's speed drifts, and a slow spell over the second
    five alone read 1.24x once (1.47 s against 1.18 s) with the same code that reads 1.0-1.1x."""

    def timed(stmt: str) -> float:
        code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
        return float(run_python(code, env=env).stdout)

    pairs = [(timed(base), timed(more)) for _ in range(runs)]
    return min(a for a, _ in pairs), min(b for _, b in pairs)


def test_import_time_within_20_percent_of_torch() -> None:
    # Both timed in fresh interpreters; best of five each to shed scheduler noise.
    torch_alone, with_fastinfer = _best_of_five("import torch", "import torch, fastinfer")
    assert with_fastinfer <= 1.2 * torch_alone, (
        f"import fastinfer took {with_fastinfer:.3f}s vs import torch {torch_alone:.3f}s (> +20%)"
    )


def test_whole_public_api_within_20_percent_of_torch(tmp_path) -> None:
    # As installed from a wheel: bytecode compiled once (a first run writes it to a private cache),
    # the way torch's own modules are already compiled in site-packages.
    env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    run_python("import torch; " + IMPORT_ALL, env=env)
    # `import torch` leaves enough garbage-collector debt that the next ~100 ms of allocations set
    # off a full collection of torch's objects (about 85 ms here), whoever makes them: it landed
    # inside fastinfer's import in most starts (1.11-1.25x) and would land in the user's next
    # import otherwise. Both sides pay that one collection at the same point, so what is compared
    # is fastinfer's own cost (1.14x measured with it).
    settle = "import torch, gc; gc.collect()"
    torch_alone, with_api = _best_of_five(settle, settle + "; " + IMPORT_ALL, env)
    assert with_api <= 1.2 * torch_alone, (
        f"fastinfer's whole public API took {with_api:.3f}s with torch vs {torch_alone:.3f}s (> +20%)"
    )

"""`import fastinfer` is light: no optional dependency, no torch setting changed, no logging set up."""

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
    # torch itself imports some of these (torch.hub imports tqdm when it is installed): count
    # only what importing fastinfer adds on top of `import torch`.
    code = (
        "import sys, json, torch; base = set(sys.modules); import fastinfer; "
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules and m not in base)))"
    )
    loaded = json.loads(run_python(code).stdout)
    assert loaded == [], f"import fastinfer imported {loaded}"


def test_import_changes_no_torch_setting_and_no_logging() -> None:
    code = (
        SNAPSHOT
        + "import json\nbefore = snap()\nimport fastinfer\nafter = snap()\n"
        + "fi = [n for n in after['loggers'] if n.startswith('fastinfer')]\n"
        + "handlers = [n for n in fi if logging.getLogger(n).handlers]\n"
        + "after['loggers'] = before['loggers']\n"
        + "print(json.dumps({'same': before == after, 'before': before, 'after': after, 'handlers': handlers}))"
    )
    out = json.loads(run_python(code).stdout)
    assert out["same"], f"import fastinfer changed global state: {out['before']} -> {out['after']}"
    assert out["handlers"] == [], f"fastinfer loggers got handlers: {out['handlers']}"


def test_import_time_within_20_percent_of_torch() -> None:
    # Both timed in fresh interpreters; best of three each to shed scheduler noise.
    def best(stmt: str) -> float:
        code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
        return min(float(run_python(code).stdout) for _ in range(3))

    torch_alone = best("import torch")
    with_fastinfer = best("import torch, fastinfer")
    assert with_fastinfer <= 1.2 * torch_alone, (
        f"import fastinfer took {with_fastinfer:.3f}s vs import torch {torch_alone:.3f}s (> +20%)"
    )

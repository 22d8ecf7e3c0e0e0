"""GPU readiness: run every GPU path fastinfer has, once, within 8 minutes, and print one table.

Steps (each timed; a step that would start after the deadline is reported as not run):

1. ``swap_attention_`` on a Hugging Face BERT (BERT-mini shape) in fp16 and in bf16 on the GPU,
   with a padded batch: sdpa / flash attention / the packed path, verified against the original;
2. ``compile_model(mode="reduce-overhead")`` (CUDA graphs) warmed at the batcher's preferred batch
   sizes (``BatcherConfig(preferred_batch_sizes=(1, 8, 32))``), then served at each of them with
   compiling forbidden (no recompile, outputs checked against eager);
3. the loader to ``cuda``: a checkpoint written with ``testing.save_checkpoint`` loaded with
   ``fastinfer.load_model(..., device="cuda")`` and checked against the original;
4. the compile cache on the GPU: ``compile_model`` (inductor) into an ``InductorCache``, then the
   same compile in a fresh process from that folder: every graph a cache hit.

On a machine without a CUDA GPU it prints why and exits 0 (``--require-gpu``: exit 2), so it can
sit in any CI job.

    python benchmarks/gpu_check.py [--json results/gpu_check.json] [--require-gpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

LIMIT_SECONDS = 8 * 60
PREFERRED = (1, 8, 32)


def no_gpu_message() -> str | None:
    """Why the GPU paths cannot run here (None when they can)."""
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        return (
            f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}, CUDA build: "
            f"{build}); nothing to check. Run it where a GPU is available."
        )
    return None


def _bert(dtype: torch.dtype) -> Any:
    from fastinfer import testing

    return testing.hf_bert().to("cuda", dtype)


def step_attention(dtype: torch.dtype) -> str:
    import fastinfer
    from fastinfer import testing

    model = _bert(dtype)
    ids, mask = testing.text_batch(16, 128, padding=0.45)
    inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}
    with torch.inference_mode():
        report = fastinfer.swap_attention_(model, example_inputs=inputs, budget_seconds=60)
    if report.chosen != "original" and not report.verified:
        raise AssertionError(f"the chosen path {report.chosen} was not verified")
    flash = report.path("hf:flash_attention_2")
    detail = f"chose {report.chosen} ({report.speedup or 1:.2f}x); flash: "
    detail += "available" if flash.available else flash.reason[:60]
    fastinfer.undo_attention_swap_(model)
    return detail


def step_cuda_graphs() -> str:
    import fastinfer
    from fastinfer import testing

    sizes = fastinfer.BatcherConfig(preferred_batch_sizes=PREFERRED).preferred_batch_sizes
    assert sizes is not None
    model = testing.tiny_mlp().cuda()
    x = torch.randn(8, 32, device="cuda")
    compiled = fastinfer.compile_model(model, x, mode="reduce-overhead", batch_sizes=sizes)
    for b in sizes:
        xb = torch.randn(b, 32, device="cuda")
        with torch.inference_mode():
            torch.testing.assert_close(compiled(xb), model(xb), rtol=1e-3, atol=1e-4)
    s = compiled.statistics()
    if s.recompiles_refused or s.unwarmed_calls:
        raise AssertionError(f"serving the warmed sizes recompiled: {s}")
    return f"sizes {list(sizes)}: {s.graphs} graph(s), {s.compile_seconds:.1f} s to warm"


def step_loader(tmp: Path) -> str:
    import fastinfer
    from fastinfer import testing

    original = testing.tiny_mlp()
    path = testing.save_checkpoint(original, tmp / "mlp.safetensors", format="safetensors")
    loaded = fastinfer.load_model(testing.TinyMLP, path, device="cuda")
    devices = {p.device.type for p in loaded.parameters()}
    x = torch.randn(4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x.cuda()).cpu(), original(x), rtol=1e-4, atol=1e-5)
    return f"parameters on {sorted(devices)}, outputs equal"


_WARM_AGAIN = """
import json, torch, fastinfer
from fastinfer import testing
with fastinfer.InductorCache({path!r}) as cache:
    c = fastinfer.compile_model(testing.tiny_mlp().cuda(), torch.randn(8, 32, device="cuda"),
                                batch_sizes=(1, 8), cache=cache)
s = c.statistics()
print(json.dumps({{"hits": s.cache_hits, "misses": s.cache_misses, "graphs": s.graphs}}))
"""


def step_compile_cache(tmp: Path) -> str:
    import fastinfer
    from benchmarks._harness import run_fresh
    from fastinfer import testing

    folder = tmp / "inductor-cache"
    with fastinfer.InductorCache(folder) as cache:
        cold = fastinfer.compile_model(
            testing.tiny_mlp().cuda(),
            torch.randn(8, 32, device="cuda"),
            batch_sizes=(1, 8),
            cache=cache,
        )
    out = json.loads(run_fresh(_WARM_AGAIN.format(path=str(folder))).strip().splitlines()[-1])
    if out["misses"] or out["hits"] < out["graphs"]:
        raise AssertionError(f"the warm start compiled again: {out}")
    return (
        f"cold {cold.statistics().compile_seconds:.1f} s, {cold.statistics().cache_misses} "
        f"misses; fresh process: {out['hits']} hits, {out['misses']} misses"
    )


def run(limit_seconds: float = LIMIT_SECONDS) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="fastinfer-gpu-check-"))
    steps: list[tuple[str, Callable[[], str]]] = [
        ("swap_attention_ fp16", lambda: step_attention(torch.float16)),
        ("swap_attention_ bf16", lambda: step_attention(torch.bfloat16)),
        ("reduce-overhead (CUDA graphs)", step_cuda_graphs),
        ("loader to cuda", lambda: step_loader(tmp)),
        ("compile cache on GPU", lambda: step_compile_cache(tmp)),
    ]
    deadline = time.monotonic() + limit_seconds
    rows = []
    for name, fn in steps:
        if time.monotonic() >= deadline:
            rows.append({"step": name, "status": "not run", "seconds": 0.0, "detail": "time limit"})
            continue
        t0 = time.monotonic()
        try:
            detail, status = fn(), "ok"
        except Exception as exc:
            detail, status = f"{type(exc).__name__}: {exc}"[:300], "FAILED"
            traceback.print_exc()
        rows.append(
            {"step": name, "status": status, "seconds": time.monotonic() - t0, "detail": detail}
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    from fastinfer._common.tables import render_table

    body = [[r["step"], r["status"], f"{r['seconds']:.1f} s", r["detail"]] for r in rows]
    return render_table(["step", "status", "time", "detail"], body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check", description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 without a GPU")
    args = parser.parse_args(argv)
    why = no_gpu_message()
    if why is not None:
        print(why)
        return 2 if args.require_gpu else 0
    rows = run()
    gpu = torch.cuda.get_device_name(0)
    print(f"\n== gpu_check on {gpu} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

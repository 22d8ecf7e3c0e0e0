"""Compile start-up and steady state: cold compile vs warm cache vs imported bundle vs AOT package.

Every start-up figure comes from a fresh Python process (cold imports), run one after another in
this script: time from "model built" to the first correct output (compile_model warms every batch
size before it returns, so this is the time until the service can take traffic). Steady state:
eager vs the backend select_backend picks, per batch size, interleaved trials.

    flock /tmp/fastinfer-bench.lock python benchmarks/bench_compile.py --json benchmarks/results/compile.json

Targets: warm cache and imported bundle <= 20% of the cold compile; AOT load <= 10%; zero
compilations in a serve run over every warmed batch size (asserted); the selector never picks a
backend slower than eager (asserted).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Bench, run_fresh

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SIZES = (1, 8)


def build(name: str) -> tuple[Any, tuple[Any, ...]]:
    """The benchmark's models and example inputs (also imported by the fresh processes)."""
    import torch

    from fastinfer import testing

    if name == "mlp":
        return testing.tiny_mlp(), (torch.randn(8, 32),)
    if name == "bert_like":
        # The encoder's fused fastpath (_transformer_encoder_layer_fwd) is opaque to the compiler;
        # turn it off so eager and compiled both run the plain attention/feed-forward ops.
        torch.backends.mha.set_fastpath_enabled(False)
        model = testing.bert_like_classifier(enable_nested_tensor=False)
        return model, testing.text_batch(batch_size=8, seq_len=32, padding=0.0)
    if name == "hf_bert":
        model = testing.hf_bert(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
        )
        return model, testing.text_batch(batch_size=8, seq_len=32, padding=0.0)
    raise ValueError(name)


PROCESS = r"""
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import torch, fastinfer
from torch._dynamo.utils import counters
from bench_compile import build
cfg = json.loads({cfg!r})
model, inputs = build(cfg["model"])
sizes = tuple(cfg["sizes"])
result = {{}}
t0 = time.perf_counter()
if cfg["mode"] == "aot":
    m = fastinfer.load_aot(cfg["package"])
    out = m(*inputs)
    result["first_output_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        ref = model(*inputs)
    torch.testing.assert_close(fastinfer.compiling._verify.leaves(out), fastinfer.compiling._verify.leaves(ref), rtol=1e-4, atol=1e-4)
else:
    if cfg["mode"] == "bundle":
        cache = fastinfer.InductorCache.import_(cfg["bundle"], cfg["cache"])
    else:
        cache = fastinfer.InductorCache(cfg["cache"])
    with cache:
        c = fastinfer.compile_model(model, inputs, batch_sizes=sizes, cache=cache)
        out = c(*inputs)
        result["first_output_s"] = time.perf_counter() - t0
        s = c.statistics()
        result.update(graphs=s.graphs, hits=s.cache_hits, misses=s.cache_misses)
        if cfg.get("export"):
            cache.export(cfg["export"])
        if cfg["mode"] == "warm" and cfg.get("select"):
            # Serve run: every warmed batch size, several times; nothing may compile.
            g0 = counters["stats"]["unique_graphs"]
            for _ in range(3):
                for b in sizes:
                    a, k = fastinfer.compiling.inputs_for(inputs, b)
                    c(*a, **k)
            result["serve_compiles"] = counters["stats"]["unique_graphs"] - g0
            report = fastinfer.select_backend(
                model, inputs, candidates=["eager", "inductor"], batch_sizes=sizes,
                repeat=cfg["repeat"], cache=cache, refresh=True,
                budget_seconds=None,  # measure inductor: its ~10 s build is past the default budget
            )
            result["report"] = report.to_dict()
            result["report_table"] = report.table()
print("RESULT " + json.dumps(result))
"""

AOT_BUILD = r"""
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import fastinfer
from bench_compile import build
model, inputs = build({name!r})
t0 = time.perf_counter()
fastinfer.export_aot(model, inputs, {path!r}, batch_sizes={sizes!r})
print("RESULT " + json.dumps({{"build_s": time.perf_counter() - t0}}))
"""


def fresh(mode: str, name: str, env: dict[str, str], **cfg: Any) -> dict[str, Any]:
    cfg = {"mode": mode, "model": name, "sizes": list(SIZES), "repeat": 5, **cfg}
    code = PROCESS.format(bench_dir=BENCH_DIR, cfg=json.dumps(cfg))
    out = run_fresh(code, env=env, timeout=600)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT ") :]))


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_model(bench: Bench, name: str, tmp: Path, *, aot: bool, starts: int) -> None:
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / f"{name}-default-unused")}
    cache = tmp / f"{name}-cache"
    bundle = tmp / f"{name}.tar"
    cold = fresh("cold", name, env, cache=str(cache), export=str(bundle))
    # Start-up figures are single process runs on a noisy box: take the median of `starts`.
    warms = [fresh("warm", name, env, cache=str(cache), select=(i == 0)) for i in range(starts)]
    imported = [
        fresh("bundle", name, env, cache=str(tmp / f"{name}-imported-{i}"), bundle=str(bundle))
        for i in range(starts)
    ]
    warm = warms[0]
    c = cold["first_output_s"]
    w = _median([r["first_output_s"] for r in warms])
    b = _median([r["first_output_s"] for r in imported])
    case = f"{name}: first correct output"
    bench.add_value(case, "cold compile", c, unit="s")
    bench.add_value(case, "warm cache dir", w, unit="s", ratio=w / c, target=("<=", 0.2))
    bench.add_value(case, "imported bundle", b, unit="s", ratio=b / c, target=("<=", 0.2))
    bench.note(
        f"{name}: cold {cold['graphs']} graphs/{cold['misses']} misses; warm {warm['hits']} hits/"
        f"{warm['misses']} misses; bundle {imported[0]['hits']} hits/{imported[0]['misses']} "
        f"misses; warm starts {[round(r['first_output_s'], 2) for r in warms]}, bundle starts "
        f"{[round(r['first_output_s'], 2) for r in imported]}"
    )
    if aot:
        pkg = tmp / f"{name}.pt2"
        try:
            code = AOT_BUILD.format(bench_dir=BENCH_DIR, name=name, path=str(pkg), sizes=SIZES)
            built = json.loads(run_fresh(code, env=env, timeout=600).split("RESULT ")[-1])
            loads = [fresh("aot", name, env, package=str(pkg)) for _ in range(starts)]
            a = _median([r["first_output_s"] for r in loads])
            bench.add_value(case, "AOT package load", a, unit="s", ratio=a / c, target=("<=", 0.1))
            bench.note(f"{name}: AOT package build took {built['build_s']:.1f}s (once, at build)")
        except RuntimeError as exc:
            bench.note(f"{name}: AOT package failed: {str(exc)[-300:]}")
    # Zero compilations after warm-up (asserted).
    serve = warm["serve_compiles"]
    bench.add_value(f"{name}: compiles during serve run", "after warm-up", serve, target=("<=", 0))
    assert serve == 0, f"{name}: {serve} compilations after warm-up"
    # Steady state, eager vs selected backend; the selector must never pick a slower one.
    report = warm["report"]
    winner = report["winner"]
    results = {r["name"]: r for r in report["results"]}
    for b in SIZES:
        eager = results["eager"]["latency_seconds"][str(b)]
        bench.add_value(f"{name}: steady state bs={b}", "eager", eager, unit="s")
        ind = results["inductor"]
        if ind["status"] == "ok":
            lat = ind["latency_seconds"][str(b)]
            bench.add_value(
                f"{name}: steady state bs={b}", "inductor", lat, unit="s", ratio=eager / lat
            )
        chosen = results[winner]["latency_seconds"][str(b)]
        bench.add_value(
            f"{name}: steady state bs={b}", f"selected ({winner})", chosen, unit="s",
            ratio=eager / chosen, target=(">=", 1.0),
        )  # fmt: skip
        assert winner == "eager" or chosen <= eager, f"{name}: selector picked a slower backend"
    print(warm["report_table"])


def main() -> None:
    bench = Bench("compile", description="compile start-up (fresh processes) and steady state")
    bench.add_argument("--models", default=None, help="comma-separated: mlp,bert_like,hf_bert")
    quick = bench.quick
    names = (bench.args.models or ("mlp" if quick else "mlp,bert_like,hf_bert")).split(",")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastinfer-bench-compile-") as tmp:
        for name in names:
            if name == "hf_bert":
                try:
                    import transformers  # noqa: F401
                except ImportError:
                    bench.note("hf_bert skipped: transformers is not installed")
                    continue
            run_model(bench, name, Path(tmp), aot=not quick, starts=1 if quick else 3)
    bench.note(f"total benchmark time {time.perf_counter() - t0:.0f}s; batch sizes {list(SIZES)}")
    bench.note("other engineers' work shared this 2-core machine: compare ratios, not absolutes")
    bench.finish()


if __name__ == "__main__":
    main()

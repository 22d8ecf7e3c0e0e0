"""compile_model, select_backend, export_aot/load_aot and ``fastinfer warm``.

A cold inductor compile costs ~10-20 s on the 2-core CI box, so the inductor tests share work:
one module-scoped cache folder is compiled into once (TinyMLP, batch sizes 1/4/8); the bundle,
CLI and selector tests reuse it. One AOT package is built once (through the CLI). Everything else
uses dynamo's cheap ``eager`` backend, which exercises the same warm-up/stance/limit logic.
Nothing compiles into the default /tmp/torchinductor_* folder.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_python

import fastinfer
from fastinfer import (
    CacheMismatchError,
    CompileError,
    ConfigError,
    InductorCache,
    RecompileError,
    VerificationError,
    compile_model,
    load_aot,
    select_backend,
)
from fastinfer import testing as ft
from fastinfer.compiling import CandidateResult, pick_winner

SIZES = (1, 4, 8)


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 32, generator=torch.Generator().manual_seed(batch))


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _no_compiler_path(tmp: Path) -> str:
    """A PATH with python but no C++ compiler."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    return str(bin_dir)


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real inductor compile of TinyMLP into a fresh cache folder, shared by the module."""
    path = tmp_path_factory.mktemp("inductor-cache")
    model = ft.tiny_mlp()
    with InductorCache(path) as cache:
        compiled = compile_model(model, _x(), batch_sizes=SIZES, cache=cache)
        bundle = cache.export(path.parent / "warm-bundle.tar")
    return {
        "path": path,
        "model": model,
        "compiled": compiled,
        "cache": cache,
        "bundle": bundle,
    }


# --------------------------------------------------------------------------------------------
# compile_model with inductor (shared compile)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_compile_warms_every_batch_size_then_never_compiles(warm: dict[str, Any]) -> None:
    compiled, model = warm["compiled"], warm["model"]
    s = compiled.statistics()
    # Batch 1 gets its own graph; 4 and 8 share one graph with a dynamic batch dimension.
    assert (s.graphs, s.recompiles) == (2, 1)
    assert s.backend == "inductor" and s.fallback is None and s.warmed_batch_sizes == SIZES
    assert s.freezing == "on"  # CPU inference: weights frozen, and still FX-graph cacheable
    assert s.compile_seconds > 0 and 0 <= s.max_error < 1e-4
    assert s.cache_misses >= 2 and s.cache_hits == 0
    assert warm["cache"].statistics().cache_misses == s.cache_misses
    before = _graphs()
    for b in (*SIZES, 5):
        x = _x(b)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert _graphs() == before, "a warmed model compiled at serve time"
    assert compiled.statistics().calls == 4
    assert list((warm["path"] / "inductor" / "fxgraph").rglob("*")), "not compiled into the cache"


@pytest.mark.slow
def test_bundle_exported_here_loads_with_no_compile_in_a_fresh_process(
    warm: dict[str, Any], tmp_path: Path
) -> None:
    code = f"""
import json, torch, fastinfer
from fastinfer import testing
from torch._inductor import cpu_vec_isa
probes = []
real_probe = cpu_vec_isa.VecISA._probe_load
cpu_vec_isa.VecISA._probe_load = lambda self, path: probes.append(path) or real_probe(self, path)
cache = fastinfer.InductorCache.import_({str(warm["bundle"])!r}, {str(tmp_path / "imported")!r})
with cache:
    x = torch.randn(4, 32)
    c = fastinfer.compile_model(testing.tiny_mlp(), x, batch_sizes=(1, 4, 8), cache=cache)
s, cs = c.statistics(), cache.statistics()
print(json.dumps({{"hits": s.cache_hits, "misses": s.cache_misses, "graphs": s.graphs,
                  "cache_hits": cs.cache_hits, "path": str(cache.path), "probes": len(probes)}}))
"""
    out = json.loads(run_python(code, timeout=240).stdout.strip().splitlines()[-1])
    assert out["misses"] == 0 and out["hits"] == out["graphs"] == 2, out
    assert out["cache_hits"] == 2 and out["path"] == str(tmp_path / "imported")
    # The CPU ISA probe's outcome was replayed from the bundle: no dlopen child processes.
    assert (warm["path"] / "isa-probe.json").is_file()
    assert out["probes"] == 0, out


@pytest.mark.slow
def test_cli_warm_writes_a_bundle(warm: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "cli.tar"
    cmd = (
        "import sys; from fastinfer.__main__ import main; sys.exit(main(["
        f"'warm', 'fastinfer.testing:tiny_mlp', '--input', 'float32[B,32]', "
        f"'--batch-sizes', '1,4,8', '--cache-dir', {str(warm['path'])!r}, "
        f"'--bundle', {str(bundle)!r}]))"
    )
    out = json.loads(run_python(cmd, timeout=240).stdout.strip().splitlines()[-1])
    assert out["bundle"] == str(bundle) and bundle.is_file()
    assert out["cache_misses"] == 0 and out["graphs"] == 2  # warmed from the shared folder


def test_cli_warm_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from fastinfer.__main__ import main

    assert main(["warm", "fastinfer.testing:tiny_mlp", "--input", "float32[B,32]"]) == 1
    assert "exactly one of --bundle" in capsys.readouterr().err
    assert main(["warm", "nope", "--input", "float32[B,32]", "--aot", "x.pt2"]) == 1
    assert "module:factory" in capsys.readouterr().err
    assert main(["warm", "fastinfer.testing:tiny_mlp", "--input", "f32[B]", "--aot", "x"]) == 1
    assert "not a torch dtype" in capsys.readouterr().err


def test_cli_input_specs() -> None:
    from fastinfer._cli.warm import parse_input

    name, t = parse_input("float32[B,32]", 4)
    assert name is None and t.shape == (4, 32) and t.dtype == torch.float32
    name, t = parse_input("input_ids=int64[B,16]<1000", 2)
    assert name == "input_ids" and t.shape == (2, 16) and int(t.max()) < 1000
    _, t = parse_input("int64[B,16]=1", 3)
    assert bool((t == 1).all())
    with pytest.raises(ConfigError, match="dimension 'T'"):
        parse_input("float32[B,T]", 2)


# --------------------------------------------------------------------------------------------
# compile_model logic, with dynamo's cheap eager backend
# --------------------------------------------------------------------------------------------


def test_unwarmed_shape_is_refused_or_run_eager_when_asked() -> None:
    model = ft.tiny_mlp()
    compiled = compile_model(model, _x(), backend="eager", batch_sizes=SIZES)
    assert compiled.statistics().graphs == 2
    with pytest.raises(RecompileError, match=r"add the batch size") as info:
        compiled(_x(16))  # beyond the warmed range: would compile
    assert "(16, 32)" in str(info.value)
    assert compiled.statistics().recompiles_refused == 1
    compiled.on_recompile = "eager"
    before = _graphs()
    with torch.inference_mode():
        torch.testing.assert_close(compiled(_x(16)), model(_x(16)))
    assert _graphs() == before
    with pytest.raises(ConfigError, match="on_recompile"):
        compiled.on_recompile = "maybe"


def test_dynamic_false_gets_a_per_model_recompile_limit() -> None:
    from torch._dynamo import config as dynamo_config

    limit = dynamo_config.recompile_limit
    sizes = tuple(range(1, 11))  # 10 sizes: more than dynamo's default limit of 8
    compiled = compile_model(
        ft.tiny_mlp(seed=1), _x(), backend="eager", batch_sizes=sizes, dynamic=False
    )
    s = compiled.statistics()
    assert (s.graphs, s.recompiles) == (10, 9), "a size silently fell back to eager"
    assert dynamo_config.recompile_limit == limit, "process-global dynamo config changed"
    before = _graphs()
    for b in sizes:
        compiled(_x(b))
    assert _graphs() == before


def test_outputs_that_differ_from_eager_raise_verification_error() -> None:
    def off_by_one(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        def run(*args: Any) -> Any:
            return [o + 1 for o in gm(*args)]

        return run

    with pytest.raises(VerificationError, match=r"batch size \d+: output 0 .*max error 1"):
        compile_model(ft.tiny_mlp(), _x(), backend=off_by_one, batch_sizes=(1, 2))
    # verify=False accepts it but still records the error.
    c = compile_model(ft.tiny_mlp(), _x(), backend=off_by_one, batch_sizes=(1,), verify=False)
    assert c.statistics().max_error == pytest.approx(1.0)


def test_a_failing_backend_raises_compile_error_or_falls_back_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        raise RuntimeError("backend exploded")

    with pytest.raises(CompileError, match="backend exploded"):
        compile_model(ft.tiny_mlp(), _x(), backend=broken)
    caplog.set_level(logging.WARNING, logger="fastinfer.compiling")
    models = [compile_model(ft.tiny_mlp(), _x(), backend=broken, fallback="eager") for _ in "ab"]
    s = models[0].statistics()
    assert s.fallback and "backend exploded" in s.fallback and s.graphs == 0
    logged = [r for r in caplog.records if "fallback" in r.getMessage()]
    assert len(logged) == 1, "the fallback is logged once"
    torch.testing.assert_close(models[1](_x()), ft.tiny_mlp()(_x()))


def test_freezing_applies_to_inductor_on_cpu_and_is_recorded() -> None:
    from fastinfer.compiling._freezing import freezing_mode

    assert freezing_mode("auto", "inductor", True, None) == "on"
    assert freezing_mode("auto", "inductor", False, None) == "off"  # GPU: torch's default
    assert freezing_mode("auto", "inductor", True, {"freezing": False}) == "off"  # caller's say
    assert freezing_mode("prepack", "inductor", True, None) == "prepack"
    assert freezing_mode("auto", "eager", True, None) == "off"
    compiled = compile_model(ft.tiny_mlp(), _x(), backend="eager", batch_sizes=(4,))
    assert compiled.statistics().freezing == "off"
    with pytest.raises(ConfigError, match="freezing='prepack' needs the inductor backend"):
        compile_model(ft.tiny_mlp(), _x(), backend="eager", freezing="prepack")
    with pytest.raises(ConfigError, match="freezing must be one of"):
        compile_model(ft.tiny_mlp(), _x(), freezing="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_freezing_with_prepacked_weights_is_verified(
    tmp_path: Path,
) -> None:
    model = ft.tiny_mlp()
    with InductorCache(tmp_path) as cache:
        compiled = compile_model(model, _x(), batch_sizes=(4,), cache=cache, freezing="prepack")
    s = compiled.statistics()
    assert s.freezing == "prepack" and s.max_error < 1e-4 and s.cache_hits == 0
    x = _x(4)  # made outside inference_mode, as the warm-up inputs were
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="batch_sizes"):
        compile_model(ft.tiny_mlp(), _x(), backend="eager", batch_sizes=(0, 4))
    with pytest.raises(ConfigError, match="fallback"):
        compile_model(ft.tiny_mlp(), _x(), fallback="warn")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model\.eval\(\)"):
        compile_model(ft.TinyMLP().train(), _x(), backend="eager")
    with pytest.raises(ConfigError, match="example_inputs"):
        compile_model(ft.tiny_mlp(), 3, backend="eager")


def test_missing_cxx_compiler_is_a_clear_compile_error(tmp_path: Path) -> None:
    code = f"""
import torch, fastinfer
from fastinfer import testing
cache = fastinfer.InductorCache({str(tmp_path / "c")!r})
try:
    fastinfer.compile_model(testing.tiny_mlp(), torch.randn(2, 32), cache=cache)
except fastinfer.CompileError as e:
    print("ERROR:", e)
c = fastinfer.compile_model(testing.tiny_mlp(), torch.randn(2, 32), fallback="eager", cache=cache)
print("FALLBACK:", c.statistics().fallback is not None)
"""
    env = {"PATH": _no_compiler_path(tmp_path), "CXX": ""}
    out = run_python(code, env=env, timeout=120).stdout
    assert "ERROR: compiling with backend 'inductor' failed: no working C++ compiler" in out
    assert "install g++" in out and "AOTInductor package" in out
    assert "FALLBACK: True" in out


@pytest.mark.slow
def test_a_lazy_compile_failure_surfaces_during_warm_up_not_at_the_first_request(
    tmp_path: Path,
) -> None:
    # CXX exists but cannot compile: the preflight passes and inductor itself fails, lazily, on
    # the first call. compile_model forces that call during warm-up and explains the failure.
    code = f"""
import torch, fastinfer
from fastinfer import testing
try:
    fastinfer.compile_model(testing.tiny_mlp(), torch.randn(2, 32),
                            cache=fastinfer.InductorCache({str(tmp_path / "c")!r}))
except fastinfer.CompileError as e:
    print("ERROR:", e)
"""
    out = run_python(code, env={"CXX": "/bin/false"}, timeout=180).stdout
    assert "ERROR: compiling with backend 'inductor' failed: no working C++ compiler" in out
    assert "Cause: " in out and "/bin/false" in out


def test_opaque_fused_transformer_op_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastinfer.compiling")
    model = ft.bert_like_classifier(num_layers=1, d_model=32, dim_feedforward=64)
    ids, mask = ft.text_batch(batch_size=2, seq_len=8)
    compiled = compile_model(model, (ids, mask), backend="eager", batch_sizes=(2,))
    assert "_transformer_encoder_layer_fwd" in compiled.statistics().opaque_fused_ops
    assert any("compiling gains nothing" in r.getMessage() for r in caplog.records)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        plain = compile_model(model, (ids, mask), backend="eager", batch_sizes=(2,))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert plain.statistics().opaque_fused_ops == ()


# --------------------------------------------------------------------------------------------
# select_backend
# --------------------------------------------------------------------------------------------


def test_pick_winner_needs_the_margin_and_never_picks_slower_than_eager() -> None:
    def r(name: str, *speedups: float, status: str = "ok") -> CandidateResult:
        return CandidateResult(name, status, speedup=dict(enumerate(speedups)))

    eager = r("eager", 1.0, 1.0)
    assert pick_winner([eager, r("a", 1.03, 1.03)], 0.05) == "eager"  # within the margin
    assert pick_winner([eager, r("a", 1.2, 1.3), r("b", 1.5, 1.4)], 0.05) == "b"
    assert pick_winner([eager, r("a", 3.0, 0.9)], 0.05) == "eager"  # slower at one size
    assert pick_winner([eager, r("a", 3.0, 3.0, status="rejected")], 0.05) == "eager"


def test_select_backend_skips_with_reasons_rejects_wrong_and_caches_the_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastinfer.compiling import _runtimes

    monkeypatch.setattr(_runtimes, "available", lambda module: module != "onnxruntime")
    model = ft.tiny_mlp()
    calls = {"slow": 0}

    def slow(x: torch.Tensor) -> torch.Tensor:
        calls["slow"] += 1
        for _ in range(4):
            model(x)
        return model(x)

    def wrong(x: torch.Tensor) -> torch.Tensor:
        return model(x) * 2

    candidates = [
        "eager",
        "reduce-overhead",
        "onnxruntime",
        "nonsense",
        ("slow", slow),
        ("wrong", wrong),
    ]
    report = select_backend(
        model, _x(), candidates=candidates, batch_sizes=(1, 8), repeat=3, cache_dir=tmp_path
    )
    assert report.winner == "eager" and not report.from_cache
    assert "CUDA" in report.result("reduce-overhead").reason
    assert report.result("reduce-overhead").status == "skipped"
    ort = report.result("onnxruntime")
    assert ort.status == "skipped" and ort.reason == "not installed (pip install 'fastinfer[onnx]')"
    assert "unknown backend 'nonsense'" in report.result("nonsense").reason
    assert report.result("wrong").status == "rejected"
    slow_r = report.result("slow")
    assert slow_r.status == "ok" and set(slow_r.latency_seconds) == {1, 8}
    assert slow_r.geomean_speedup < 1.0
    table = str(report)
    assert "winner: eager" in table and "bs=8" in table and "selection: " in table
    doc = json.loads(report.to_json())
    assert doc["winner"] == "eager" and len(doc["results"]) == 6
    assert report.compile_kwargs() == {}
    assert report.selection_seconds > 0 and report.budget_seconds == 10.0

    seen = calls["slow"]
    again = select_backend(
        model, _x(), candidates=candidates, batch_sizes=(1, 8), repeat=3, cache_dir=tmp_path
    )
    assert again.from_cache and calls["slow"] == seen, "a restart re-benchmarked"
    assert again.to_dict()["results"] == doc["results"] and again.winner == "eager"
    assert "from the decision cache" in str(again)

    # Keyed by structure, not weights: a second worker that loaded other weights reuses it...
    changed = ft.tiny_mlp(seed=5)
    reused = select_backend(
        changed, _x(), candidates=candidates, batch_sizes=(1, 8), repeat=3, cache_dir=tmp_path
    )
    assert reused.from_cache
    # ...but other batch sizes, or another environment, are another decision.
    fresh = select_backend(
        changed, _x(), candidates=["eager"], batch_sizes=(1,), repeat=1, cache_dir=tmp_path
    )
    assert not fresh.from_cache
    from fastinfer.compiling import _selector

    real = _selector.environment_manifest
    monkeypatch.setattr(
        _selector, "environment_manifest", lambda **kw: {**real(**kw), "cpu_capability": "zvector"}
    )
    other_env = select_backend(
        changed, _x(), candidates=["eager"], batch_sizes=(1,), repeat=1, cache_dir=tmp_path
    )
    assert not other_env.from_cache


def test_select_backend_respects_its_budget_on_a_fake_clock(tmp_path: Path) -> None:
    clock = ft.ManualClock()
    model = ft.tiny_mlp()
    model.register_forward_pre_hook(lambda m, a: clock.advance(0.1))  # eager: 0.1 s per call

    def costs(seconds: float) -> Any:
        def fn(x: torch.Tensor) -> torch.Tensor:
            clock.advance(seconds)
            return model(x)

        return fn

    report = select_backend(
        model,
        _x(),
        candidates=["eager", ("fast", costs(0.01)), ("slow", costs(0.5)), "inductor"],
        batch_sizes=(4,),
        budget_seconds=5.0,
        repeat=50,
        clock=clock.time,
        cache_dir=tmp_path,
    )
    assert 4.5 < clock.time() <= 5.0, "the selection ran past its budget (or stopped early)"
    inductor = report.result("inductor")
    assert inductor.status == "skipped" and inductor.reason.startswith("not built: building it")
    assert report.result("slow").latency_seconds == {4: pytest.approx(0.6)}
    assert any("slow dropped after 1 sample(s)" in n for n in report.notes)
    assert report.result("fast").status == "ok" and report.selection_seconds <= 5.0
    with pytest.raises(ConfigError, match="budget_seconds must be > 0"):
        select_backend(model, _x(), candidates=["eager"], budget_seconds=0)


@pytest.mark.parametrize(("budget", "rounds"), [(5.0, 9), (None, 3)])
def test_select_backend_spends_what_is_left_of_its_budget_on_a_close_call(
    tmp_path: Path, budget: float | None, rounds: int
) -> None:
    clock = ft.ManualClock()
    model = ft.tiny_mlp()
    model.register_forward_pre_hook(lambda m, a: clock.advance(0.1))
    twin = ft.tiny_mlp()  # the same weights, no hook: the candidates cost what they say
    calls = {"a": 0, "b": 0}

    def costs(name: str, seconds: float) -> Any:
        def fn(x: torch.Tensor) -> torch.Tensor:
            calls[name] += 1
            clock.advance(seconds)
            return twin(x)

        return fn

    # 7% apart: neither is dropped, so with a budget both get 3x the rounds (not past it)
    report = select_backend(
        model,
        _x(),
        candidates=["eager", ("a", costs("a", 0.010)), ("b", costs("b", 0.0107))],
        batch_sizes=(4,),
        budget_seconds=budget,
        repeat=3,
        clock=clock.time,
        cache_dir=tmp_path,
    )
    assert calls == {"a": 1 + rounds, "b": 1 + rounds}  # the verification call, then the rounds
    assert report.winner == "a"
    assert budget is None or report.selection_seconds <= budget


def test_select_backend_skips_compiling_an_opaque_fused_model(tmp_path: Path) -> None:
    model = ft.bert_like_classifier(num_layers=1, d_model=32, dim_feedforward=64)
    ids, mask = ft.text_batch(batch_size=2, seq_len=8)
    report = select_backend(
        model, (ids, mask), candidates=["eager", "inductor"], batch_sizes=(2,), repeat=1
    )
    assert report.result("inductor").status == "skipped"
    assert "compiling gains nothing" in report.result("inductor").reason
    assert report.winner == "eager"


@pytest.mark.slow
def test_select_backend_measures_inductor_from_the_shared_cache(warm: dict[str, Any]) -> None:
    with InductorCache(warm["path"]) as cache:
        report = select_backend(
            warm["model"],
            _x(),
            candidates=["eager", "inductor", "aot"],
            batch_sizes=SIZES,
            repeat=3,
            cache=cache,
            budget_seconds=None,
        )
    aot = report.result("aot")
    assert aot.status == "ok" and set(aot.speedup) == set(SIZES), aot.reason
    assert aot.compile_seconds > 0 and aot.max_error < 1e-4
    r = report.result("inductor")
    assert r.status == "ok", r.reason
    assert set(r.speedup) == set(SIZES) and r.max_error < 1e-4
    assert report.winner in ("eager", "inductor", "aot")
    if report.winner == "inductor":
        assert min(r.speedup.values()) >= 1.0
        assert report.compile_kwargs() == {"backend": "inductor", "mode": None}
    assert r.compile_seconds < warm["compiled"].statistics().compile_seconds  # inductor: all hits


# --------------------------------------------------------------------------------------------
# AOTInductor package (built once, through the CLI)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aot_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("aot") / "mlp.pt2"
    cache = tmp_path_factory.mktemp("aot-cache")
    cmd = (
        "import sys; from fastinfer.__main__ import main; sys.exit(main(["
        "'warm', 'fastinfer.testing:tiny_mlp', '--input', 'float32[B,32]', "
        f"'--batch-sizes', '1,4,8', '--aot', {str(out)!r}]))"
    )
    proc = run_python(cmd, env={"TORCHINDUCTOR_CACHE_DIR": str(cache)}, timeout=280)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["aot"] == str(out)
    return out


@pytest.mark.slow
def test_aot_package_loads_and_serves_every_size_in_range(aot_package: Path) -> None:
    loaded = load_aot(aot_package)
    model = ft.tiny_mlp()
    for b in (1, 3, 8):
        x = _x(b)
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    assert loaded.statistics().backend == "aot"


@pytest.mark.slow
def test_aot_package_loads_without_a_cxx_compiler(aot_package: Path, tmp_path: Path) -> None:
    code = f"""
import shutil, torch, fastinfer
from fastinfer import testing
assert shutil.which("g++") is None and shutil.which("c++") is None
m = fastinfer.load_aot({str(aot_package)!r})
x = torch.randn(5, 32)
torch.testing.assert_close(m(x), testing.tiny_mlp()(x), rtol=1e-4, atol=1e-4)
print("OK")
"""
    env = {"PATH": _no_compiler_path(tmp_path), "CXX": ""}
    assert "OK" in run_python(code, env=env, timeout=120).stdout


@pytest.mark.slow
def test_aot_package_for_another_isa_is_refused(aot_package: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(aot_package) as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("fastinfer-manifest.json"):
                doc = json.loads(data)
                doc["cpu_capability"] = "zvector"
                data = json.dumps(doc).encode()
            dst.writestr(item, data)
    with pytest.raises(CacheMismatchError, match="cpu_capability"):
        load_aot(other)
    with pytest.raises(ConfigError, match="does not exist"):
        load_aot(tmp_path / "missing.pt2")


def test_public_names() -> None:
    for name in ("CompiledModel", "InductorCache", "compile_model", "export_aot", "load_aot"):
        assert hasattr(fastinfer, name)


# --------------------------------------------------------------------------------------------
# GPU paths (skipped cleanly without CUDA)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
def test_reduce_overhead_on_gpu_is_measured(tmp_path: Path) -> None:
    model = ft.tiny_mlp().cuda()
    x = _x().cuda()
    with InductorCache(tmp_path) as cache:
        compiled = compile_model(model, x, mode="reduce-overhead", batch_sizes=(1, 8), cache=cache)
        before = _graphs()
        for b in (1, 8):
            compiled(_x(b).cuda())
        assert _graphs() == before
        report = select_backend(
            model,
            x,
            candidates=["eager", "inductor", "reduce-overhead"],
            batch_sizes=(1, 8),
            repeat=3,
            cache=cache,
            budget_seconds=None,
        )
    assert report.result("reduce-overhead").status == "ok", report.result("reduce-overhead")
    assert cache.statistics().active is False


def test_a_swapped_model_is_compared_with_eager_on_valid_positions_only() -> None:
    """The attention swap leaves zeros in padded positions, eager leaves other values there:
    select_backend compared every position, so the swapped candidate was rejected on exactly the
    padded inputs where it wins, blamed on "a cache built for another CPU ISA"."""
    import copy

    pytest.importorskip("transformers")
    entry = ft.zoo_model("bert")
    model = entry.build()
    example = entry.inputs(3)
    assert not bool(example["attention_mask"].bool().all())  # padded
    swapped = copy.deepcopy(model)
    fastinfer.swap_attention_(swapped, example_inputs=example, prefer="hf:packed")
    with torch.inference_mode():  # the padded positions differ: what made it fail before
        padded = ~example["attention_mask"].bool()
        a, b = swapped(**example).last_hidden_state, model(**example).last_hidden_state
        assert float((a[padded] - b[padded]).abs().max()) > 1e-3
    report = fastinfer.select_backend(
        model,
        example,
        candidates=["eager", ("swapped", swapped)],
        batch_sizes=(1, 3),
        budget_seconds=None,
        repeat=1,
        cache_dir=None,
    )
    result = report.result("swapped")
    assert result.status == "ok", result.reason
    assert result.max_error is not None and result.max_error < 1e-4

"""ONNX Runtime and OpenVINO as select_backend candidates: exported, verified against eager with
the shared tolerances, timed like every candidate, their artefacts cached; a missing extra is
named."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fastinfer
from fastinfer import testing
from fastinfer.compiling import RuntimeModel, build_backend, select_backend
from fastinfer.errors import MissingDependencyError

ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra")


def _bert_inputs(batch: int = 4, seq: int = 16, padding: float = 0.4) -> dict[str, torch.Tensor]:
    ids, mask = testing.text_batch(batch, seq, padding=padding)
    return {"input_ids": ids, "attention_mask": mask}


def _small_bert() -> Any:
    return testing.hf_bert(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )


@pytest.mark.transformers
def test_onnxruntime_with_transformer_fusions_is_verified_timed_and_cached(tmp_path: Path) -> None:
    model = _small_bert()
    inputs = _bert_inputs()
    report = select_backend(
        model,
        inputs,
        candidates=["eager", "onnxruntime"],
        batch_sizes=(1, 4),
        repeat=2,
        cache_dir=tmp_path,
        budget_seconds=None,
    )
    r = report.result("onnxruntime")
    assert r.status == "ok", r.reason
    assert set(r.latency_seconds) == {1, 4} and r.max_error < 1e-4
    assert "Attention x2" in r.reason and "export: torchscript" in r.reason  # ORT fused it
    assert model.config._attn_implementation == "sdpa"  # restored after the eager export
    kinds = sorted(p.name.split("-")[0] for p in (tmp_path / "artifacts").iterdir())
    assert kinds == ["onnx", "onnxruntime"]  # published whole: no temporary folder left behind
    manifest = json.loads(next((tmp_path / "artifacts").glob("onnx-*/manifest.json")).read_text())
    assert {"environment", "model", "weights", "inputs"} <= set(manifest)

    # Built for serving (from the artefact cache now), it serves other batch sizes and lengths.
    served = build_backend("onnxruntime", model, inputs, batch_sizes=(1, 4), cache_dir=tmp_path)
    assert served.statistics().backend == "onnxruntime"
    assert len(list((tmp_path / "artifacts").iterdir())) == 2  # nothing exported again
    other = _bert_inputs(batch=3, seq=11, padding=0.3)
    got = served(**other)
    with torch.inference_mode():
        want = model(**other)
    torch.testing.assert_close(got[1], want.pooler_output, rtol=1e-3, atol=1e-4)

    again = select_backend(
        model,
        inputs,
        candidates=["eager", "onnxruntime"],
        batch_sizes=(1, 4),
        repeat=1,
        cache_dir=tmp_path,
        budget_seconds=None,
        refresh=True,  # measure again: the export comes from the artefact cache
    )
    assert "cached artefact" in again.result("onnxruntime").reason


@pytest.mark.transformers
def test_openvino_is_verified_in_float32_and_timed(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="needs the openvino extra")
    model = _small_bert()
    report = select_backend(
        model,
        _bert_inputs(),
        candidates=["eager", "openvino"],
        batch_sizes=(2,),
        repeat=2,
        cache_dir=tmp_path,
        budget_seconds=None,
    )
    r = report.result("openvino")
    assert r.status == "ok", r.reason
    assert r.max_error < 1e-4 and r.latency_seconds[2] > 0
    (ir,) = (tmp_path / "artifacts").glob("openvino-*")
    assert (ir / "model.xml").is_file() and (ir / "model.bin").is_file()


def test_a_plain_module_runs_on_onnxruntime_without_fusions(tmp_path: Path) -> None:
    model = testing.tiny_mlp()
    report = select_backend(
        model,
        torch.randn(4, 32),
        candidates=["eager", "onnxruntime"],
        batch_sizes=(1, 8),
        repeat=2,
        cache_dir=tmp_path,
        budget_seconds=None,
    )
    r = report.result("onnxruntime")
    assert r.status == "ok", r.reason
    assert "fused" not in r.reason and r.max_error < 1e-4


def test_runtime_model_maps_positional_and_keyword_tensors() -> None:
    seen: list[dict[str, Any]] = []

    def run(feed: dict[str, Any]) -> list[Any]:
        seen.append(feed)
        return [feed["a"] + feed["b"]]

    m = RuntimeModel(run, ["a", "b"], ["a", "b"])
    out = m(torch.ones(2), b=torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0))
    with pytest.raises(fastinfer.CompileError, match="needs the tensor input 'b'"):
        m(torch.ones(2))


@pytest.mark.transformers
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_runtime_is_called_and_answers_like_the_model(runtime: str, tmp_path: Path) -> None:
    """Code written against eager keeps working when a runtime wins: eager's output type
    (``.last_hidden_state``), positional inputs in forward's order, other batch sizes and lengths;
    a tensor the graph was built without is refused rather than silently ignored."""
    pytest.importorskip(runtime, reason=f"needs the {runtime} extra")
    model = _small_bert()
    served = build_backend(runtime, model, _bert_inputs(), batch_sizes=(4,), cache_dir=tmp_path)
    other = _bert_inputs(batch=3, seq=11, padding=0.3)
    with torch.inference_mode():
        want = model(**other)
    for got in (served(**other), served(other["input_ids"], other["attention_mask"])):
        assert type(got) is type(want)
        torch.testing.assert_close(
            got.last_hidden_state, want.last_hidden_state, rtol=1e-3, atol=1e-4
        )
        torch.testing.assert_close(got["pooler_output"], want.pooler_output, rtol=1e-3, atol=1e-4)
    with pytest.raises(
        fastinfer.CompileError, match=r"built without the tensor input.*token_type_ids"
    ):
        served(**other, token_type_ids=torch.ones_like(other["input_ids"]))
    with pytest.raises(fastinfer.CompileError, match=r"at most .* positional"):
        served(*[other["input_ids"]] * 20)


def test_output_structure_rebuilds_dicts_and_nested_tuples() -> None:
    from fastinfer.compiling._runtimes import OutputStructure

    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    rebuild = OutputStructure({"y": a, "parts": (b, [c]), "n": 3, "none": None})
    got = rebuild((a + 1, b + 1, c + 1))
    assert set(got) == {"y", "parts", "n", "none"} and got["n"] == 3 and got["none"] is None
    assert torch.equal(got["parts"][1][0], c + 1) and isinstance(got["parts"], tuple)
    one = OutputStructure(a)((b,))
    assert one is b
    # A count that does not match eager's (a graph that dropped an output): the flat tensors.
    assert OutputStructure((a, b))((c,)) is c
    # An object that is not a constant (a KV cache built on the example) is not eager's to give.
    cache = object()
    assert OutputStructure({"y": a, "past": cache})((b,)) == {"y": b, "past": None}


class _Sum(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] + 2 * xs[1]


def test_a_forward_with_star_args_is_called_positionally(tmp_path: Path) -> None:
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    served = build_backend("onnxruntime", _Sum(), (a, b), batch_sizes=(4,), cache_dir=tmp_path)
    torch.testing.assert_close(served(a[:2], b[:2]), a[:2] + 2 * b[:2])


class _SelfAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def test_a_model_on_pytorchs_mha_fastpath_exports(tmp_path: Path) -> None:
    """Under no_grad nn.MultiheadAttention takes its fastpath, a fused op no ONNX exporter
    handles (torchvision's ViT failed so); the export runs the plain path, which computes the
    same, and leaves the fastpath setting as it was."""
    model = _SelfAttention().eval()
    x = torch.randn(4, 10, 16)
    served = build_backend("onnxruntime", model, x, batch_sizes=(1, 4), cache_dir=tmp_path)
    assert torch.backends.mha.get_fastpath_enabled()
    other = torch.randn(3, 10, 16)
    with torch.inference_mode():
        torch.testing.assert_close(served(other), model(other), rtol=1e-4, atol=1e-5)


def test_a_graph_that_fails_on_a_shape_says_so_with_the_shapes() -> None:
    def run(feed: dict[str, Any]) -> list[Any]:
        raise RuntimeError("Reshape: input_shape_size == requested_shape_size was false")

    m = RuntimeModel(run, ["x"], ["x"])
    with pytest.raises(fastinfer.CompileError, match=r"failed on x\(3, 5\).*fixed a size"):
        m(torch.ones(3, 5))


def test_a_failed_export_is_tried_once_per_selection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ONNX Runtime and OpenVINO share one export: when it fails, the second candidate reports
    the first one's reason instead of exporting again; the next selection tries again."""
    pytest.importorskip("openvino", reason="needs the openvino extra")
    from fastinfer.compiling import _runtimes

    calls: list[int] = []

    def fails(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        raise fastinfer.CompileError("exporting Mlp to ONNX failed: aten::strange has no ONNX op")

    monkeypatch.setattr(_runtimes, "export_onnx", fails)
    for attempt in (1, 2):
        report = select_backend(
            testing.tiny_mlp(),
            torch.randn(4, 32),
            candidates=["eager", "onnxruntime", "openvino"],
            batch_sizes=(4,),
            repeat=1,
            cache_dir=tmp_path,
            budget_seconds=None,
            refresh=True,  # measure again rather than reuse the cached decision
        )
        assert len(calls) == attempt
        for name in ("onnxruntime", "openvino"):
            r = report.result(name)
            assert r.status == "failed" and "aten::strange" in r.reason, r.reason
        assert "failed for another candidate" in report.result("openvino").reason


def test_build_backend_says_why_a_backend_cannot_be_built_here() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    with pytest.raises(
        fastinfer.ConfigError, match=r"'reduce-overhead' cannot be built here.*CUDA"
    ):
        build_backend("reduce-overhead", testing.tiny_mlp(), torch.randn(2, 32))


def test_a_missing_runtime_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastinfer._optional import require

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'fastinfer\[openvino\]'"):
        require("openvino", purpose="the openvino candidate of select_backend")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'fastinfer\[onnx\]'"):
        require("onnxruntime")
    from fastinfer.compiling import _runtimes

    monkeypatch.setattr(_runtimes, "available", lambda module: False)
    report = select_backend(
        testing.tiny_mlp(), torch.randn(2, 32), candidates=["eager", "openvino"], batch_sizes=(2,)
    )
    ov = report.result("openvino")
    assert (
        ov.status == "skipped" and ov.reason == "not installed (pip install 'fastinfer[openvino]')"
    )

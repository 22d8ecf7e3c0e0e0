"""The ONNX Runtime / OpenVINO candidates under faults: calls that differ from what the export
baked in, data-dependent control flow, other input dtypes, dtypes the runtimes cannot run. Each
was silently wrong (or a raw runtime error) before; now it works or raises a ``CompileError``
that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import testing
from fastinfer._optional import available
from fastinfer.compiling import RuntimeModel, build_backend, select_backend

pytest.importorskip("onnxruntime", reason="needs the onnx extra")

RUNTIMES = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(not available("openvino"), reason="needs the openvino extra"),
    ),
]


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return self.a(x) * scale


class _Branch(nn.Module):
    """Data-dependent control flow: a trace keeps only the example's branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


class _ShapeChecks(nn.Module):
    """Python conversions that are not data-dependent: a size (a tensor under tracing) and the
    weights' values; both must still export."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1000:  # the batch is a dynamic axis: a traced size
            raise ValueError("batch too large")
        if self.a.weight.abs().sum() > 0:  # the weights: fixed, baking them in is right
            return self.a(x)
        return self.a(x) * 0


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids) * attention_mask[..., None]


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval().to(dtype)


# -- 1. non-tensor arguments -----------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_scalar_that_differs_from_the_baked_one_is_refused(runtime: str, tmp_path: Path) -> None:
    """Was: built with scale=2.0 and called with 3.0, the graph answered for 2.0 (1.31 off)."""
    torch.manual_seed(0)
    model, x = _Scaled().eval(), torch.randn(4, 8)
    served = build_backend(runtime, model, (x, 2.0), batch_sizes=(1, 4), cache_dir=tmp_path)
    with pytest.raises(fastinfer.CompileError, match=r"scale=3\.0 \(the graph has 2\.0.*Fix: "):
        served(x, 3.0)
    with pytest.raises(fastinfer.CompileError, match=r"scale=3\.0"):
        served(x, scale=3.0)
    with torch.inference_mode():
        want = model(x, 2.0)
        for got in (served(x, 2.0), served(x, scale=2), served(x)):  # equal values still run
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Built with 5.0: leaving it out means forward's default 2.0 in eager, 5.0 in the graph.
    other = build_backend(runtime, model, (x, 5.0), batch_sizes=(4,), cache_dir=tmp_path)
    with pytest.raises(fastinfer.CompileError, match=r"scale left out.*default 2\.0.*5\.0"):
        other(x)


def test_hf_style_arguments_are_checked_against_the_baked_ones() -> None:
    """return_dict / output_hidden_states / a KV cache: refused when they differ from what the
    graph has; equal values (and None where the example had none) still run."""
    from fastinfer.compiling._runtime_args import BakedArguments

    class Cache:  # a KV cache object, as transformers passes one
        pass

    def forward(  # the shape of a transformers forward
        input_ids: Any = None,
        past_key_values: Any = None,
        return_dict: Any = None,
        **kwargs: Any,
    ) -> None:
        return None

    ids = torch.ones(2, 3, dtype=torch.long)
    baked = BakedArguments.of(forward, (), {"input_ids": ids, "return_dict": True}, [])
    m = RuntimeModel(
        lambda feed: [torch.zeros(2).numpy()], ["input_ids"], ["input_ids"], baked=baked
    )
    m(input_ids=ids, return_dict=True)  # the example's value
    m(input_ids=ids)  # left out: forward's default is None ("from the config"), taken as meant
    m(input_ids=ids, past_key_values=None, output_attentions=None)  # None where it had none
    for kwargs, match in [
        ({"return_dict": False}, r"return_dict=False \(the graph has True: the example's value"),
        ({"output_hidden_states": True}, r"output_hidden_states=True \(the graph has None"),
        ({"past_key_values": Cache()}, r"past_key_values=a Cache \(the graph has None"),
        ({"past_key_values": (ids, ids)}, r"past_key_values=.*the graph has None"),
    ]:
        with pytest.raises(fastinfer.CompileError, match=match):
            m(**{"input_ids": ids, "return_dict": True, **kwargs})


@pytest.mark.transformers
def test_a_decoding_step_with_a_kv_cache_is_refused(tmp_path: Path) -> None:
    """Was: a tiny Llama's decode step with past_key_values=cache answered as without the cache
    (0.159 off), output_hidden_states=True gave hidden_states=None and return_dict=False a
    ModelOutput, all without an error."""
    model = testing.ZOO["llama"].build()
    ids = torch.randint(3, 96, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": mask, "return_dict": True}
    served = build_backend("onnxruntime", model, example, batch_sizes=(2,), cache_dir=tmp_path)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = {"input_ids": ids[:, :1], "attention_mask": torch.ones(2, 7, dtype=torch.long)}
        with pytest.raises(fastinfer.CompileError, match=r"past_key_values=a \w*Cache"):
            served(**step, past_key_values=first.past_key_values)
        with pytest.raises(fastinfer.CompileError, match=r"output_hidden_states=True"):
            served(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with pytest.raises(fastinfer.CompileError, match=r"return_dict=False"):
            served(input_ids=ids, attention_mask=mask, return_dict=False)
        got = served(input_ids=ids, attention_mask=mask, return_dict=True, past_key_values=None)
        torch.testing.assert_close(got.logits, first.logits, rtol=1e-4, atol=1e-4)


# -- 2. data-dependent control flow ----------------------------------------------------------


def test_data_dependent_control_flow_declines_the_runtime_candidates(tmp_path: Path) -> None:
    """Was: the TorchScript export baked in the example's branch (1.1 off on the other one) and
    select_backend marked both runtimes ok."""
    torch.manual_seed(0)
    model, x = _Branch().eval(), torch.randn(4, 8).abs()
    with pytest.raises(
        fastinfer.CompileError,
        match=r"(?s)data-dependent control flow.*if x\.sum\(\) > 0.*Fix: .*torch\.where",
    ):
        build_backend("onnxruntime", model, (x,), batch_sizes=(1, 4), cache_dir=tmp_path)
    names = ["eager", "onnxruntime"] + (["openvino"] if available("openvino") else [])
    report = select_backend(
        model, (x,), candidates=names, batch_sizes=(1, 4), repeat=1, cache_dir=tmp_path
    )
    assert report.result("eager").status == "ok" and report.winner == "eager"
    for name in names[1:]:
        r = report.result(name)
        assert r.status == "failed" and "data-dependent control flow" in r.reason, r.reason
    assert "__bool__" not in torch.Tensor.__dict__  # the conversions are torch's own again


def test_size_and_weight_checks_still_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _ShapeChecks().eval(), torch.randn(4, 8)
    served = build_backend("onnxruntime", model, (x,), batch_sizes=(1, 4), cache_dir=tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(served(x[:3]), model(x[:3]), rtol=1e-4, atol=1e-5)


# -- 3. other input dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_integer_and_bool_inputs_are_widened_to_the_graphs_dtype(
    runtime: str, tmp_path: Path
) -> None:
    """Was: int32 ids or a bool mask (eager takes both) raised a CompileError blaming a fixed
    size; they are converted without loss now, and a lossy dtype is refused by name."""
    torch.manual_seed(0)
    model = _Embed().eval()
    ids = torch.randint(0, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0
    served = build_backend(
        runtime,
        model,
        {"input_ids": ids, "attention_mask": mask},
        batch_sizes=(4,),
        cache_dir=tmp_path,
    )
    with torch.inference_mode():
        want = model(ids, mask)
        torch.testing.assert_close(served(input_ids=ids.int(), attention_mask=mask.bool()), want)
        torch.testing.assert_close(served(ids.to(torch.int16), mask.to(torch.uint8)), want)
        with pytest.raises(
            fastinfer.CompileError, match=r"takes 'input_ids' as torch\.int64.*torch\.float32.*Fix"
        ):
            served(input_ids=ids.float(), attention_mask=mask)


def test_a_dtype_the_runtime_refuses_is_named_as_a_dtype_problem() -> None:
    def run(feed: dict[str, Any]) -> list[Any]:
        raise RuntimeError(
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type. "
            "Actual: (tensor(int32)) , expected: (tensor(int64))"
        )

    m = RuntimeModel(run, ["x"], ["x"])
    with pytest.raises(fastinfer.CompileError, match=r"x\(3, 5\) int32.*takes other dtypes") as e:
        m(torch.ones(3, 5, dtype=torch.int32))
    assert "fixed a size" not in str(e.value)


# -- 4. dtypes the runtimes cannot run -------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_bfloat16_model_is_refused_at_build(runtime: str, tmp_path: Path) -> None:
    """Was: ONNX Runtime raised its raw NOT_IMPLEMENTED (bf16 Gemm); OpenVINO built a model
    whose every call raised a raw TypeError (unsupported ScalarType BFloat16)."""
    model = _mlp(torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(fastinfer.CompileError, match=r"bfloat16.*Fix: serve the model in float32"):
        build_backend(runtime, model, (x,), batch_sizes=(4,), cache_dir=tmp_path)


def test_a_float64_graph_onnxruntime_has_no_kernel_for_is_refused_at_build(
    tmp_path: Path,
) -> None:
    model = _mlp(torch.float64)  # GELU: ONNX Runtime has no float64 Erf on the CPU
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(fastinfer.CompileError, match=r"NOT_IMPLEMENTED.*torch\.float64.*Fix"):
        build_backend("onnxruntime", model, (x,), batch_sizes=(4,), cache_dir=tmp_path)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_build_backend_calls_the_runtime_before_handing_it_back(
    runtime: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A runtime that cannot run (or answers otherwise) is never handed back by build_backend."""
    from fastinfer.compiling import _runtimes

    builder = (
        _runtimes.OnnxRuntimeBuilder if runtime == "onnxruntime" else _runtimes.OpenVinoBuilder
    )
    model, x = _mlp(torch.float32), torch.randn(4, 8)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("Got unsupported ScalarType BFloat16")

    monkeypatch.setattr(builder, "build", lambda self, ctx: (broken, broken))
    with pytest.raises(fastinfer.CompileError, match=r"fails on the example.*ScalarType"):
        build_backend(runtime, model, (x,), batch_sizes=(4,), cache_dir=tmp_path)

    def wrong(x: torch.Tensor) -> torch.Tensor:
        return model(x) + 1

    monkeypatch.setattr(builder, "build", lambda self, ctx: (wrong, wrong))
    with pytest.raises(fastinfer.VerificationError, match=r"differs from eager"):
        build_backend(runtime, model, (x,), batch_sizes=(4,), cache_dir=tmp_path)


@pytest.mark.skipif(not available("onnxruntime"), reason="needs onnxruntime")
def test_a_run_that_fails_is_reported_once_not_also_printed_by_ort(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # This model's export bakes a shape into a Reshape, so ORT fails on another batch size: the
    # candidate is "failed" with ORT's message in the report. Before, ORT's logger also printed
    # the error to stderr in colour ("[E:onnxruntime:...]"), outside any logging config.
    model = testing.bert_like_classifier().eval()
    ids, mask = testing.text_batch(8, 16, padding=0.4)
    report = select_backend(
        model,
        {"input_ids": ids, "attention_mask": mask},
        candidates=["eager", "onnxruntime"],
        batch_sizes=(1, 8),
        budget_seconds=None,
        cache_dir=tmp_path,
    )
    result = report.result("onnxruntime")
    assert result.status == "failed" and "Reshape" in result.reason
    assert report.winner == "eager"
    assert "onnxruntime" not in capfd.readouterr().err

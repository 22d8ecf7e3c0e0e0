"""compile_model under the grad modes services use, recompile errors that name the guard, and
models that pin their batch size (issue 18). Dynamo's cheap ``eager`` backend exercises the same
guards, stance and warm-up logic as inductor, in a fraction of the time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastinfer import ConfigError, RecompileError, compile_model
from fastinfer import testing as ft

SIZES = (1, 4, 8)


def _x(batch: int = 4, **kwargs: object) -> torch.Tensor:
    return torch.randn(batch, 32, generator=torch.Generator().manual_seed(batch), **kwargs)  # type: ignore[call-overload]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_calls_under_inference_mode_or_no_grad_never_recompile() -> None:
    model = ft.tiny_mlp(seed=3)
    compiled = compile_model(model, _x(), backend="eager", batch_sizes=SIZES)
    before = _graphs()
    for b in SIZES:
        want = model(_x(b)).detach()
        with torch.inference_mode():  # the README idiom: inputs made inside inference_mode
            torch.testing.assert_close(compiled(_x(b)), want)
        with torch.no_grad():
            torch.testing.assert_close(compiled(_x(b)), want)
        torch.testing.assert_close(compiled(_x(b)), want)  # no grad mode at all
        torch.testing.assert_close(compiled(_x(b, requires_grad=True)), want)
    assert _graphs() == before, "a call in another grad mode compiled again"
    s = compiled.statistics()
    assert s.recompiles_refused == 0 and s.calls == 4 * len(SIZES)


def test_compiled_under_inference_mode_serves_normal_tensors() -> None:
    model = ft.tiny_mlp(seed=4)
    with torch.inference_mode():  # example inputs are inference tensors here
        compiled = compile_model(model, _x(), backend="eager", batch_sizes=SIZES)
    before = _graphs()
    with torch.no_grad():
        compiled(_x(4))
    with torch.inference_mode():
        compiled(_x(8))
    assert _graphs() == before


class _Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        y = self.lin(x)
        return y * 2 if double else y


def test_recompile_error_names_the_guard_that_failed() -> None:
    compiled = compile_model(_Flagged().eval(), (_x(),), backend="eager", batch_sizes=SIZES)
    with pytest.raises(RecompileError) as dtype:
        compiled(_x(4).double())
    text = str(dtype.value)
    assert "the dtype changed" in text and "cast the inputs" in text
    assert "dtype mismatch" in text  # dynamo's own guard, quoted
    assert "add the batch size" not in text
    with pytest.raises(RecompileError) as shape:
        compiled(_x(16))
    assert "the shape changed" in str(shape.value) and "add the batch size" in str(shape.value)
    with pytest.raises(RecompileError) as value:
        compiled(_x(4), True)
    assert "the Python value changed" in str(value.value)
    assert compiled.statistics().recompiles_refused == 3


def test_guard_failures_are_classified() -> None:
    from fastinfer.compiling._guards import GuardFailure, guard_failures

    message = (
        "Detected recompile when torch.compile stance is 'fail_on_recompile'. filename: 'm.py'\n"
        "    triggered by the following guard failure(s):\n"
        "    - 0/0: tensor 'x' dispatch key set mismatch. expected A, actual B\n"
        "    - 0/1: tensor 'x' device mismatch. expected cpu, actual cuda:0\n"
        "    - 0/2: 2 <= L['x'].size()[0] <= 8\n"
        "    - 0/3: L['flag'] == False\n"
        "    - 0/4: tensor 'x' dispatch key set mismatch. expected A, actual B\n"
    )
    kinds = [f.kind for f in guard_failures(message)]
    assert kinds == ["grad mode", "device", "shape", "Python value"]  # duplicates merged
    assert GuardFailure("tensor 'x' dtype mismatch. expected Float").kind == "dtype"
    assert guard_failures("no list here") == []
    inference = "expected DispatchKeySet(CPU, BackendSelect, ADInplaceOrView), actual DispatchKeySet(CPU, BackendSelect)"
    meta = "expected DispatchKeySet(CPU, BackendSelect), actual DispatchKeySet(Meta, BackendSelect)"
    assert GuardFailure(f"tensor 'x' dispatch key set mismatch. {inference}").kind == "grad mode"
    assert GuardFailure(f"tensor 'x' dispatch key set mismatch. {meta}").kind == "device"
    assert GuardFailure("tensor 'x' stride mismatch at index 0. expected 8, actual 1").kind == (
        "memory layout"
    )


def test_recompile_error_for_a_meta_or_transposed_input_names_that_cause() -> None:
    compiled = compile_model(_Flagged().eval(), (_x(),), backend="eager", batch_sizes=SIZES)
    with pytest.raises(RecompileError) as meta:
        compiled(torch.empty(4, 32, device="meta"))
    assert "the device changed" in str(meta.value) and "grad" not in str(meta.value).split("\n")[0]
    with pytest.raises(RecompileError) as view:
        compiled(torch.rand(32, 4).t())  # the same shape, transposed strides
    assert "the memory layout changed" in str(view.value) and ".contiguous()" in str(view.value)
    assert "add the batch size" not in str(view.value)


@pytest.mark.parametrize(
    "bad",
    [torch.empty(4, 32, device="meta"), torch.ones(4, 32, dtype=torch.int32)],
    ids=["meta", "int"],
)
def test_example_inputs_the_model_cannot_run_are_a_config_error(bad: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="fails on example_inputs"):
        compile_model(_Flagged().eval(), (bad,), backend="eager", batch_sizes=SIZES)


class _PointwiseConv(nn.Module):
    """A 1x1 convolution: ATen picks its CPU kernel by ``batch >= 16``, so dynamo specialises the
    batch dimension, as it does for torchvision's mobilenet_v3_small."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_a_model_that_specialises_the_batch_dim_compiles_one_graph_per_size() -> None:
    model = _PointwiseConv().eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = compile_model(model, (x,), backend="eager", batch_sizes=[1, 8, 32])
    s = compiled.statistics()
    assert s.batch_dim == "static" and "16 <=" in s.batch_dim_reason
    assert s.graphs == 3 and s.fallback is None
    before = _graphs()
    for b in (1, 8, 32):
        xb = torch.randn(b, 3, 8, 8)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(xb), model(xb))
    assert _graphs() == before
    assert "batch_dim='static'" in repr(compiled)


def test_a_dynamic_batch_dim_is_reported() -> None:
    compiled = compile_model(ft.tiny_mlp(seed=5), _x(), backend="eager", batch_sizes=SIZES)
    s = compiled.statistics()
    assert (s.batch_dim, s.batch_dim_reason, s.graphs) == ("dynamic", "", 2)


# --------------------------------------------------------------------------------------------
# One size above 1 (select_backend's default (1, 8)) still gets a dynamic batch dimension
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(1, 8), (8,), (1, 3)], ids=["1-8", "8", "1-3"])
def test_one_size_above_one_gets_a_dynamic_graph_for_every_size_up_to_it(
    sizes: tuple[int, ...],
) -> None:
    """(1, 8) compiled a static graph for 8 (no reason given), and a batch of 5 raised
    RecompileError, although the docs promise one dynamic graph for 2..max(batch_sizes)."""
    model = ft.tiny_mlp(seed=6)
    compiled = compile_model(model, _x(), backend="eager", batch_sizes=sizes)
    s = compiled.statistics()
    assert (s.batch_dim, s.batch_dim_reason, s.graphs) == ("dynamic", "", 2)
    before = _graphs()
    for b in range(1, max(sizes) + 1):
        with torch.inference_mode():
            torch.testing.assert_close(compiled(_x(b)), model(_x(b)))
    assert _graphs() == before, "a size inside 2..max compiled again"
    assert compiled.statistics().recompiles_refused == 0


@pytest.mark.parametrize(
    ("sizes", "why"),
    [((1,), "no size above 1"), ((1, 2), "the only batch size above 1 is 2")],
    ids=["1", "1-2"],
)
def test_a_static_batch_dim_says_why_and_what_to_pass(sizes: tuple[int, ...], why: str) -> None:
    compiled = compile_model(ft.tiny_mlp(seed=7), _x(), backend="eager", batch_sizes=sizes)
    s = compiled.statistics()
    assert s.batch_dim == "static" and why in s.batch_dim_reason
    assert "batch_sizes=(1, 8)" in s.batch_dim_reason  # the fix


def test_select_backends_default_batch_sizes_give_a_dynamic_graph() -> None:
    import inspect

    from fastinfer import select_backend
    from fastinfer.compiling import build_backend

    default = inspect.signature(select_backend).parameters["batch_sizes"].default
    assert default == inspect.signature(build_backend).parameters["batch_sizes"].default
    compiled = build_backend("aot_eager", ft.tiny_mlp(seed=8), _x())  # (1, 8), as selected
    assert compiled.statistics().batch_dim == "dynamic"
    with torch.inference_mode():
        compiled(_x(5))

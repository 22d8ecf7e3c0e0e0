"""compile_model / CompiledModel / select_backend under the calls a service makes (outside probe).

Each test is one fault an outside tester found: a training-mode model that select_backend took,
process-wide settings (thread count, autocast) reported as "the grad mode changed", a model
warmed with keyword arguments that refused the same tensors passed positionally, broadcast
tensors without a batch dimension that were resized like batched inputs, and a second
compile_model of one module that served unwarmed sizes from the first one's dynamic graph.
Dynamo's ``"eager"`` backend stands in for inductor: the faults are in dynamo's guards.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fastinfer import ConfigError, RecompileError, compile_model, select_backend
from fastinfer import testing as ft
from fastinfer.compiling._guards import GuardFailure, recompile_message, settings
from fastinfer.compiling._inputs import inputs_for


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 32, generator=torch.Generator().manual_seed(batch))


# -- 1. select_backend on a model in training mode ------------------------------------------------


def test_select_backend_refuses_a_training_model_before_building_anything(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(32, 16), nn.Dropout(0.5), nn.Linear(16, 4))  # not .eval()
    built: list[int] = []

    def candidate(x: torch.Tensor) -> torch.Tensor:
        built.append(1)
        return model(x)

    with pytest.raises(ConfigError, match=r"training mode: call model\.eval\(\) before select_"):
        select_backend(
            model,
            (_x(),),
            candidates=["eager", ("mine", candidate)],
            batch_sizes=(1, 4),
            cache_dir=tmp_path,
        )
    assert built == [] and not (tmp_path / "decisions").exists()
    # the same wording as compile_model's
    with pytest.raises(ConfigError, match=r"training mode: call model\.eval\(\) before compile_"):
        compile_model(model, (_x(),), backend="eager")


def test_select_backend_refuses_a_training_mode_candidate_module(tmp_path: Path) -> None:
    model = ft.tiny_mlp()
    swapped = ft.tiny_mlp().train()  # a copy put back in training mode
    with pytest.raises(ConfigError, match=r"candidate 'swapped' is in training mode"):
        select_backend(
            model,
            (_x(),),
            candidates=["eager", ("swapped", swapped)],
            batch_sizes=(1, 4),
            cache_dir=tmp_path,
        )


# -- 2. process-wide settings: thread count, autocast --------------------------------------------


def test_a_changed_thread_count_is_named_with_its_fix() -> None:
    compiled = compile_model(ft.tiny_mlp(), (_x(),), backend="eager", batch_sizes=(1, 4))
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)  # conftest restores it
    with pytest.raises(RecompileError) as info:
        compiled(_x())
    text = str(info.value)
    assert "the thread count changed" in text and "grad mode" not in text
    assert f"compiled with {before} thread(s)" in text and f"is now {before + 1}" in text
    assert "configure_threads" in text and "GLOBAL_STATE changed: num_threads" in text
    torch.set_num_threads(before)  # set back: served again, no compile
    compiled(_x())
    assert compiled.statistics().recompiles_refused == 1


def test_autocast_around_the_call_is_named_not_grad_mode() -> None:
    compiled = compile_model(ft.tiny_mlp(), (_x(),), backend="eager", batch_sizes=(1, 4))
    with pytest.raises(RecompileError) as info, torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(_x())
    text = str(info.value)
    assert "the autocast state changed" in text and "grad mode" not in text
    assert "runs under torch.autocast('cpu') and the model was warmed up outside it" in text


def test_compiled_under_autocast_then_called_outside_names_autocast() -> None:
    model = ft.tiny_mlp(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = compile_model(model, (_x(),), backend="eager", batch_sizes=(1, 4))
        compiled(_x())  # served under the autocast it was warmed under
    with pytest.raises(RecompileError) as info:
        compiled(_x())
    text = str(info.value)
    assert "the autocast state changed." in text, text
    assert "warmed up under torch.autocast('cpu') and this call runs outside it" in text
    assert "dtype" not in text.split("dynamo's")[0] and "grad mode" not in text


@pytest.mark.parametrize(
    ("guard", "kinds"),
    [
        (
            "GLOBAL_STATE changed: autocast(cpu)_enabled num_threads ",
            ["autocast state", "thread count"],
        ),
        ("GLOBAL_STATE changed: grad_mode ", ["grad mode"]),
        ("GLOBAL_STATE changed: default_dtype ", ["default dtype"]),
        ("GLOBAL_STATE changed: deterministic_algorithms ", ["deterministic-algorithms setting"]),
        ("GLOBAL_STATE changed: something_new ", ["process-wide torch setting"]),
    ],
    ids=["autocast+threads", "grad", "default-dtype", "deterministic", "unknown"],
)
def test_global_state_guards_name_each_setting(guard: str, kinds: list[str]) -> None:
    failure = GuardFailure(guard)
    assert [k for k, _ in failure.changes] == kinds
    if kinds == ["process-wide torch setting"]:
        assert "'something_new'" in failure.fix


def test_dynamos_unexpected_recompilation_note_is_not_a_change() -> None:
    message = (
        "Detected recompile when torch.compile stance is 'fail_on_recompile'.\n"
        "    triggered by the following guard failure(s):\n"
        "    - 0/0: Unexpected recompilation: runtime guards failed even though they passed\n"
        "    - 0/1: tensor 'x' size mismatch at index 0. expected 1, actual 4\n"
        "    - 0/2: GLOBAL_STATE changed: num_threads \n"
    )
    compiled = {**settings(), "num_threads": torch.get_num_threads() + 1}
    text = recompile_message(message, [(4, 32)], [1, 4], compiled=compiled)
    assert text.splitlines()[0].endswith("the thread count changed.")
    assert f"compiled with {torch.get_num_threads() + 1} thread(s)" in text
    assert "Python value" not in text
    # the same count as at compile time: another model's graph, not this call's change
    assert "thread count" not in recompile_message(message, [(4, 32)], [1, 4], compiled=settings())


def test_guards_of_other_models_graphs_are_left_out() -> None:
    message = (
        "Detected recompile when torch.compile stance is 'fail_on_recompile'.\n"
        "    triggered by the following guard failure(s):\n"
        "    - 0/0: len(fn._modules) != 3\n"
        "    - 0/1: tensor 'args[0]' size mismatch at index 0. expected 1, actual 3\n"
        "    - 0/2: tensor 'args[0]' size mismatch at index 0. expected 2, actual 3\n"
        "    - 0/3: tensor 'args[0]' size mismatch at index 0. expected 1, actual 3\n"
    )
    text = recompile_message(message, [(3, 16)], [1, 2])
    assert text.splitlines()[0].endswith("the shape changed.")
    assert "len(fn._modules)" not in text and "1 failed guard(s) of other" in text
    # when every graph fails on the model itself (model.train() after compiling), it is named
    own = message.split("    - 0/1")[0]
    assert "len(fn._modules) != 3" in recompile_message(own, [(3, 16)], [1, 2])


# -- 3. positional and keyword calls --------------------------------------------------------------


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x) * mask[..., None]


def _wrapped(fn: Any) -> Any:
    """What transformers' forward decorators do: a ``(self, *args, **kwargs)`` wrapper, which
    dynamo traces and guards on (``not args``, ``len(kwargs) == 2``)."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    return wrapper


class _Decorated(_Masked):
    forward = _wrapped(_Masked.forward)


class _Opaque(_Masked):
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        x, mask = args if args else (kwargs["x"], kwargs["mask"])
        return self.lin(x) * mask[..., None]


def _xm(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 8, generator=g), (torch.rand(batch, generator=g) > 0.3).float()


@pytest.mark.parametrize("cls", [_Masked, _Decorated], ids=["plain", "decorated"])
def test_a_model_warmed_with_keywords_serves_positional_calls(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    x, m = _xm()
    compiled = compile_model(model, {"x": x, "mask": m}, backend="eager", batch_sizes=(1, 4))
    with torch.inference_mode():
        want = model(x, m)
    for got in (compiled(x, m), compiled(x, mask=m), compiled(mask=m, x=x), compiled(x=x, mask=m)):
        torch.testing.assert_close(got, want)
    warmed = compile_model(model, (x, m), backend="eager", batch_sizes=(1, 4))
    torch.testing.assert_close(warmed(x=x, mask=m), want)  # and the other way round
    assert compiled.statistics().recompiles_refused == 0
    assert warmed.statistics().recompiles_refused == 0


def test_a_call_that_cannot_be_bound_names_the_call_style() -> None:
    model = _Opaque().eval()
    x, m = _xm()
    compiled = compile_model(model, {"x": x, "mask": m}, backend="eager", batch_sizes=(1, 4))
    with pytest.raises(RecompileError) as info:
        compiled(x, m)
    text = str(info.value)
    assert "called positionally, warmed with keywords" in text
    assert "call it the way it was warmed up" in text and "Python value" not in text


def test_a_left_out_argument_is_named() -> None:
    model = _Masked().eval()
    x, m = _xm()
    compiled = compile_model(model, {"x": x, "mask": m}, backend="eager", batch_sizes=(1, 4))
    with pytest.raises(RecompileError, match=r"called with the arguments \['x'\], warmed up with"):
        compiled(x)


@pytest.mark.transformers
def test_hf_bert_warmed_with_keywords_serves_a_positional_call() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(3, 100, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 10:] = 0
    compiled = compile_model(
        model, {"input_ids": ids, "attention_mask": mask}, backend="eager", batch_sizes=(1, 4)
    )
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, want)
    torch.testing.assert_close(compiled(ids, mask).logits, want)


# -- 4. tensors without a batch dimension ---------------------------------------------------------


class _Biased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + bias


@pytest.mark.parametrize(
    ("bias_shape", "sizes"),
    [((1, 4), (1, 4)), ((1, 4), (1, 4, 8)), ((4,), (1, 3))],
    ids=["(1,D)-static", "(1,D)-dynamic", "(D,)-D-not-batch"],
)
def test_a_tensor_without_a_batch_dim_is_passed_as_is(
    bias_shape: tuple[int, ...], sizes: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = _Biased().eval()
    batch = max(sizes) if len(sizes) == 2 else 4
    bias = torch.randn(bias_shape)
    example = {"x": torch.randn(batch, 8), "bias": bias}
    compiled = compile_model(model, example, backend="eager", batch_sizes=sizes)
    for b in range(1, max(sizes) + 1):
        if len(sizes) == 2 and b not in sizes:
            continue  # static graphs: only the warmed sizes
        x = torch.randn(b, 8)
        with torch.inference_mode():
            want = model(x, bias)
        torch.testing.assert_close(compiled(x=x, bias=bias), want)
    assert compiled.statistics().recompiles_refused == 0


def test_a_broadcast_tensor_keeps_its_shape_at_every_size() -> None:
    x, bias, vec = torch.randn(4, 8), torch.randn(1, 4), torch.randn(6)
    _, kwargs = inputs_for({"x": x, "bias": bias, "vec": vec}, 8)
    assert kwargs["x"].shape == (8, 8) and kwargs["bias"].shape == (1, 4)
    assert kwargs["vec"].shape == (6,)
    # an example batch of 1 is ambiguous: every tensor with a leading 1 is a batched input
    _, one = inputs_for({"ids": torch.ones(1, 5), "bias": torch.ones(1, 4)}, 3)
    assert one["ids"].shape == (3, 5) and one["bias"].shape == (3, 4)


@pytest.mark.parametrize("style", ["kwargs", "args"])
def test_export_aot_keeps_a_tensor_without_a_batch_dim_static(
    style: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: dim 0 of every tensor was the dynamic batch, and torch.export refused the (1, D)
    # bias ("L['bias'].size()[0] = 1 is not equal to L['x'].size()[0] = 8"). The export call is
    # stopped after its arguments are seen (a real AOT compile takes ~15 s).
    import torch.export

    from fastinfer import CompileError, export_aot

    seen: dict[str, Any] = {}

    def export(model: Any, args: Any, kwargs: Any, *, dynamic_shapes: Any) -> Any:
        seen["shapes"] = dynamic_shapes
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(torch.export, "export", export)
    x, bias = torch.randn(4, 8), torch.randn(1, 4)
    example: Any = {"x": x, "bias": bias} if style == "kwargs" else (x, bias)
    with pytest.raises(CompileError, match="stopped by the test"):
        export_aot(_Biased().eval(), example, tmp_path / "m.pt2", batch_sizes=(1, 8))
    shapes = seen["shapes"]
    x_spec, bias_spec = (shapes["x"], shapes["bias"]) if style == "kwargs" else shapes
    assert bias_spec is None and list(x_spec) == [0]


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(100, 8), nn.Linear(40, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids).flatten(1))


@pytest.mark.parametrize("view", ["sliced", "sliced-inference", "transposed"])
def test_a_contiguous_view_with_other_strides_on_a_size_1_dim_is_served(view: str) -> None:
    # full[:, :5] of a (1, 12) tensor is contiguous, with strides (12, 1): dynamo's guard saw
    # another layout and the call was refused, with a fix (x.contiguous()) that changes nothing.
    torch.manual_seed(0)
    model = _Tokens().eval()  # its own class: dynamo's graphs are per class (see the test below)
    compiled = compile_model(
        model, torch.randint(0, 100, (4, 5)), backend="eager", batch_sizes=(1, 4)
    )
    full = torch.randint(0, 100, (1, 12))
    if view == "sliced-inference":
        with torch.inference_mode():
            full = full.clone()
    x = full[:, :5] if view != "transposed" else torch.randint(0, 100, (5, 1)).t()  # strides (1, 1)
    assert x.is_contiguous() and x.stride() != (5, 1)
    with torch.inference_mode():
        want = model(x)
    torch.testing.assert_close(compiled(x), want)
    assert compiled.statistics().recompiles_refused == 0


def test_a_vector_as_long_as_the_batch_gets_a_hint() -> None:
    model = _Biased().eval()
    example = {"x": torch.randn(4, 8), "bias": torch.randn(4)}  # D == batch: ambiguous
    with pytest.raises(ConfigError) as info:
        compile_model(model, example, backend="eager", batch_sizes=(1, 2, 4))
    text = str(info.value)
    assert "'bias' (shape (4,)) was resized along dim 0" in text
    assert "give example inputs with another batch size (e.g. 5)" in text


# -- 5. two compile_model calls on one module -----------------------------------------------------


@pytest.mark.parametrize("same", [True, False], ids=["one-module", "another-module"])
def test_two_compiles_keep_their_own_guarantees(same: bool) -> None:
    # dynamo's record of which dimensions changed ("automatic dynamic") is kept per code object,
    # and every torch.compile'd module runs through the same wrapper code: a later static compile
    # made its graph dynamic from the earlier compile's record, of this module or any other.
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    other = model if same else nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).eval()
    first = compile_model(model, (torch.randn(8, 16),), backend="eager", batch_sizes=(1, 8))
    second = compile_model(other, (torch.randn(2, 16),), backend="eager", batch_sizes=(1, 2))
    assert second.statistics().batch_dim == "static"
    for b in (3, 5):
        with pytest.raises(RecompileError, match="the shape changed"):
            second(torch.randn(b, 16))
    with pytest.raises(RecompileError) as info:
        second(torch.randn(3, 16))
    if not same:  # the other model's graphs fail on its module: not this call's change
        assert "Python value" not in str(info.value)
    first(torch.randn(5, 16))  # the first one's dynamic graph still serves 2..8
    with pytest.raises(RecompileError):
        first(torch.randn(9, 16))

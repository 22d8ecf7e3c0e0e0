"""compile_model, select_backend and export_aot on models they cannot help (outside probe).

``swap_attention_`` records on the model whether compiling the path it chose can pay
(``model._fastinfer_attention``). For the packed and fused paths it cannot: inductor spent ~35 s
on a ``hf:packed`` BERT and then failed with ``LoweringException: AssertionError: target:
mkldnn._linear_pointwise.default``. Such a model is now refused up front, naming the path and
the fix, and select_backend skips its compiled candidates with that reason. Dynamo's cheap
backends stand in for inductor where the refusal comes first anyway.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import ConfigError, compile_model, export_aot, select_backend
from fastinfer import testing as ft

_PACKED = {
    "path": "hf:packed",
    "compile_useful": False,
    "compile_reason": "the packed path gathers the valid tokens with a data-dependent index",
}


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 32, generator=torch.Generator().manual_seed(batch))


def _marked(info: dict[str, Any] = _PACKED) -> nn.Module:
    """A model carrying what swap_attention_ records on the model it swapped."""
    model = ft.tiny_mlp(seed=11)
    model.__dict__["_fastinfer_attention"] = dict(info)
    return model


def _counting(calls: list[int]) -> Any:
    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        calls.append(1)
        return gm

    return backend


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_model_swapped_to_a_path_not_worth_compiling_is_refused_up_front() -> None:
    calls: list[int] = []
    model = _marked()
    with pytest.raises(ConfigError, match=r"'hf:packed'.*undo_attention_swap_") as info:
        compile_model(model, _x(), backend=_counting(calls), batch_sizes=(1, 4))
    assert "data-dependent index" in str(info.value)  # the swap's own reason
    assert calls == [], "compiled before refusing"
    # A wrapper around the swapped model is refused too, naming the submodule.
    with pytest.raises(ConfigError, match=r"submodule 'inner'"):
        compile_model(_Wrapper(model).eval(), _x(), backend=_counting(calls))
    # fallback="eager" runs the swapped model as it is, recorded and not compiled.
    served = compile_model(
        model, _x(), backend=_counting(calls), batch_sizes=(1, 4), fallback="eager"
    )
    assert calls == [] and "swap_attention_" in (served.statistics().fallback or "")
    torch.testing.assert_close(served(_x()), model(_x()))
    # Even dynamo's eager backend: the packed path's outputs differed from its own eager ones.
    with pytest.raises(ConfigError, match=r"'hf:packed'"):
        compile_model(model, _x(), backend="eager")


def test_a_path_worth_compiling_is_compiled() -> None:
    calls: list[int] = []
    model = _marked({"path": "hf:sdpa", "compile_useful": True, "compile_reason": "plain ops"})
    compile_model(model, _x(), backend=_counting(calls), batch_sizes=(1, 4))
    assert calls, "a swap that compiling can help was refused"


def test_export_aot_refuses_such_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"AOTInductor export is refused"):
        export_aot(_marked(), _x(), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_select_backend_skips_compiled_candidates_of_such_a_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FASTINFER_CACHE_DIR", raising=False)
    report = select_backend(
        _marked(),
        _x(),
        candidates=["eager", "inductor", "aot_eager", "aot"],
        batch_sizes=(1, 4),
        budget_seconds=None,
        repeat=1,
    )
    for name in ("inductor", "aot_eager", "aot"):
        row = report.result(name)
        assert row.status == "skipped" and "'hf:packed'" in row.reason, row
    assert report.winner == "eager"


@pytest.mark.transformers
def test_compile_model_refuses_a_bert_swapped_to_the_packed_path() -> None:
    """The probe's case: inductor on an hf:packed BERT (was ~35 s, then a LoweringException)."""
    entry = ft.zoo_model("bert")
    model = entry.build()
    example = entry.inputs(3)
    swapped = copy.deepcopy(model)
    report = fastinfer.swap_attention_(swapped, example_inputs=example, prefer="hf:packed")
    if report.chosen != "hf:packed":
        pytest.skip(f"hf:packed not chosen here: {report.chosen}")
    with pytest.raises(ConfigError, match=r"'hf:packed'") as info:
        compile_model(swapped, example, batch_sizes=(1, 3))  # inductor, the default
    assert "LoweringException" not in str(info.value)
    fastinfer.undo_attention_swap_(swapped)  # the fix the message names: compile the original
    assert "_fastinfer_attention" not in swapped.__dict__

"""The runtime candidates on batches padded otherwise than the example: ONNX Runtime's BERT
fusion read the attention mask as per-row lengths (``AttentionMaskFormat.MaskIndexEnd``, which
assumes right padding), so a BERT-family model built and verified on a right-padded example gave
outputs 0.003-0.02 off on valid positions for left-padded rows or a masked token inside a row.
select_backend's cached decision did not record the padding layout (a left-padded request reused a
right-padded decision), and the VerificationError blamed "a cache built for another CPU ISA"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fastinfer
from fastinfer import testing
from fastinfer._optional import available
from fastinfer.compiling import build_backend, select_backend
from fastinfer.errors import VerificationError

pytest.importorskip("onnxruntime", reason="needs the onnx extra")

RUNTIMES = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(not available("openvino"), reason="needs the openvino extra"),
    ),
]


def _right_padded(batch: int = 4, seq: int = 12) -> dict[str, torch.Tensor]:
    ids, mask = testing.text_batch(batch, seq, padding=0.4, vocab_size=90, seed=0)
    return {"input_ids": ids, "attention_mask": mask}


def _left_padded(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows moved to the end of each row (their tokens, ids and mask alike)."""
    ids, mask = example["input_ids"], example["attention_mask"]
    pads = (mask == 0).sum(dim=1)
    return {
        "input_ids": torch.stack([r.roll(int(p)) for r, p in zip(ids, pads)]),
        "attention_mask": torch.stack([r.roll(int(p)) for r, p in zip(mask, pads)]),
    }


def _valid_error(model: Any, served: Any, inputs: dict[str, torch.Tensor]) -> float:
    with torch.inference_mode():
        ref = model(**inputs).last_hidden_state
        out = served(**inputs).last_hidden_state
    valid = inputs["attention_mask"].bool()
    return float((out[valid] - ref[valid]).abs().max())


@pytest.mark.transformers
@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_runtime_built_on_right_padding_answers_left_padding_and_holes_like_eager(
    runtime: str, family: str, tmp_path: Path
) -> None:
    """ONNX Runtime's fused Attention now takes the raw 0/1 mask; OpenVINO was right before."""
    model = testing.zoo_model(family).build()
    example = _right_padded()
    served = build_backend(runtime, model, example, batch_sizes=(1, 4), cache_dir=tmp_path)
    holed = dict(example, attention_mask=example["attention_mask"].clone())
    longest = int(example["attention_mask"].sum(dim=1).argmax())
    holed["attention_mask"][longest, 3] = 0  # a masked token inside the full-length row
    for inputs in (example, _left_padded(example), holed):
        assert _valid_error(model, served, inputs) < 1e-4


@pytest.mark.transformers
def test_a_runtime_that_handles_right_padding_only_is_rejected_with_a_padding_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fusion as it was (ORT's bert defaults: the mask reduced to per-row lengths) passes
    the right-padded example; the check on the example laid out otherwise declines it, saying
    why (before, it was "ok" and could win)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    fuse = optimizer.optimize_model

    def with_defaults(*args: Any, **kwargs: Any) -> Any:
        kwargs["optimization_options"] = FusionOptions(kwargs.get("model_type", "bert"))
        return fuse(*args, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_model", with_defaults)
    model = testing.zoo_model("bert").build()
    example = _right_padded()
    report = select_backend(
        model,
        example,
        candidates=["eager", "onnxruntime"],
        batch_sizes=(1, 4),
        budget_seconds=None,
        repeat=1,
        cache_dir=tmp_path / "select",
    )
    r = report.result("onnxruntime")
    assert r.status == "rejected" and report.winner == "eager", r
    (fusions,) = (tmp_path / "select" / "artifacts").glob("onnxruntime-*/fusions.txt")
    assert "Attention x1" in fusions.read_text()  # the fused path is what was declined
    assert "padding layout (right) only" in r.reason and "left-padded" in r.reason, r.reason
    with pytest.raises(VerificationError, match=r"padding layout \(right\) only"):
        build_backend("onnxruntime", model, example, batch_sizes=(1, 4), cache_dir=tmp_path)


@pytest.mark.transformers
def test_the_decision_key_records_the_padding_layout(tmp_path: Path) -> None:
    """A decision measured on right-padded batches is not reused for left-padded or unpadded
    ones; the same layout still reuses it."""
    model = testing.zoo_model("bert").build()
    example = _right_padded()

    def select(inputs: dict[str, torch.Tensor]) -> fastinfer.compiling.BackendReport:
        return select_backend(
            model,
            inputs,
            candidates=["eager"],
            batch_sizes=(1, 4),
            budget_seconds=None,
            repeat=1,
            cache_dir=tmp_path,
        )

    assert not select(example).from_cache
    assert select(example).from_cache
    assert not select(_left_padded(example)).from_cache
    assert select(_left_padded(example)).from_cache
    unpadded = dict(example, attention_mask=torch.ones_like(example["attention_mask"]))
    assert not select(unpadded).from_cache
    assert len(list((tmp_path / "decisions").glob("*.json"))) == 3


def test_a_mismatch_names_the_padding_layout_among_its_possible_causes() -> None:
    from fastinfer.compiling._verify import check_close

    with pytest.raises(VerificationError) as info:
        check_close(torch.ones(2, 3), torch.zeros(2, 3), rtol=None, atol=None, where="bs 2")
    text = str(info.value)
    assert "padded otherwise than the example" in text and "CPU ISA" in text
    assert "This is what a cache built for another CPU ISA looks like" not in text


def test_padding_layout_and_its_variants() -> None:
    from fastinfer._common.padding import padding_layout, padding_variants

    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert padding_layout(right.bool()) == "right"
    assert padding_layout(left.bool()) == "left"
    assert padding_layout(torch.ones(2, 4, dtype=torch.bool)) == "unpadded"
    assert padding_layout(torch.tensor([[1, 0, 1, 1]]).bool()) == "mixed"  # a hole
    assert padding_layout(torch.stack([right[1], left[1]]).bool()) == "mixed"  # both sides
    assert padding_layout(None) is None

    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    hidden = torch.arange(8.0).reshape(2, 4, 1)
    variants = dict(
        padding_variants({"input_ids": ids, "attention_mask": right, "x": hidden, "n": 3})
    )
    moved = variants["left-padded"]
    assert moved["attention_mask"].tolist() == left.tolist()
    assert moved["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 5, 6]]  # tokens move with it
    assert moved["x"][1, :, 0].tolist() == [6.0, 7.0, 4.0, 5.0] and moved["n"] == 3
    holed = variants["with a masked token inside row 0"]["attention_mask"]
    assert holed.tolist() == [[1, 1, 0, 1], [1, 1, 0, 0]]
    back = dict(padding_variants({"input_ids": ids, "attention_mask": left}))
    assert back["right-padded"]["attention_mask"].tolist() == right.tolist()
    cut = dict(padding_variants({"attention_mask": torch.ones(2, 4, dtype=torch.long)}))
    assert cut["left-padded"]["attention_mask"].tolist() == [[0, 1, 1, 1]] * 2
    assert padding_variants({"attention_mask": torch.ones(2, 4, 8)}) == []  # not a 2-D mask

"""swap_attention_ on models as they are served (issue 18): inside wrappers (sentence-transformers,
a user's module around a Hugging Face model), always with a reason when it declines, and a swapped
model stays picklable, deep-copyable and savable with ``torch.save`` on every path."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import testing


def _bert(seed: int = 0) -> Any:
    return testing.zoo_model("bert").build(seed)


def _features(batch: int = 4) -> dict[str, torch.Tensor]:
    return testing.zoo_model("bert").inputs(batch)  # type: ignore[no-any-return]


def _valid_equal(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-3, atol=1e-4)


class _Classifier(nn.Module):
    """A user's own module around a Hugging Face encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _bert()
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(hidden.last_hidden_state[:, 0])


@pytest.mark.transformers
@pytest.mark.parametrize("path", ["hf:packed", "hf:fused", "hf:sdpa"])
def test_the_model_inside_a_sentence_transformer_is_swapped(path: str) -> None:
    model = testing.SentenceEncoder(_bert()).eval()
    features = _features()
    with torch.inference_mode():
        want = model(features)
    report = fastinfer.swap_attention_(model, prefer=path, example_inputs=(features,), repeat=1)
    assert report.kind == "hf-encoder" and report.chosen == path and report.verified
    assert any("wraps BertModel at '0.auto_model'" in n for n in report.notes)
    with torch.inference_mode():
        got = model(features)
    torch.testing.assert_close(
        got["sentence_embedding"], want["sentence_embedding"], rtol=1e-3, atol=1e-4
    )
    _valid_equal(got["token_embeddings"], want["token_embeddings"], features["attention_mask"])
    fastinfer.undo_attention_swap_(model)
    with torch.inference_mode():
        assert torch.equal(model(features)["sentence_embedding"], want["sentence_embedding"])


@pytest.mark.transformers
def test_a_wrapper_is_swapped_by_measurement_too() -> None:
    model = _Classifier().eval()
    features = _features()
    report = fastinfer.swap_attention_(model, example_inputs=features, repeat=1)
    names = {p.name for p in report.paths}
    assert {"hf:packed", "hf:fused", "hf:sdpa", "hf:eager"} <= names
    assert report.chosen != "original" or report.reason  # a choice, or why not
    assert all(p.verified is not False for p in report.paths if p.available)


def test_a_report_that_declines_says_why() -> None:
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    report = fastinfer.swap_attention_(plain, example_inputs=torch.randn(2, 8))
    assert report.kind == "none" and report.chosen == "original"
    assert "no attention path to swap in Sequential" in report.reason
    assert "register_attention_swap" in report.reason
    assert report.reason in str(report) and report.to_dict()["reason"] == report.reason


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).softmax(-1) @ self.proj.weight


def test_a_decline_after_verification_names_the_rejected_paths() -> None:
    from fastinfer.attention._types import unregister_attention_swap

    fastinfer.register_attention_swap(_Mixer, lambda m: nn.Identity())  # computes something else
    try:
        model = nn.Sequential(_Mixer(), nn.ReLU()).eval()
        report = fastinfer.swap_attention_(model, example_inputs=torch.randn(2, 8), repeat=1)
    finally:
        unregister_attention_swap(_Mixer)
    assert report.chosen == "original" and report.reverted
    assert report.reason.startswith("every candidate that ran was rejected by verification")
    assert "registered: output 0 differs" in report.reason


def _round_trips(model: nn.Module) -> list[nn.Module]:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(buf, weights_only=False),
    ]


@pytest.mark.transformers
@pytest.mark.parametrize("path", ["hf:packed", "hf:fused", "hf:sdpa", "hf:eager"])
def test_a_swapped_hf_model_pickles_copies_and_saves(path: str) -> None:
    model = _bert()
    features = _features()
    fastinfer.swap_attention_(model, prefer=path)
    with torch.inference_mode():
        want = model(**features).last_hidden_state  # caches (reordered weights) are built
    for twin in _round_trips(model):
        with torch.inference_mode():
            got = twin(**features).last_hidden_state
        _valid_equal(got, want, features["attention_mask"])
    with torch.inference_mode():  # output capture still runs the original layers
        out = model(**features, output_hidden_states=True)
    assert len(out.hidden_states) == 2
    fastinfer.undo_attention_swap_(model)


@pytest.mark.parametrize("path", ["torch:packed", "torch:fastpath", "torch:fastpath-nested"])
def test_a_swapped_torch_model_pickles_copies_and_saves(path: str) -> None:
    model = testing.bert_like_classifier(num_layers=1, enable_nested_tensor=False)
    ids, mask = testing.text_batch(4, 16, padding=0.5)
    fastinfer.swap_attention_(model, prefer=path)
    with torch.inference_mode():
        want = model(ids, mask)
    for twin in _round_trips(model):
        with torch.inference_mode():
            torch.testing.assert_close(twin(ids, mask), want, rtol=1e-4, atol=1e-5)
    fastinfer.undo_attention_swap_(model)


class _PadNamed(nn.Module):
    """A wrapper of torch's encoder whose padding mask is called ``pad`` (True = padding)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=pad)


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_torch_padding_mask_under_another_name_is_found(batch_first: bool) -> None:
    # Was: torch:packed rejected as differing "on 192 valid elements", which were the padded
    # positions (the mask was looked up by name only).
    torch.manual_seed(0)
    model = _PadNamed(batch_first).eval()
    x = torch.randn(4, 16, 32) if batch_first else torch.randn(16, 4, 32)
    pad = torch.zeros(4, 16, dtype=torch.bool)
    pad[1, 10:] = True
    pad[3, 5:] = True
    with torch.inference_mode():
        want = model(x, pad)
    report = fastinfer.swap_attention_(model, example_inputs=(x, pad), prefer="torch:packed")
    packed = next(p for p in report.paths if p.name == "torch:packed")
    assert packed.verified, str(report)
    with torch.inference_mode():
        got = model(x, pad)
    valid = ~pad if batch_first else (~pad).t()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-3, atol=1e-4)


def test_an_ambiguous_bool_argument_is_not_taken_for_a_padding_mask() -> None:
    from fastinfer._common.padding import valid_mask

    model = _PadNamed(True).eval()
    x, pad = torch.randn(2, 4, 32), torch.zeros(2, 4, dtype=torch.bool)
    assert valid_mask(model, (x, pad)) is not None
    # two (B, T) bool arguments: no guess
    assert valid_mask(model, {"x": x, "pad": pad, "other": pad.clone()}) is None
    # not a model of torch's encoders: no guess
    assert valid_mask(nn.Linear(32, 32), (x, pad)) is None


@pytest.mark.transformers
def test_a_4d_attention_mask_in_the_example_is_read_for_validity() -> None:
    # Was: every path rejected as differing "on 1344 valid elements" (the padded ones).
    from fastinfer._common.padding import valid_mask

    features = _features()
    mask = features["attention_mask"]
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    t = mask.shape[1]
    causal_bool = mask[:, None, None, :].bool() & torch.ones(t, t).tril().bool()
    for four_d in (additive, causal_bool):
        assert torch.equal(valid_mask(None, {"attention_mask": four_d}), mask.bool())
    model = _bert().eval()
    inputs = {"input_ids": features["input_ids"], "attention_mask": additive}
    report = fastinfer.swap_attention_(model, example_inputs=inputs, prefer="hf:sdpa", repeat=1)
    assert report.path("hf:sdpa").verified, str(report)

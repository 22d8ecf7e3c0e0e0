"""A swap verified in grad mode and served under ``torch.inference_mode()``.

The original itself answers differently in the two modes: with parameters requiring grad (as
built), PyTorch's fastpath and nested tensors do not run, so ``nn.TransformerEncoder`` leaves
values at padded positions where, under ``no_grad`` / ``inference_mode``, its nested path leaves
zeros. A model that reads those positions (a mean over all of them, a decoder attending to the
memory without ``memory_key_padding_mask``) gets another answer. ``swap_attention_`` called in
grad mode (as the docs' ``nn.TransformerEncoder`` example does) verified every path against the
grad-mode answer only: it kept ``torch:fastpath`` (dense, frozen: it matches grad mode) and the
served answer moved by 0.77 and 1.28, while the paths that keep it were rejected. Every path is
now verified against the original as served; the swapped model, frozen, gives that answer in
every mode.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import testing
from fastinfer.attention import _discover, _select

pytestmark = pytest.mark.timeout(240)

TORCH_PATHS = ["torch:fastpath", "torch:fastpath-nested", "torch:packed"]


def _layer(d: int = 32) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)


class MeanPool(nn.Module):
    """An encoder, then a naive mean over all positions, padded ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoder(_layer(), 1)

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.enc(x, src_key_padding_mask=src_key_padding_mask).mean(1)


class Seq2Seq(nn.Module):
    """``nn.Transformer`` whose decoder attends to the padded memory (no memory mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.t = nn.Transformer(32, 2, 1, 1, 64, dropout=0.0, batch_first=True)

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, src_key_padding_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.t(self.emb(src), self.emb(tgt), src_key_padding_mask=src_key_padding_mask)


class BertThenEncoder(nn.Module):
    """An HF BERT, then an ``nn.TransformerEncoder`` head mean-pooled over all positions: the
    HF paths apply to the BERT inside; the head stays as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = testing.hf_bert(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
        torch.manual_seed(1)
        self.head = nn.TransformerEncoder(_layer(), 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h, src_key_padding_mask=attention_mask == 0).mean(1)


def _pool() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = MeanPool().eval()
    x = torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[1, 8:] = pad[2, 5:] = pad[3, 2:] = True
    return model, (x, pad)


def _seq2seq() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = Seq2Seq().eval()
    ids, mask = testing.text_batch(4, 12, padding=0.4, vocab_size=100, seed=0)
    return model, (ids, ids[:, :5].clone(), mask == 0)


def _served(model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    with torch.inference_mode():
        return model(*inputs).clone()  # type: ignore[no-any-return]


def _swap(model: nn.Module, inputs: Any, prefer: Any) -> fastinfer.AttentionReport:
    """In grad mode, as the docs' nn.TransformerEncoder example and the repros call it."""
    assert torch.is_grad_enabled()
    return fastinfer.swap_attention_(
        model, example_inputs=inputs, prefer=prefer, repeat=1, budget_seconds=None
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_the_model_answers_differently_in_grad_mode_and_served() -> None:
    """The premise: without it these cases would not differ between modes."""
    for model, inputs in (_pool(), _seq2seq()):
        assert (model(*inputs).detach() - _served(model, inputs)).abs().max() > 0.5


def test_a_dense_fastpath_that_changes_the_served_answer_is_declined() -> None:
    model, inputs = _pool()
    served = _served(model, inputs)
    report = _swap(model, inputs, "torch:fastpath")
    # was: chosen, "verified" (error 1.8e-7 against grad mode), served answer 0.77 off
    assert report.chosen == "original" and report.verified is False and report.reverted
    path = report.path("torch:fastpath")
    assert path.verified is False and path.max_abs_error is not None
    assert path.max_abs_error > 0.5
    assert "differs from the original as served" in path.reason
    assert "torch:fastpath: output 0 differs from the original as served" in report.reason
    assert torch.equal(_served(model, inputs), served)


@pytest.mark.parametrize("build", [_pool, _seq2seq], ids=["mean-pool", "transformer-memory"])
def test_a_grad_mode_swap_keeps_the_served_answer(build: Any) -> None:
    model, inputs = build()
    grad_answer = model(*inputs).detach()
    served = _served(model, inputs)
    report = _swap(model, inputs, TORCH_PATHS)  # kept even if not faster: any verified path
    # was: torch:fastpath chosen, the nested and packed paths rejected against grad mode
    assert report.chosen in ("torch:fastpath-nested", "torch:packed"), report
    assert report.verified is True
    assert report.path("torch:fastpath").verified is False
    _close(_served(model, inputs), served)
    with torch.no_grad():
        _close(model(*inputs), served)
    # frozen by the swap, the swapped model takes its served route in grad mode too
    _close(model(*inputs), served)
    fastinfer.undo_attention_swap_(model)
    assert torch.equal(model(*inputs).detach(), grad_answer)  # the original's grad answer back


def test_the_default_choice_in_grad_mode_keeps_the_served_answer() -> None:
    model, inputs = _seq2seq()
    served = _served(model, inputs)
    report = _swap(model, inputs, None)
    assert report.chosen != "torch:fastpath"  # was chosen: 1.28 off when served
    _close(_served(model, inputs), served)
    if report.chosen != "original":
        fastinfer.undo_attention_swap_(model)


def test_a_cached_decision_is_rechecked_as_served() -> None:
    """A stored choice is re-verified on one row before reuse (:func:`_select.verify_choice`)."""
    model, inputs = _pool()
    served = _served(model, inputs)
    cands = {c.name: c for c in _discover.discover(model)[1]}
    undo, problem = _select.verify_choice(model, inputs, cands["torch:fastpath"], None, None)
    assert "differs from the original as served" in problem  # was "": reused
    assert not undo.actions and all(p.requires_grad for p in model.parameters())
    assert torch.equal(_served(model, inputs), served)
    undo, problem = _select.verify_choice(model, inputs, cands["torch:packed"], None, None)
    assert problem == ""  # was rejected against the grad-mode answer
    _close(_served(model, inputs), served)
    undo()


@pytest.mark.transformers
def test_an_hf_path_is_verified_as_served_in_a_wrapper() -> None:
    """The HF paths go through the same selection: ``hf:sdpa`` zeroes BERT's padded positions,
    which the head's grad-mode route carries into its padded outputs (and the mean), its served
    nested route drops. Judged in grad mode it was rejected; as served it is right, and kept.
    It freezes only the BERT inside, so its own verifying call must be served as well."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = BertThenEncoder().eval()
    ids, mask = testing.text_batch(4, 12, padding=0.4, seed=0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.inference_mode():
        served = model(**inputs).clone()
    report = _swap(model, inputs, "hf:sdpa")
    assert report.chosen == "hf:sdpa" and report.verified is True, report
    with torch.inference_mode():
        _close(model(**inputs), served)
    fastinfer.undo_attention_swap_(model)

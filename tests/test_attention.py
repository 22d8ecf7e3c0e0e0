"""Attention swap: paths, verification, undo, fastpath reasons, registry, measurement."""

from __future__ import annotations

import copy
import json
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinfer
from fastinfer import testing
from fastinfer.attention import _diagnose, _family_hf, optimum_status
from fastinfer.attention import _why as _attention_why
from fastinfer.attention._types import REGISTRY, unregister_attention_swap
from fastinfer.errors import AttentionSwapError, ConfigError

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _small_bert(**kw: Any) -> Any:
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    args.update(kw)
    return testing.hf_bert(**args)


def _hf_inputs(batch: int = 4, seq: int = 16, padding: float = 0.5) -> dict[str, torch.Tensor]:
    ids, mask = testing.text_batch(batch, seq, padding=padding)
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).last_hidden_state.clone()


def _assert_valid_equal(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> None:
    torch.testing.assert_close(a[valid], b[valid], atol=1e-4, rtol=1e-3)


@pytest.fixture(autouse=True)
def _no_leftover_registrations() -> Iterator[None]:
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


# --------------------------------------------------------------------------------------------
# Hugging Face encoders
# --------------------------------------------------------------------------------------------


@pytest.mark.transformers
@pytest.mark.parametrize("path", ["hf:packed", "hf:fused", "hf:eager", "hf:sdpa"])
@pytest.mark.parametrize("padding", [0.0, 0.6], ids=["unpadded", "padded"])
def test_hf_bert_paths_equal_original_on_valid_tokens_and_zero_padding(
    path: str, padding: float
) -> None:
    model = _small_bert()
    inputs = _hf_inputs(padding=padding)
    ref = _hidden(model, inputs)
    report = fastinfer.swap_attention_(model, prefer=path)
    assert report.chosen == path
    out = _hidden(model, inputs)
    valid = inputs["attention_mask"].bool()
    _assert_valid_equal(out, ref, valid)
    assert torch.count_nonzero(out[~valid]) == 0  # padded positions are exact zeros on every path
    fastinfer.undo_attention_swap_(model)
    assert torch.equal(_hidden(model, inputs), ref)


@pytest.mark.transformers
def test_hf_swap_with_example_inputs_measures_verifies_and_undo_is_bit_exact(tmp_path: Any) -> None:
    model = _small_bert()
    keys = list(model.state_dict())
    inputs = _hf_inputs(batch=8, seq=32, padding=0.7)
    ref = _hidden(model, inputs)
    with torch.inference_mode():
        report = fastinfer.swap_attention_(model, example_inputs=inputs, repeat=2)
    names = [p.name for p in report.paths]
    assert names[0] == "original" and {"hf:packed", "hf:fused", "hf:sdpa"} <= set(names)
    for p in report.paths:
        if p.available:
            assert p.latency_seconds is not None and p.latency_seconds > 0
            assert p.verified is True and p.max_abs_error is not None
    assert report.path("hf:flash_attention_2").available is False
    assert report.measured and report.speedup is not None
    if report.chosen != "original":
        assert report.verified is True
        # state dict and save_pretrained stay compatible
        assert list(model.state_dict()) == keys
        model.save_pretrained(tmp_path)
        fresh = _small_bert(seed=1)
        fresh = type(fresh).from_pretrained(tmp_path).eval()
        _assert_valid_equal(_hidden(fresh, inputs), ref, inputs["attention_mask"].bool())
    json.dumps(report.to_dict())
    assert report.chosen in str(report)
    fastinfer.undo_attention_swap_(model)
    assert torch.equal(_hidden(model, inputs), ref)
    assert list(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.transformers
@pytest.mark.parametrize("path", ["hf:packed", "hf:fused"])
def test_hf_swapped_model_keeps_state_dict_and_save_pretrained(path: str, tmp_path: Any) -> None:
    model = _small_bert()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _hf_inputs()
    ref = _hidden(model, inputs)
    fastinfer.swap_attention_(model, prefer=path)
    swapped_sd = model.state_dict()
    assert list(swapped_sd) == list(sd)
    assert all(torch.equal(swapped_sd[k], sd[k]) for k in sd)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    _assert_valid_equal(_hidden(loaded, inputs), ref, inputs["attention_mask"].bool())
    # loading new weights into the swapped model is picked up (fused QKV cache invalidated)
    other = _small_bert(seed=1)
    model.load_state_dict(other.state_dict())
    _assert_valid_equal(
        _hidden(model, inputs), _hidden(other, inputs), inputs["attention_mask"].bool()
    )
    fastinfer.undo_attention_swap_(model)


@pytest.mark.transformers
@pytest.mark.parametrize("path", ["hf:packed", "hf:fused"])
def test_hf_left_padding(path: str) -> None:
    model = _small_bert()
    inputs = _hf_inputs(padding=0.5)
    inputs = {k: v.flip(1) for k, v in inputs.items()}  # left-padded
    ref = _hidden(model, inputs)
    fastinfer.swap_attention_(model, prefer=path)
    out = _hidden(model, inputs)
    valid = inputs["attention_mask"].bool()
    _assert_valid_equal(out, ref, valid)
    assert torch.count_nonzero(out[~valid]) == 0
    fastinfer.undo_attention_swap_(model)


def _family(name: str) -> Any:
    import transformers as tr

    small = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=1000,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with testing.seeded(0):
        if name == "roberta":
            return tr.RobertaModel(tr.RobertaConfig(**small, pad_token_id=1)).eval()
        if name == "xlm-roberta":
            return tr.XLMRobertaModel(tr.XLMRobertaConfig(**small, pad_token_id=1)).eval()
        if name == "electra":
            return tr.ElectraModel(tr.ElectraConfig(**small, embedding_size=64)).eval()
        if name == "distilbert-cls":
            cfg = tr.DistilBertConfig(
                dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000, dropout=0.0
            )
            return tr.DistilBertForSequenceClassification(cfg).eval()
    raise AssertionError(name)


@pytest.mark.transformers
@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "electra", "distilbert-cls"])
@pytest.mark.parametrize("path", ["hf:packed", "hf:fused"])
def test_hf_bert_family(family: str, path: str) -> None:
    model = _family(family)
    inputs = _hf_inputs(padding=0.5)
    inputs["input_ids"] = inputs["input_ids"] + 2 * inputs["attention_mask"]  # avoid pad ids

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model(**inputs)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state).clone()

    ref = run()
    report = fastinfer.swap_attention_(model, prefer=path)
    assert report.kind == "hf-encoder" and report.chosen == path
    out = run()
    if out.dim() == 3:
        _assert_valid_equal(out, ref, inputs["attention_mask"].bool())
    else:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    fastinfer.undo_attention_swap_(model)
    assert torch.equal(run(), ref)


@pytest.mark.transformers
def test_hf_packed_falls_back_for_output_capture_and_grad() -> None:
    model = _small_bert()
    inputs = _hf_inputs()
    fastinfer.swap_attention_(model, prefer="hf:packed")
    enc = model.encoder
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    assert enc.fallbacks == 1 and len(out.hidden_states) == 3
    with torch.inference_mode():
        model(**inputs)
    assert enc.fallbacks == 1  # the fast path ran
    model.embeddings.word_embeddings.weight.requires_grad_(True)
    model(**inputs)  # autograd: the original layers run, so gradients stay correct
    assert enc.fallbacks == 2
    fastinfer.undo_attention_swap_(model)
    with torch.inference_mode():
        assert len(model(**inputs, output_hidden_states=True).hidden_states) == 3


@pytest.mark.transformers
def test_hf_decoder_model_uses_attn_implementation_only() -> None:
    model = testing.hf_llama()
    report = fastinfer.swap_attention_(model)
    assert report.kind == "hf"
    assert not any(p.name in ("hf:packed", "hf:fused") for p in report.paths)
    assert report.chosen == "hf:sdpa" and report.verified is None
    assert report.path("hf:sdpa").available and "not verified" in str(report)
    assert "flash attention needs a CUDA GPU" in report.path("hf:flash_attention_2").reason
    assert report.compile_useful
    fastinfer.undo_attention_swap_(model)


@pytest.mark.transformers
def test_hf_compile_usefulness_is_reported_and_marked_on_model() -> None:
    model = _small_bert()
    report = fastinfer.swap_attention_(model, prefer="hf:fused")
    assert report.compile_useful is False and "opaque fused" in report.compile_reason
    assert model._fastinfer_attention["compile_useful"] is False
    assert model.__dict__["_fastinfer_attention"]["path"] == "hf:fused"
    fastinfer.undo_attention_swap_(model)
    assert "_fastinfer_attention" not in model.__dict__
    report = fastinfer.swap_attention_(model, prefer="hf:sdpa")
    assert report.compile_useful is True
    fastinfer.undo_attention_swap_(model)


@pytest.mark.transformers
def test_hf_padding_profile() -> None:
    model = _small_bert()
    report = fastinfer.swap_attention_(model, padding_profile=(4, 16, 0.5), repeat=1)
    assert report.measured and all(p.verified for p in report.paths if p.available)
    fastinfer.undo_attention_swap_(model)
    with pytest.raises(ConfigError, match=r"padding in \[0, 1\)"):
        fastinfer.swap_attention_(model, padding_profile=(4, 16, 1.5))


# --------------------------------------------------------------------------------------------
# Legacy optimum BetterTransformer
# --------------------------------------------------------------------------------------------


@pytest.mark.transformers
def test_optimum_without_bettertransformer_gives_the_successor_message() -> None:
    ok, message = optimum_status(_small_bert())
    assert not ok
    assert "does not ship BetterTransformer" in message
    assert "sdpa" in message and "native successor" in message
    report = fastinfer.swap_attention_(_small_bert())
    assert any("native successor" in n for n in report.notes)
    assert "optimum:bettertransformer" not in [p.name for p in report.paths]


@pytest.mark.transformers
def test_optimum_legacy_path_is_used_when_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    class FakeBT:
        @staticmethod
        def transform(model: Any, keep_original_model: bool = False) -> Any:
            calls.append(model)
            model.encoder.layer[0] = nn.Identity()  # what BetterTransformer does: swaps layers
            return model

    fake = types.ModuleType("optimum.bettertransformer")
    fake.BetterTransformer = FakeBT  # type: ignore[attr-defined]
    fake.BetterTransformerManager = types.SimpleNamespace(MODEL_MAPPING={"bert": {}})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "optimum.bettertransformer", fake)
    real_find_spec = _family_hf.importlib.util.find_spec
    monkeypatch.setattr(
        _family_hf.importlib.util,
        "find_spec",
        lambda name, *a: (
            object() if name == "optimum.bettertransformer" else real_find_spec(name, *a)
        ),
    )
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.48.0")
    model = _small_bert()
    assert optimum_status(model) == (True, "")
    layer0 = model.encoder.layer[0]
    report = fastinfer.swap_attention_(model, prefer="optimum:bettertransformer")
    assert report.chosen == "optimum:bettertransformer" and calls == [model]
    assert isinstance(model.encoder.layer[0], nn.Identity)
    fastinfer.undo_attention_swap_(model)
    assert model.encoder.layer[0] is layer0


# --------------------------------------------------------------------------------------------
# nn.TransformerEncoder / Layer / MultiheadAttention
# --------------------------------------------------------------------------------------------


def test_torch_encoder_swap_makes_fastpath_apply_and_undo_restores() -> None:
    model = testing.bert_like_classifier()
    ids, mask = testing.text_batch(8, 32, padding=0.6)
    ref = model(ids, mask).detach()  # as users usually run it: eval, grad mode on
    torch_paths = ["torch:fastpath", "torch:fastpath-nested", "torch:packed"]
    # prefer=: keep a swap even if this noisy machine times it no faster than the original
    report = fastinfer.swap_attention_(
        model, example_inputs=(ids, mask), prefer=torch_paths, repeat=2
    )
    before = dict(report.fastpath_before)
    assert "grad is enabled" in before["encoder (nested tensors)"]
    assert "grad is enabled" in before["encoder.layers.0"]
    assert report.chosen.startswith("torch:")
    assert report.verified is True
    after = dict(report.fastpath_after)
    if report.chosen.startswith("torch:fastpath"):
        assert after["encoder.layers.0"] == ""
    torch.testing.assert_close(model(ids, mask), ref, atol=1e-4, rtol=1e-3)
    assert report.compile_useful is False
    fastinfer.undo_attention_swap_(model)
    assert torch.equal(model(ids, mask), ref)
    assert all(p.requires_grad for p in model.parameters())


def test_without_padding_the_nested_path_is_not_timed() -> None:
    model = testing.bert_like_classifier()
    ids, mask = testing.text_batch(4, 16, padding=0.0)
    assert bool(mask.all())
    report = fastinfer.swap_attention_(model, example_inputs=(ids, mask), repeat=1)
    paths = {p.name: p for p in report.paths}
    nested = paths["torch:fastpath-nested"]
    assert nested.latency_seconds is None and "no padding" in nested.reason
    assert report.chosen != "torch:fastpath-nested"
    assert paths["torch:fastpath"].latency_seconds is not None
    fastinfer.undo_attention_swap_(model)
    # asked for by name, it still runs
    report = fastinfer.swap_attention_(
        model, example_inputs=(ids, mask), prefer="torch:fastpath-nested", repeat=1
    )
    assert report.chosen == "torch:fastpath-nested"


@pytest.mark.parametrize("path", ["torch:fastpath", "torch:fastpath-nested", "torch:packed"])
def test_torch_encoder_each_path(path: str) -> None:
    model = testing.bert_like_classifier(enable_nested_tensor=False)
    ids, mask = testing.text_batch(4, 16, padding=0.5)
    ref = model(ids, mask).detach()
    report = fastinfer.swap_attention_(model, prefer=path)
    assert report.chosen == path
    torch.testing.assert_close(model(ids, mask), ref, atol=1e-4, rtol=1e-3)
    fastinfer.undo_attention_swap_(model)
    assert model.encoder.use_nested_tensor is False
    assert torch.equal(model(ids, mask), ref)


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_packed_dense_weights_follow_a_new_state_dict(kind: str) -> None:
    """The packed path's reordered weights are a cache: loading new weights invalidates it."""
    if kind == "hf":
        pytest.importorskip("transformers")
        model, other = _small_bert(), _small_bert(seed=1)
        inputs = _hf_inputs(padding=0.5)
        valid = inputs["attention_mask"].bool()
        run: Any = lambda m: _hidden(m, inputs)[valid]  # noqa: E731
        path = "hf:packed"
    else:
        model = testing.bert_like_classifier(enable_nested_tensor=False)
        other = testing.bert_like_classifier(enable_nested_tensor=False, seed=1)
        ids, mask = testing.text_batch(4, 16, padding=0.5)
        run = lambda m: m(ids, mask).detach()  # noqa: E731
        path = "torch:packed"
    want = run(other)
    fastinfer.swap_attention_(model, prefer=path)
    assert not torch.allclose(run(model), want, atol=1e-3)  # the cache is warm, old weights
    if fastinfer.attention._packing.onednn_available():
        caches = [m.__dict__.get("_fastinfer_cache", {}) for m in model.modules()]
        assert any(k.endswith("qkv") for c in caches for k in c)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(run(model), want, atol=1e-4, rtol=1e-3)
    fastinfer.undo_attention_swap_(model)
    assert all("_fastinfer_cache" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_packed_weights_are_reordered_at_swap_time_not_in_the_first_call(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request does not pay the reorder, and a path's first timed call is not cold
    (a cold first call had put hf:packed behind the original on BERT-base, unpadded)."""
    if not fastinfer.attention._packing.onednn_available():
        pytest.skip("this torch has no prepacked oneDNN linear")
    if kind == "hf":
        pytest.importorskip("transformers")
        model = _small_bert()
        inputs = _hf_inputs(padding=0.5)
        run: Any = lambda: _hidden(model, inputs)  # noqa: E731
        path = "hf:packed"
    else:
        model = testing.bert_like_classifier(enable_nested_tensor=False)
        ids, mask = testing.text_batch(4, 16, padding=0.5)
        run = lambda: model(ids, mask)  # noqa: E731
        path = "torch:packed"
    fastinfer.swap_attention_(model, prefer=path)
    cached = {
        k.replace(".", "") for m in model.modules() for k in m.__dict__.get("_fastinfer_cache", {})
    }
    for layer in range(2):
        assert {f"{layer}{n}" for n in ("qkv", "out", "ffn_in", "ffn_out")} <= cached
    reorders = []
    real = fastinfer._torch_compat.mkldnn_reorder_linear_weight
    monkeypatch.setattr(
        fastinfer._torch_compat,
        "mkldnn_reorder_linear_weight",
        lambda w: reorders.append(w.shape) or real(w),
    )
    run()
    assert reorders == []


def test_packed_cache_sees_weights_replaced_twice_between_calls() -> None:
    """A replaced weight cannot land at the old one's address and pass for it."""
    model = testing.bert_like_classifier(enable_nested_tensor=False)
    other = testing.bert_like_classifier(enable_nested_tensor=False, seed=1)
    ids, mask = testing.text_batch(4, 16, padding=0.5)
    want = other(ids, mask).detach()
    fastinfer.swap_attention_(model, prefer="torch:packed")
    model(ids, mask)  # the reordered weights are cached
    theirs = dict(other.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = torch.randn_like(p)  # a first replacement, freed by the second
            p.data = theirs[name].detach().clone()
    torch.testing.assert_close(model(ids, mask), want, atol=1e-4, rtol=1e-3)


def test_a_swapped_model_can_be_copied_and_saved_after_it_ran() -> None:
    import io

    model = testing.bert_like_classifier(enable_nested_tensor=False)
    ids, mask = testing.text_batch(4, 16, padding=0.5)
    fastinfer.swap_attention_(model, prefer="torch:packed")
    out = model(ids, mask)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(ids, mask), out)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(ids, mask), out)


def test_packed_path_on_weights_made_under_inference_mode() -> None:
    with torch.inference_mode():
        model = testing.bert_like_classifier(enable_nested_tensor=False)
        ids, mask = testing.text_batch(4, 16, padding=0.5)
        ref = model(ids, mask)
        report = fastinfer.swap_attention_(model, example_inputs=(ids, mask), repeat=1)
        assert report.path("torch:packed").verified is True
        fastinfer.undo_attention_swap_(model)
        fastinfer.swap_attention_(model, prefer="torch:packed")
        torch.testing.assert_close(model(ids, mask), ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "activation", [nn.GELU(approximate="tanh"), torch.tanh], ids=["gelu-tanh", "tanh"]
)
def test_packed_path_applies_the_layers_own_activation(activation: Any) -> None:
    with testing.seeded(0):
        enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
            2,
            enable_nested_tensor=False,
        )
    for layer in enc.layers:
        layer.activation = activation  # set after construction, as some code does
    model = _Wrap(enc).eval()
    src = torch.randn(4, 10, 32)
    pad = testing.text_batch(4, 10, padding=0.5)[1] == 0
    ref = model(src, pad).detach()
    fastinfer.swap_attention_(model, prefer="torch:packed")
    valid = ~pad
    torch.testing.assert_close(model(src, pad)[valid], ref[valid], atol=1e-5, rtol=1e-4)


class _Wrap(nn.Module):
    def __init__(self, enc: nn.Module):
        super().__init__()
        self.enc = enc

    def forward(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.enc(src, src_key_padding_mask=src_key_padding_mask)


@pytest.mark.parametrize(
    "kw",
    [
        dict(batch_first=False),
        dict(norm_first=True),
        dict(nhead=3, d_model=48),
        dict(activation=F.silu),
    ],
    ids=["seq-first", "norm-first", "odd-heads", "silu"],
)
def test_torch_packed_handles_what_the_fastpath_cannot(kw: dict[str, Any]) -> None:
    opts = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    opts.update(kw)
    with testing.seeded(0):
        enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**opts), 2, enable_nested_tensor=False
        )
    model = _Wrap(enc).eval()
    _, mask = testing.text_batch(4, 10, padding=0.5)
    src = torch.randn(4, 10, opts["d_model"])
    pad = mask == 0
    if not opts["batch_first"]:
        src = src.transpose(0, 1)
    ref = model(src, pad).detach()
    report = fastinfer.swap_attention_(
        model, example_inputs=(src, pad), prefer="torch:packed", repeat=1
    )
    assert report.chosen == "torch:packed" and report.verified
    static = _diagnose._diagnose_static(_diagnose.native_modules(enc))
    assert any(why for _, why in static)  # some native fastpath is blocked, and says why
    valid = (~pad) if opts["batch_first"] else (~pad).t()
    torch.testing.assert_close(model(src, pad)[valid], ref[valid], atol=1e-4, rtol=1e-3)
    fastinfer.undo_attention_swap_(model)


def test_bare_torch_encoder_with_padding_profile() -> None:
    with testing.seeded(0):
        enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2
        ).eval()
    report = fastinfer.swap_attention_(enc, padding_profile=(4, 16, 0.5), repeat=1)
    assert "bare nn.TransformerEncoder" in report.path("torch:packed").reason
    assert report.measured
    fastinfer.undo_attention_swap_(enc)


@contextmanager
def _count(name: str) -> Iterator[list[int]]:
    real = getattr(torch, name)
    calls = [0]

    def counted(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return real(*a, **k)

    setattr(torch, name, counted)
    try:
        yield calls
    finally:
        setattr(torch, name, real)


@contextmanager
def _autocast() -> Iterator[None]:
    """What PyTorch checks: torch.is_autocast_enabled() (the CUDA flag; CPU autocast does not
    block the fastpath in torch 2.13). Forced on, since this machine may have no GPU."""
    real = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda *a: True  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.is_autocast_enabled = real  # type: ignore[assignment]


_fastpath_disabled = fastinfer._torch_compat.mha_fastpath_disabled


def _layer(**kw: Any) -> nn.TransformerEncoderLayer:
    opts = dict(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    opts.update(kw)
    with testing.seeded(0):
        layer = nn.TransformerEncoderLayer(**opts).eval()
    layer.requires_grad_(False)
    return layer


def _src(batch_first: bool = True) -> torch.Tensor:
    x = torch.randn(2, 5, 16)
    return x if batch_first else x.transpose(0, 1)


def _hooked() -> nn.TransformerEncoderLayer:
    layer = _layer()
    layer.linear1.register_forward_hook(lambda *a: None)
    return layer


def _eps() -> nn.TransformerEncoderLayer:
    layer = _layer()
    layer.norm2.eps = 1e-3
    return layer


# (id, layer factory, args factory, context, expected reason)
LAYER_CASES: list[tuple[str, Callable[[], Any], Callable[[], tuple[Any, ...]], Any, str]] = [
    ("taken", _layer, lambda: (_src(),), None, ""),
    (
        "disabled",
        _layer,
        lambda: (_src(),),
        _fastpath_disabled,
        "get_fastpath_enabled() was not True",
    ),
    ("unbatched", _layer, lambda: (torch.randn(5, 16),), None, "input not batched"),
    ("training", lambda: _layer().train(), lambda: (_src(),), None, "training is enabled"),
    (
        "seq-first",
        lambda: _layer(batch_first=False),
        lambda: (_src(False),),
        None,
        "batch_first was not True",
    ),
    ("no-bias", lambda: _layer(bias=False), lambda: (_src(),), None, "passed bias=False"),
    (
        "activation",
        lambda: _layer(activation=F.silu),
        lambda: (_src(),),
        None,
        "activation_relu_or_gelu",
    ),
    ("eps", _eps, lambda: (_src(),), None, "norm1.eps is not equal to norm2.eps"),
    ("odd-heads", lambda: _layer(nhead=1), lambda: (_src(),), None, "num_head is odd"),
    ("autocast", _layer, lambda: (_src(),), _autocast, "autocast is enabled"),
    ("hooks", _hooked, lambda: (_src(),), None, "hooks are attached"),
    ("grad", lambda: _layer().requires_grad_(True), lambda: (_src(),), None, "grad is enabled"),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_fastpath_reason_matches_what_pytorch_does(case: Any) -> None:
    _, make_layer, make_args, ctx, expected = case
    layer, args = make_layer(), make_args()
    with (ctx or _null)(), _count("_transformer_encoder_layer_fwd") as calls:
        reason = _attention_why.layer_fastpath_reason(layer, *args)
        try:
            layer(*args)
        except RuntimeError:
            pass  # CPU autocast breaks the slow path in some torch builds; only the kernel matters
    assert (expected in reason) if expected else reason == ""
    assert calls[0] == (1 if reason == "" else 0), reason


@contextmanager
def _null() -> Iterator[None]:
    yield


def _encoder(**kw: Any) -> nn.TransformerEncoder:
    nested = kw.pop("enable_nested_tensor", True)
    with testing.seeded(0), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." for init cases
        enc = nn.TransformerEncoder(_layer(**kw), 2, enable_nested_tensor=nested)
    return enc.eval().requires_grad_(False)


def _pad_mask(left: bool = False) -> torch.Tensor:
    m = torch.tensor([[False] * 5, [False, False, False, True, True]])
    return m.flip(1) if left else m


ENCODER_CASES: list[tuple[str, Callable[[], Any], Callable[[], dict[str, Any]], Any, str]] = [
    ("taken", _encoder, lambda: dict(src=_src(), src_key_padding_mask=_pad_mask()), None, ""),
    (
        "no-nested",
        lambda: _encoder(enable_nested_tensor=False),
        lambda: dict(src=_src(), src_key_padding_mask=_pad_mask()),
        None,
        "use_nested_tensor (set in init) was not True",
    ),
    (
        "init-norm-first",
        lambda: _encoder(norm_first=True),
        lambda: dict(src=_src(), src_key_padding_mask=_pad_mask()),
        None,
        "use_nested_tensor (set in init) was not True",
    ),
    (
        "training",
        lambda: _encoder().train(),
        lambda: dict(src=_src(), src_key_padding_mask=_pad_mask()),
        None,
        "was in training mode",
    ),
    ("no-mask", _encoder, lambda: dict(src=_src()), None, "src_key_padding_mask was None"),
    (
        "left-padded",
        _encoder,
        lambda: dict(src=_src(), src_key_padding_mask=_pad_mask(left=True)),
        None,
        "not left aligned",
    ),
    (
        "both-masks",
        _encoder,
        lambda: dict(
            src=_src(), mask=torch.zeros(5, 5, dtype=torch.bool), src_key_padding_mask=_pad_mask()
        ),
        None,
        "src_key_padding_mask and mask were both supplied",
    ),
    (
        "autocast",
        _encoder,
        lambda: dict(src=_src(), src_key_padding_mask=_pad_mask()),
        _autocast,
        "autocast is enabled",
    ),
    (
        "grad",
        lambda: _encoder().requires_grad_(True),
        lambda: dict(src=_src(), src_key_padding_mask=_pad_mask()),
        None,
        "grad is enabled",
    ),
    (
        "disabled",
        _encoder,
        lambda: dict(src=_src(), src_key_padding_mask=_pad_mask()),
        _fastpath_disabled,
        "get_fastpath_enabled() was not True",
    ),
]


@pytest.mark.parametrize("case", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
def test_encoder_nested_reason_matches_what_pytorch_does(case: Any) -> None:
    _, make_enc, make_kwargs, ctx, expected = case
    enc, kwargs = make_enc(), make_kwargs()
    with (ctx or _null)(), _count("_nested_tensor_from_mask") as calls:
        reason = _attention_why.encoder_nested_reason(
            enc, kwargs["src"], kwargs.get("mask"), kwargs.get("src_key_padding_mask")
        )
        try:
            enc(**kwargs)
        except RuntimeError:
            pass  # CPU autocast breaks the slow path in some torch builds; only the kernel matters
    assert (expected in reason) if expected else reason == ""
    assert calls[0] == (1 if reason == "" else 0), reason


INIT_CASES = [
    ("taken", {}, ""),
    ("norm-first", dict(norm_first=True), "norm_first was True"),
    ("seq-first", dict(batch_first=False), "batch_first was not True"),
    ("no-bias", dict(bias=False), "passed bias=False"),
    ("activation", dict(activation=F.silu), "activation_relu_or_gelu was not True"),
    ("odd-heads", dict(nhead=1), "num_heads is odd"),
]


@pytest.mark.parametrize("case", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_encoder_init_reason_matches_use_nested_tensor(case: Any) -> None:
    _, kw, expected = case
    enc = _encoder(**kw)
    reason = _attention_why.encoder_nested_init_reason(enc)
    assert (expected in reason) if expected else reason == ""
    assert enc.use_nested_tensor == (reason == "")


def _mha(**kw: Any) -> nn.MultiheadAttention:
    opts = dict(embed_dim=16, num_heads=2, batch_first=True)
    opts.update(kw)
    with testing.seeded(0):
        return nn.MultiheadAttention(**opts).eval().requires_grad_(False)


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 16)


def _self(x: torch.Tensor) -> tuple[Any, ...]:
    return (x, x, x)


MHA_CASES: list[
    tuple[str, Callable[[], Any], Callable[[], tuple[Any, ...]], dict[str, Any], Any, str]
] = [
    ("taken", _mha, lambda: _self(_x()), {}, None, ""),
    (
        "float-mask",
        _mha,
        lambda: _self(_x()),
        dict(key_padding_mask=torch.zeros(2, 5)),
        None,
        "floating-point masks",
    ),
    (
        "disabled",
        _mha,
        lambda: _self(_x()),
        {},
        _fastpath_disabled,
        "get_fastpath_enabled() was not True",
    ),
    ("unbatched", _mha, lambda: _self(torch.randn(5, 16)), {}, None, "input not batched"),
    ("cross", _mha, lambda: (_x(), _x(), _x()), {}, None, "non-self attention"),
    ("dtype", _mha, lambda: _self(_x().double()), {}, None, "don't match"),
    ("training", lambda: _mha().train(), lambda: _self(_x()), {}, None, "training is enabled"),
    (
        "odd-heads",
        lambda: _mha(num_heads=1),
        lambda: _self(_x()),
        {},
        None,
        "num_heads is not even",
    ),
    (
        "seq-first",
        lambda: _mha(batch_first=False),
        lambda: _self(_x()),
        {},
        None,
        "batch_first was not True",
    ),
    (
        "bias-kv",
        lambda: _mha(add_bias_kv=True),
        lambda: _self(_x()),
        {},
        None,
        "bias_k was not None",
    ),
    (
        "zero-attn",
        lambda: _mha(add_zero_attn=True),
        lambda: _self(_x()),
        {},
        None,
        "add_zero_attn was enabled",
    ),
    (
        "kdim",
        lambda: _mha(kdim=8, vdim=8),
        lambda: _self(_x()),
        {},
        None,
        "in_proj_weight was None",
    ),
    ("autocast", _mha, lambda: _self(_x()), {}, _autocast, "autocast is enabled"),
    ("grad", lambda: _mha().requires_grad_(True), lambda: _self(_x()), {}, None, "grad is enabled"),
]


@pytest.mark.parametrize("case", MHA_CASES, ids=[c[0] for c in MHA_CASES])
def test_mha_fastpath_reason_matches_what_pytorch_does(case: Any) -> None:
    _, make_mha, make_args, kwargs, ctx, expected = case
    mha, args = make_mha(), make_args()
    with (ctx or _null)(), _count("_native_multi_head_attention") as calls:
        reason = _attention_why.mha_fastpath_reason(mha, *args, **kwargs)
        try:
            mha(*args, **kwargs)
        except (RuntimeError, AssertionError):
            pass  # e.g. a kdim-mismatched call; only whether the kernel was called matters
    assert (expected in reason) if expected else reason == ""
    assert calls[0] == (1 if reason == "" else 0), reason


def test_standalone_mha_swap_reports_before_and_after() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    with testing.seeded(0):
        model = Block().eval()
    x = torch.randn(2, 5, 16)
    ref = model(x).detach()
    report = fastinfer.swap_attention_(
        model, example_inputs=(x,), prefer="torch:fastpath", repeat=1
    )
    assert "grad is enabled" in dict(report.fastpath_before)["attn"]
    assert dict(report.fastpath_after)["attn"] == ""
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    fastinfer.undo_attention_swap_(model)


# --------------------------------------------------------------------------------------------
# Registry, verification, measurement
# --------------------------------------------------------------------------------------------


class MyAttention(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ x.transpose(-1, -2) / 4.0, -1) @ self.proj(x)


class MyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = MyAttention()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


class SdpaAttention(nn.Module):
    def __init__(self, orig: MyAttention, *, wrong: bool = False) -> None:
        super().__init__()
        self.proj = orig.proj
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(x, x, self.proj(x), scale=0.25)
        return out * 1.1 if self.wrong else out


def _my_model() -> MyModel:
    with testing.seeded(0):
        return MyModel().eval()


def test_registered_replacement_is_verified_and_used() -> None:
    fastinfer.register_attention_swap(MyAttention, SdpaAttention)
    model, x = _my_model(), torch.randn(2, 6, 16)
    ref = model(x).detach()
    report = fastinfer.swap_attention_(model, example_inputs=(x,), prefer="registered", repeat=1)
    assert report.kind == "registered" and report.chosen == "registered" and report.verified
    assert isinstance(model.attn, SdpaAttention)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    fastinfer.undo_attention_swap_(model)
    assert type(model.attn) is MyAttention and torch.equal(model(x), ref)


def test_verification_catches_a_wrong_replacement_and_undoes_it() -> None:
    @fastinfer.register_attention_swap(MyAttention)
    def wrong(m: nn.Module) -> nn.Module:
        return SdpaAttention(m, wrong=True)  # type: ignore[arg-type]

    model, x = _my_model(), torch.randn(2, 6, 16)
    ref = model(x).detach()
    report = fastinfer.swap_attention_(model, example_inputs=(x,), prefer="registered", repeat=1)
    assert report.chosen == "original" and report.reverted and report.verified is False
    assert report.path("registered").verified is False
    assert "differs from the original" in report.path("registered").reason
    assert "swap was undone" in str(report)
    assert type(model.attn) is MyAttention and torch.equal(model(x), ref)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    fastinfer.undo_attention_swap_(model)  # a no-op after a kept original
    unregister_attention_swap(MyAttention)


class _FakeClock:
    """Advanced by the models themselves, so timing is deterministic."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("replacement_cost,expected", [(1.0, "registered"), (9.0, "original")])
def test_choice_by_measurement_keeps_the_fastest(replacement_cost: float, expected: str) -> None:
    clock = _FakeClock()

    class Slow(MyAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            clock.t += 5.0
            return super().forward(x)

    class Fast(nn.Module):
        def __init__(self, orig: MyAttention) -> None:
            super().__init__()
            self.inner = SdpaAttention(orig)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            clock.t += replacement_cost
            return self.inner(x)

    fastinfer.register_attention_swap(Slow, Fast)
    model = _my_model()
    model.attn = Slow()
    x = torch.randn(2, 6, 16)
    report = fastinfer.swap_attention_(
        model, example_inputs=(x,), repeat=3, clock=clock, budget_seconds=None
    )
    assert report.chosen == expected
    assert report.path("original").latency_seconds == 5.0
    assert report.path("registered").latency_seconds == replacement_cost
    if expected == "registered":
        assert report.speedup == pytest.approx(5.0 / replacement_cost)
        fastinfer.undo_attention_swap_(model)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_are_clear() -> None:
    model = testing.bert_like_classifier()
    with pytest.raises(AttentionSwapError, match=r"path 'hf:packed' does not exist.*torch:packed"):
        fastinfer.swap_attention_(model, prefer="hf:packed")
    with pytest.raises(AttentionSwapError, match="no attention swap to undo"):
        fastinfer.undo_attention_swap_(model)
    fastinfer.swap_attention_(model, prefer="torch:fastpath")
    with pytest.raises(AttentionSwapError, match="already swapped"):
        fastinfer.swap_attention_(model)
    fastinfer.undo_attention_swap_(model)
    with pytest.raises(ConfigError, match=r"needs an nn\.Module"):
        fastinfer.swap_attention_("model")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="only build inputs for Hugging Face"):
        fastinfer.swap_attention_(model, padding_profile=(2, 8, 0.5))
    with pytest.raises(ConfigError, match=r"nn\.Module subclass"):
        fastinfer.register_attention_swap(int, lambda m: m)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="with example_inputs failed"):
        fastinfer.swap_attention_(model, example_inputs={"wrong": torch.zeros(2, 4)})
    with pytest.raises(AttentionSwapError, match="cannot run here"):
        fastinfer.swap_attention_(_my_with_odd_encoder(), prefer="torch:fastpath-nested")
    empty = (torch.zeros(0, 8, dtype=torch.long), torch.ones(0, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"empty batch \(example_inputs\[0\] has 0 rows\)"):
        fastinfer.swap_attention_(model, example_inputs=empty)  # was a raw ValueError (NaN)


def _my_with_odd_encoder() -> nn.Module:
    return _Wrap(_encoder(nhead=1))


def test_model_without_attention_is_left_unchanged() -> None:
    model = testing.tiny_mlp()
    report = fastinfer.swap_attention_(model, example_inputs=(torch.randn(2, 32),))
    assert report.kind == "none" and report.chosen == "original" and not report.reverted


@pytest.mark.gpu
@pytest.mark.transformers
def test_gpu_fp16_hf_bert_flash_or_sdpa() -> None:
    model = _small_bert().half().cuda()
    inputs = {k: v.cuda() for k, v in _hf_inputs(batch=8, seq=64, padding=0.5).items()}
    with torch.inference_mode():
        report = fastinfer.swap_attention_(model, example_inputs=inputs, repeat=3)
    flash = report.path("hf:flash_attention_2")
    assert flash.available or "flash-attn" in flash.reason
    assert report.path("hf:sdpa").verified
    assert report.chosen != "hf:eager" or report.path("hf:eager").verified
    fastinfer.undo_attention_swap_(model)


class _EncoderHolder(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(src, src_key_padding_mask=src_key_padding_mask)  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["hf:packed", "hf:fused", "torch:packed"])
def test_under_autocast_the_original_encoder_runs(path: str) -> None:
    """The fused kernel raised a raw dtype error under CPU autocast, and the packed path ran its
    float32 weights where the caller asked for bfloat16: both now run the original encoder."""
    if path.startswith("hf:"):
        pytest.importorskip("transformers")
        entry = testing.zoo_model("bert")
        model, example = entry.build(), entry.inputs(3)

        def run(m: nn.Module) -> torch.Tensor:
            return m(**example).last_hidden_state

    else:
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        model = _EncoderHolder(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
        x, pad = torch.randn(3, 10, 32), torch.zeros(3, 10, dtype=torch.bool)
        pad[1, 6:] = True
        example = {"src": x, "src_key_padding_mask": pad}

        def run(m: nn.Module) -> torch.Tensor:
            return m(**example)

    swapped = copy.deepcopy(model)
    report = fastinfer.swap_attention_(swapped, example_inputs=example, prefer=path)
    assert report.chosen == path
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = run(model), run(swapped)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_model_holding_inference_tensors_gets_the_inference_mode_fix() -> None:
    """BEiT caches its relative position bias on the first call; made under inference_mode, it
    breaks a later grad-mode call, and the error blamed the example inputs."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BeitConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        use_relative_position_bias=True,
    )
    torch.manual_seed(0)
    model = transformers.BeitModel(cfg).eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.inference_mode():
        model(**x)
    with pytest.raises(ConfigError, match=r"under torch.inference_mode\(\) or torch.no_grad\(\)"):
        fastinfer.swap_attention_(model, example_inputs=x, repeat=1)
    with torch.inference_mode():  # the fix the message gives works
        fastinfer.swap_attention_(model, example_inputs=x, repeat=1)


def test_only_a_padding_mask_is_taken_for_padding() -> None:
    """A 4-D float mask of 1s and 0s (an HF additive mask used wrongly) or any other bias changes
    the scores of valid keys: the fast paths must run the original, not drop keys as padding."""
    from fastinfer.attention._kernels_hf import valid_from_hf_mask

    keys = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for masked in (torch.finfo(torch.float32).min, float("-inf"), -10000.0):
        additive = torch.zeros(2, 1, 1, 6).masked_fill(~keys[:, None, None, :], masked)
        assert torch.equal(valid_from_hf_mask(additive, 2, 6), keys)
    assert valid_from_hf_mask(keys[:, None, None, :].float(), 2, 6) is None  # 1/0, not additive
    assert valid_from_hf_mask(torch.full((2, 1, 1, 6), -0.5), 2, 6) is None  # a bias

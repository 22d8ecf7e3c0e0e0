"""A swapped model under what users do to models after the swap.

Each case is something an outside probe did to a swapped BERT that the replacement encoders got
wrong: hooks that never ran, modules replaced or quantized but ignored, gradients silently
missing, weights reloaded into inference tensors but not seen, tracing and exporting that failed
inside PyTorch, and copies that forgot they were swapped. The contract in every case: the swapped
model computes what the unswapped model, changed the same way, computes (the fast path where it
still applies, the original modules where it does not), and a copy is swapped like its original.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import testing
from fastinfer.errors import AttentionSwapError

pytestmark = [pytest.mark.transformers, pytest.mark.timeout(240)]

PATHS = ["hf:packed", "hf:fused"]


def _bert(seed: int = 0) -> Any:
    return testing.hf_bert(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, seed=seed
    )


def _inputs() -> dict[str, torch.Tensor]:
    ids, mask = testing.text_batch(4, 16, padding=0.5, seed=0)
    return {"input_ids": ids, "attention_mask": mask}


def _pair(path: str) -> tuple[Any, Any]:
    """(reference, swapped): the same weights, the second swapped to ``path``."""
    ref = _bert()
    model = copy.deepcopy(ref)
    report = fastinfer.swap_attention_(model, prefer=path)
    assert report.chosen == path
    return ref, model


def _out(model: Any, inputs: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).last_hidden_state  # type: ignore[no-any-return]


def _close(a: torch.Tensor, b: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(a[valid], b[valid], atol=1e-4, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# hooks registered after the swap
# --------------------------------------------------------------------------------------------


def _count_hook(calls: list[int]) -> Callable[..., None]:
    return lambda *a: calls.append(1)


def _scale_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * 2.0, *args[1:])


@pytest.mark.parametrize("path", PATHS)
def test_hooks_registered_after_the_swap_run(path: str) -> None:
    """A forward hook on a layer (feature extraction) and a pre-hook changing a Linear's input
    were never called: the replacement encoder bypassed the layer modules."""
    ref, model = _pair(path)
    inputs = _inputs()
    fast_before, plain = _out(model, inputs), _out(ref, inputs)
    enc = model.encoder
    seen = {"ref": [], "swapped": []}  # type: dict[str, list[int]]
    handles = [
        ref.encoder.layer[0].register_forward_hook(_count_hook(seen["ref"])),
        model.encoder.layer[0].register_forward_hook(_count_hook(seen["swapped"])),
        ref.encoder.layer[1].attention.self.query.register_forward_pre_hook(_scale_pre_hook),
        model.encoder.layer[1].attention.self.query.register_forward_pre_hook(_scale_pre_hook),
    ]
    want, got = _out(ref, inputs), _out(model, inputs)
    assert len(seen["swapped"]) == len(seen["ref"]) == 1
    assert "'layer.0'" in enc.fallback_reason
    _close(got, want, inputs)
    assert not torch.allclose(want, plain)  # the pre-hook changes the output
    for h in handles:
        h.remove()
    fallbacks = enc.fallbacks
    _close(_out(model, inputs), fast_before, inputs)  # hooks gone: the fast path again
    assert enc.fallbacks == fallbacks


def test_a_forward_wrapped_on_a_layer_instance_runs() -> None:
    """accelerate's hooks replace ``forward`` on the module instance: no hook PyTorch counts."""
    ref = _bert()
    model = copy.deepcopy(ref)
    calls: list[int] = []
    layer = model.encoder.layer[1]
    inner = layer.forward
    layer.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)  # before the swap
    fastinfer.swap_attention_(model, prefer="hf:packed")
    inputs = _inputs()
    _close(_out(model, inputs), _out(ref, inputs), inputs)
    assert calls == [1]
    assert "forward-wrapper" in model.encoder.fallback_reason


def test_transformers_capture_hooks_do_not_turn_the_fast_path_off() -> None:
    """transformers installs its output-capture hooks on the layers for good the first time
    output_hidden_states is used: they are not user hooks, the fast path stays on."""
    _, model = _pair("hf:packed")
    inputs = _inputs()
    assert len(model(**inputs, output_hidden_states=True).hidden_states) == 3
    fallbacks = model.encoder.fallbacks
    _out(model, inputs)
    assert model.encoder.fallbacks == fallbacks


@pytest.mark.parametrize("path", PATHS)
def test_an_eager_model_keeps_its_attention_maps_after_the_swap(path: str) -> None:
    """A model set to eager attention to read its attention maps: the swap used to switch the
    whole model to sdpa, so output_attentions=True (which runs the original layers) gave ()."""
    ref = _bert()
    ref.set_attn_implementation("eager")
    model = copy.deepcopy(ref)
    inputs = _inputs()
    report = fastinfer.swap_attention_(model, example_inputs=inputs, prefer=path, repeat=1)
    assert report.chosen == path and model.config._attn_implementation == "eager"
    with torch.no_grad():
        want = ref(**inputs, output_attentions=True).attentions
        got = model(**inputs, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)
    fallbacks = model.encoder.fallbacks
    _close(_out(model, inputs), _out(ref, inputs), inputs)  # eager's additive masks: fast path
    assert model.encoder.fallbacks == fallbacks


def test_a_model_left_in_training_mode_is_judged_as_it_will_run(tmp_path: Any) -> None:
    """Built from a config (training mode, dropout 0.1 as in every checkpoint's config) and not
    put in eval(): the original was called with dropout on while every candidate ran in eval, so
    each path "differed" and the original was chosen, and cached for the eval model too."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config)
    assert model.training
    inputs = _inputs()
    kw: dict[str, Any] = {"example_inputs": inputs, "cache_dir": tmp_path, "repeat": 1}
    report = fastinfer.swap_attention_(model, prefer=PATHS, **kw)
    assert report.chosen in PATHS and all(report.path(p).verified for p in PATHS), str(report)
    assert not model.training  # a swapped model is prepared for inference, as before
    fastinfer.undo_attention_swap_(model)
    assert model.training
    again = fastinfer.swap_attention_(copy.deepcopy(model).eval(), prefer=PATHS, **kw)
    assert again.from_cache and again.chosen == report.chosen


def test_hooks_on_torch_packed_layers_run() -> None:
    model = testing.bert_like_classifier(enable_nested_tensor=False)
    ids, mask = testing.text_batch(4, 16, padding=0.5)
    fastinfer.swap_attention_(model, prefer="torch:packed")
    calls: list[int] = []
    layer = next(m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer))
    handle = layer.register_forward_hook(_count_hook(calls))
    with torch.no_grad():
        model(ids, mask)
    assert calls == [1]
    handle.remove()


# --------------------------------------------------------------------------------------------
# modules replaced or quantized after the swap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_linear_replaced_after_the_swap_is_run(path: str) -> None:
    """The fast path kept the Linear it captured at swap time."""
    ref, model = _pair(path)
    inputs = _inputs()
    _out(model, inputs)
    new = nn.Linear(32, 32).requires_grad_(False)
    with torch.no_grad():
        new.weight.mul_(10)
    ref.encoder.layer[0].attention.self.query = copy.deepcopy(new)
    model.encoder.layer[0].attention.self.query = copy.deepcopy(new)
    fallbacks = model.encoder.fallbacks
    _close(_out(model, inputs), _out(ref, inputs), inputs)
    assert model.encoder.fallbacks == fallbacks  # still a plain Linear: the fast path, rebuilt


@pytest.mark.parametrize("path", PATHS)
def test_quantize_dynamic_after_the_swap_is_run(path: str) -> None:
    ref, model = _pair(path)
    inputs = _inputs()
    _out(model, inputs)
    qref = torch.ao.quantization.quantize_dynamic(ref, {nn.Linear}, dtype=torch.qint8)
    qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    want = _out(qref, inputs)
    assert not torch.allclose(want, _out(ref, inputs), atol=1e-4)  # quantizing changes outputs
    _close(_out(qmodel, inputs), want, inputs)
    assert "plain nn.Linear" in qmodel.encoder.fallback_reason


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_gradients_through_the_encoder_weights_with_frozen_embeddings(path: str) -> None:
    """Eval mode, encoder weights trainable, embeddings frozen (so the encoder's input does not
    require grad): packed gave grad=None silently, fused raised a raw RuntimeError."""
    ref, model = _pair(path)
    inputs = _inputs()
    for m in (ref, model):
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("encoder."))
        m(**inputs).last_hidden_state.sum().backward()
    grads = dict(ref.named_parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 32
    for name, p in trained:
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# weights reloaded in place into inference tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*PATHS, "torch:packed"])
def test_weights_reloaded_into_inference_tensors_are_seen(path: str) -> None:
    """A worker that builds and reloads its model under inference_mode: the parameters are
    inference tensors, with no version counter to key the cached QKV/reordered weights on."""
    with torch.inference_mode():
        if path == "torch:packed":
            model = testing.bert_like_classifier(enable_nested_tensor=False)
            new = testing.bert_like_classifier(enable_nested_tensor=False, seed=1)
            ids, mask = testing.text_batch(4, 16, padding=0.5)
            run: Callable[[Any], torch.Tensor] = lambda m: m(ids, mask)  # noqa: E731
            valid = torch.ones(4, dtype=torch.bool)
        else:
            model, new = _bert(), _bert(seed=1)
            inputs = _inputs()
            run = lambda m: m(**inputs).last_hidden_state  # noqa: E731
            valid = inputs["attention_mask"].bool()
        assert next(model.parameters()).is_inference()
        fastinfer.swap_attention_(model, prefer=path)
        before = run(model)  # the caches are warm
        model.load_state_dict(new.state_dict())  # in place, into the same inference tensors
        want = run(new)
        assert not torch.allclose(before[valid], want[valid], atol=1e-3)
        torch.testing.assert_close(run(model)[valid], want[valid], atol=1e-4, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# torch.jit.trace and torch.export
# --------------------------------------------------------------------------------------------


class _Hidden(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", PATHS)
def test_jit_trace_and_export_of_a_swapped_model_give_the_original_graph(path: str) -> None:
    ref, model = _pair(path)
    inputs = _inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    want = _out(ref, inputs)
    fallbacks = model.encoder.fallbacks
    with torch.no_grad():
        traced = torch.jit.trace(_Hidden(model), (ids, mask), check_trace=False, strict=False)
        _close(traced(ids, mask), want, inputs)
        exported = torch.export.export(_Hidden(model), (ids, mask))
        _close(exported.module()(ids, mask), want, inputs)
    assert model.encoder.fallbacks == fallbacks  # no side effects while tracing
    _close(_out(model, inputs), want, inputs)  # and the fast path as before


# --------------------------------------------------------------------------------------------
# copies of a swapped model
# --------------------------------------------------------------------------------------------


def _torch_save_copy(model: nn.Module) -> Any:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save_copy,
}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("path", ["hf:packed", "hf:fused", "hf:eager"])
def test_a_copy_of_a_swapped_model_can_be_undone_and_refuses_a_second_swap(
    path: str, how: str
) -> None:
    ref, model = _pair(path)
    inputs = _inputs()
    twin = COPIES[how](model)
    with pytest.raises(AttentionSwapError, match="already swapped"):
        fastinfer.swap_attention_(twin, prefer="hf:packed")
    assert type(twin.encoder).__name__ == type(model.encoder).__name__
    report = fastinfer.undo_attention_swap_(twin)
    assert report.chosen == path
    assert type(twin.encoder).__name__ == "BertEncoder"
    assert twin.config._attn_implementation == ref.config._attn_implementation
    assert torch.equal(_out(twin, inputs), _out(ref, inputs))
    assert "_fastinfer_attention" not in twin.__dict__
    # the original is untouched by the copy's undo, and undoes on its own
    assert type(model.encoder).__name__ != "BertEncoder" or path == "hf:eager"
    fastinfer.undo_attention_swap_(model)
    assert torch.equal(_out(model, inputs), _out(ref, inputs))
    fastinfer.swap_attention_(twin, prefer="hf:packed")  # undone: it can be swapped again


def test_a_model_around_a_swapped_model_refuses_to_be_swapped() -> None:
    """Swapping the parent of a swapped model would wrap the replacement encoder again."""
    model = testing.SentenceEncoder(_bert())
    fastinfer.swap_attention_(model[0].auto_model, prefer="hf:packed")
    with pytest.raises(AttentionSwapError, match=r"submodule '0.auto_model' is already swapped"):
        fastinfer.swap_attention_(model, prefer="hf:packed")

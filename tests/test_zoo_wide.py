"""A wider zoo: Hugging Face architectures outside ``fastinfer.testing.ZOO``, tiny and random.

An outside probe of 95 architectures found what the 18-model zoo never exercised: bf16 models whose
non-persistent buffers loaded in float32 (xglm, m2m_100, openai-gpt crashed), a Marian folder its
own loader refused, select_backend rejecting every swapped model on padded inputs, the fused path
under autocast. This file keeps one representative of each family it covered, with the two checks
every user runs first:

- ``swap_attention_`` (under ``inference_mode``, as served) answers like the original on the
  valid positions of a right-padded batch;
- ``load_pretrained`` of a bf16 ``save_pretrained`` folder gives every tensor the dtype and value
  ``from_pretrained`` gives it, and the model runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import fastinfer

transformers = pytest.importorskip("transformers")

V = 1000
_DROP = {
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "activation_dropout": 0.0,
}
_TOK = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
TEXT = {
    "vocab_size": V,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    **_TOK,
    **_DROP,
}
DEC = {**TEXT, "num_key_value_heads": 1}
S2S = {
    "vocab_size": V,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 128,
    "decoder_start_token_id": 2,
    **_TOK,
    **_DROP,
}
VIS = {
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    **_DROP,
}

# name: (model_type, class, kind, config)
WIDE: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    # text encoders
    "albert": ("albert", "AlbertForMaskedLM", "text", {**TEXT, "embedding_size": 16}),
    "electra": ("electra", "ElectraForMaskedLM", "text", {**TEXT, "embedding_size": 16}),
    "camembert": ("camembert", "CamembertForMaskedLM", "text", TEXT),
    "mpnet": ("mpnet", "MPNetForMaskedLM", "text", TEXT),
    "deberta": ("deberta", "DebertaForMaskedLM", "text", TEXT),
    "roformer": ("roformer", "RoFormerForMaskedLM", "text", {**TEXT, "embedding_size": 32}),
    "megatron-bert": ("megatron-bert", "MegatronBertForMaskedLM", "text", TEXT),
    "data2vec-text": ("data2vec-text", "Data2VecTextForMaskedLM", "text", TEXT),
    # decoder-only
    "mistral": ("mistral", "MistralForCausalLM", "dec", {**DEC, "sliding_window": None}),
    "phi3": ("phi3", "Phi3ForCausalLM", "dec", DEC),
    "gemma2": (
        "gemma2",
        "Gemma2ForCausalLM",
        "dec",
        {**DEC, "head_dim": 16, "sliding_window": 8},
    ),
    "falcon": (
        "falcon",
        "FalconForCausalLM",
        "dec",
        {**DEC, "new_decoder_architecture": True, "num_kv_heads": 1},
    ),
    "bloom": ("bloom", "BloomForCausalLM", "dec", {**DEC, "n_head": 2, "n_layer": 1}),
    "opt": ("opt", "OPTForCausalLM", "dec", {**DEC, "ffn_dim": 64, "word_embed_proj_dim": 32}),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", "dec", DEC),
    "gptj": (
        "gptj",
        "GPTJForCausalLM",
        "dec",
        {**DEC, "n_embd": 32, "n_layer": 1, "n_head": 2, "rotary_dim": 8, "n_positions": 128},
    ),
    "xglm": (
        "xglm",
        "XGLMForCausalLM",
        "dec",
        {**DEC, "d_model": 32, "num_layers": 1, "ffn_dim": 64},
    ),
    "openai-gpt": (
        "openai-gpt",
        "OpenAIGPTLMHeadModel",
        "dec",
        {**DEC, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 128},
    ),
    # encoder-decoders
    "bart": ("bart", "BartForConditionalGeneration", "s2s", S2S),
    "marian": ("marian", "MarianMTModel", "s2s", {**S2S, "decoder_vocab_size": V}),
    "m2m_100": ("m2m_100", "M2M100ForConditionalGeneration", "s2s", S2S),
    # vision
    "deit": ("deit", "DeiTModel", "vis", VIS),
    "beit": ("beit", "BeitModel", "vis", {**VIS, "use_relative_position_bias": True}),
    "dinov2": ("dinov2", "Dinov2Model", "vis", VIS),
}


def build(name: str) -> torch.nn.Module:
    model_type, cls_name, _, kw = WIDE[name]
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg).eval()  # type: ignore[no-any-return]


def inputs(kind: str, lengths: tuple[int, ...] = (12, 8)) -> dict[str, torch.Tensor]:
    """A right-padded batch with its attention mask (or images)."""
    g = torch.Generator().manual_seed(1)
    if kind == "vis":
        return {"pixel_values": torch.randn(len(lengths), 3, 32, 32, generator=g)}
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, V, (n,), generator=g)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "s2s":
        batch["decoder_input_ids"] = torch.randint(3, V, (len(lengths), 5), generator=g)
    return batch


def main_output(out: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(type(out).__name__)


@pytest.mark.parametrize("name", sorted(WIDE))
def test_swap_answers_like_the_original_on_valid_positions(name: str) -> None:
    kind = WIDE[name][2]
    model = build(name)
    batch = inputs(kind)
    swapped = copy.deepcopy(model)
    with torch.inference_mode():
        report = fastinfer.swap_attention_(swapped, example_inputs=batch, repeat=1)
        want, got = main_output(model(**batch)), main_output(swapped(**batch))
        one = {k: v[1:] for k, v in batch.items()}  # a batch of one, as a lone request
        want1, got1 = main_output(model(**one)), main_output(swapped(**one))
    if kind in ("text", "dec") and want.shape[:2] == batch["attention_mask"].shape:
        valid = batch["attention_mask"].bool()
        want, got = want[valid], got[valid]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=f"{name}: {report.chosen}")
    if kind in ("text", "dec") and want1.shape[:2] == one["attention_mask"].shape:
        valid1 = one["attention_mask"].bool()
        want1, got1 = want1[valid1], got1[valid1]
    torch.testing.assert_close(got1, want1, rtol=1e-3, atol=1e-4, msg=f"{name}: {report.chosen}")


@pytest.mark.parametrize("name", sorted(WIDE))
def test_load_pretrained_bf16_matches_from_pretrained(name: str, tmp_path: Path) -> None:
    model = build(name).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    hf = type(model).from_pretrained(tmp_path).eval()
    ours = fastinfer.load_pretrained(tmp_path)
    want = dict(hf.state_dict(keep_vars=True))
    want.update(dict(hf.named_buffers()))
    got = dict(ours.state_dict(keep_vars=True))
    got.update(dict(ours.named_buffers()))
    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        assert got[key].dtype == ref.dtype, f"{name}: {key} {got[key].dtype} vs {ref.dtype}"
        assert torch.equal(got[key].detach(), ref.detach()), f"{name}: {key} differs"
    batch = inputs(WIDE[name][2])
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        try:
            want_out = main_output(hf(**batch))
        except RuntimeError:  # transformers' own bf16 model cannot run on CPU (DeBERTa)
            return
        torch.testing.assert_close(main_output(ours(**batch)), want_out, rtol=0, atol=0)

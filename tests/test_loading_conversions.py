"""load_model / load_pretrained on the checkpoints people actually have (issue 18).

- construction on meta never runs an initialiser through torch's Python reference kernels (an
  ``nn.Embedding`` with ``padding_idx`` used to import torch._dynamo and sympy);
- checkpoints in the saved (legacy) key format load as ``from_pretrained`` loads them:
  transformers' own renames, fusions and parametrization conversions are applied;
- the encoder of an encoder-decoder loads from the whole model's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_python
from torch import nn

import fastinfer
from fastinfer import testing


def test_embedding_init_on_meta_imports_no_reference_kernels() -> None:
    code = """
import sys, tempfile, torch, fastinfer
from torch import nn

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16, padding_idx=0)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.embed(ids))

path = tempfile.mkdtemp() + "/t.safetensors"
eager = Tagger().eval()
fastinfer.save_weights(eager, path)
heavy = ("torch._dynamo", "sympy", "torch._refs", "torch._meta_registrations")
before = set(sys.modules)
model = fastinfer.load_model(Tagger, path)
added = set(sys.modules) - before
ids = torch.tensor([[0, 3, 7]])
assert torch.equal(model(ids), eager(ids))
print(sorted(h for h in heavy if h in added), len(added))
"""
    heavy, count = run_python(code).stdout.strip().rsplit(" ", 1)
    assert heavy == "[]" and int(count) < 15, (heavy, count)


# --------------------------------------------------------------------------------------------
# Hugging Face folders in the saved format
# --------------------------------------------------------------------------------------------


def _transformers() -> Any:
    return pytest.importorskip("transformers")


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different


@pytest.mark.transformers
@pytest.mark.parametrize("arch", ["vit", "mixtral"])
def test_folders_whose_keys_transformers_converts_load_bit_for_bit(
    arch: str, tmp_path: Path
) -> None:
    entry = testing.zoo_model(arch)
    eager = entry.build()
    eager.save_pretrained(tmp_path)  # the saved (hub) key format: not the module names
    reports: list[fastinfer.LoadReport] = []
    model = fastinfer.load_pretrained(tmp_path, on_report=reports.append)
    _same_state(model, eager)
    inputs = entry.inputs(2)
    with torch.inference_mode():
        torch.testing.assert_close(
            entry.call(model, inputs), entry.call(eager, inputs), rtol=0, atol=0
        )
    assert any("transformers' checkpoint conversion" in n for n in reports[0].notes)


@pytest.mark.transformers
def test_only_the_weights_a_conversion_changes_are_copied(tmp_path: Path) -> None:
    entry = testing.zoo_model("mixtral")
    eager = entry.build()
    eager.save_pretrained(tmp_path)
    reports: list[fastinfer.LoadReport] = []
    model = fastinfer.load_pretrained(tmp_path, on_report=reports.append)
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    fused = sum(p.numel() * p.element_size() for p in experts)
    assert fused and reports[0].bytes_copied == fused  # the stacked experts, nothing else
    assert reports[0].bytes_mapped > 0


def _rewrite(folder: Path, rename: Callable[[str], str]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    save_file(
        {rename(k): v for k, v in state.items()}, folder / "model.safetensors", {"format": "pt"}
    )


@pytest.mark.transformers
def test_legacy_layernorm_names_load_like_from_pretrained(tmp_path: Path) -> None:
    transformers = _transformers()
    eager = testing.zoo_model("bert").build()
    eager.save_pretrained(tmp_path)
    # BERT checkpoints written by TF-era tools name LayerNorm parameters gamma/beta.
    _rewrite(
        tmp_path,
        lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ),
    )
    reference = transformers.BertModel.from_pretrained(tmp_path).eval()
    model = fastinfer.load_pretrained(tmp_path)
    _same_state(model, reference)
    _same_state(model, eager)


@pytest.mark.transformers
def test_weight_norm_names_load_as_parametrizations(tmp_path: Path) -> None:
    transformers = _transformers()
    config = transformers.Wav2Vec2Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    with testing.seeded(0):
        eager = transformers.Wav2Vec2Model(config).eval()
    eager.save_pretrained(tmp_path)
    # Checkpoints written before torch's parametrizations (most of the hub's wav2vec2/HuBERT).
    _rewrite(
        tmp_path,
        lambda k: k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ),
    )
    reference = transformers.Wav2Vec2Model.from_pretrained(tmp_path).eval()
    model = fastinfer.load_pretrained(tmp_path)
    _same_state(model, reference)
    _same_state(model, eager)
    x = torch.randn(1, 400)
    with torch.inference_mode():
        assert torch.equal(model(x).last_hidden_state, eager(x).last_hidden_state)


@pytest.mark.transformers
def test_the_encoder_of_an_encoder_decoder_loads_from_the_whole_folder(tmp_path: Path) -> None:
    transformers = _transformers()
    whisper = testing.zoo_model("whisper")
    full = whisper.build_full()
    full.save_pretrained(tmp_path / "whisper")
    reports: list[fastinfer.LoadReport] = []
    encoder_cls = type(full.encoder)
    encoder = fastinfer.load_pretrained(
        tmp_path / "whisper", model_class=encoder_cls, on_report=reports.append
    )
    assert type(encoder) is encoder_cls
    _same_state(encoder, full.encoder)  # transformers leaves these randomly initialised
    assert any("'encoder.' part" in n for n in reports[0].notes)

    t5 = testing.zoo_model("t5").build_full()
    t5.save_pretrained(tmp_path / "t5")
    t5_encoder = fastinfer.load_pretrained(tmp_path / "t5", model_class=transformers.T5EncoderModel)
    expected = {k: v for k, v in t5.state_dict().items() if not k.startswith("decoder.")}
    got = t5_encoder.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in got)


# --------------------------------------------------------------------------------------------
# Weights the model class computes instead of saving; parts whose weights the saved model ties
# --------------------------------------------------------------------------------------------

_S2S = {
    "vocab_size": 100,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "decoder_start_token_id": 2,
}


def _marian(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    transformers = _transformers()
    with testing.seeded(0):
        model = transformers.MarianMTModel(transformers.MarianConfig(**_S2S)).eval().to(dtype)
    model.save_pretrained(folder)  # without the sinusoidal embed_positions (not saved)
    return model


@pytest.mark.transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not-strict"])
def test_weights_the_class_computes_instead_of_saving_are_computed(
    strict: bool, dtype: torch.dtype, tmp_path: Path
) -> None:
    transformers = _transformers()
    eager = _marian(tmp_path, dtype)
    reference = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    reports: list[fastinfer.LoadReport] = []
    model = fastinfer.load_pretrained(tmp_path, strict=strict, on_report=reports.append)
    _same_state(model, reference)
    _same_state(model, eager)
    assert model.model.encoder.embed_positions.weight.dtype == dtype
    assert reports[0].missing_keys == ()
    assert any("computed by MarianMTModel._init_weights" in n for n in reports[0].notes)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        assert torch.equal(got, eager(input_ids=ids, decoder_input_ids=ids[:, :3]).logits)


@pytest.mark.transformers
def test_a_declared_missing_weight_initialised_at_random_is_still_reported(
    tmp_path: Path,
) -> None:
    transformers = _transformers()

    class Lenient(transformers.MarianMTModel):  # type: ignore[misc]
        # from_pretrained would initialise it at random without a word: fastinfer never does
        _keys_to_ignore_on_load_missing = (
            *transformers.MarianMTModel._keys_to_ignore_on_load_missing,
            r"encoder\.layers\.0\.fc1\.weight",
        )

    from safetensors.torch import load_file, save_file

    _marian(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.encoder.layers.0.fc1.weight"]
    save_file(state, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(fastinfer.StateDictMismatch, match=r"missing from the checkpoint \(1\)"):
        fastinfer.load_pretrained(tmp_path, model_class=Lenient)
    with pytest.raises(
        fastinfer.StateDictMismatch,
        match=r"'model\.encoder\.layers\.0\.fc1\.weight' \(not in the checkpoint\)",
    ):
        fastinfer.load_pretrained(tmp_path, model_class=Lenient, strict=False)


# family -> (model class, config class, its parts); T5's decoder stack is built as an encoder
# from the folder's config, so only its encoder is a part that class can load.
_PARTS = {
    "bart": ("BartForConditionalGeneration", "BartConfig", ["model.encoder", "model.decoder"]),
    "mbart": ("MBartForConditionalGeneration", "MBartConfig", ["model.encoder", "model.decoder"]),
    "marian": ("MarianMTModel", "MarianConfig", ["model.encoder", "model.decoder"]),
    "t5": ("T5ForConditionalGeneration", "T5Config", ["encoder"]),
}


def _s2s(name: str) -> nn.Module:
    transformers = _transformers()
    model_name, config_name, _ = _PARTS[name]
    if name == "t5":
        config = transformers.T5Config(
            vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2
        )
    else:
        config = getattr(transformers, config_name)(**_S2S)
    with testing.seeded(0):
        return getattr(transformers, model_name)(config).eval()


@pytest.mark.transformers
@pytest.mark.parametrize("name", list(_PARTS))
def test_a_part_whose_embeddings_the_saved_model_ties_loads_from_that_part(
    name: str, tmp_path: Path
) -> None:
    whole, parts = _s2s(name), _PARTS[name][2]
    whole.save_pretrained(tmp_path)  # encoder.embed_tokens is saved once, as shared.weight
    for path in parts:
        part = whole.get_submodule(path)
        reports: list[fastinfer.LoadReport] = []
        loaded = fastinfer.load_pretrained(
            tmp_path, model_class=type(part), on_report=reports.append
        )
        _same_state(loaded, part)
        assert any(f"'{path}.' part" in n for n in reports[0].notes), reports[0].notes
        assert any("embed_tokens.weight from" in n for n in reports[0].notes), reports[0].notes
    encoder = whole.get_submodule(parts[0])
    loaded = fastinfer.load_pretrained(tmp_path, model_class=type(encoder))
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # use_cache=False: T5's stack refuses it as an encoder
        expected = encoder(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.equal(loaded(input_ids=ids, use_cache=False).last_hidden_state, expected)


# --------------------------------------------------------------------------------------------
# Checkpoint keys from_pretrained leaves out: legacy buffers, a head's keys for a base model
# --------------------------------------------------------------------------------------------


@pytest.mark.transformers
def test_legacy_gpt2_attention_buffers_are_left_out_like_from_pretrained(tmp_path: Path) -> None:
    """A GPT-2 ``pytorch_model.bin`` from older transformers holds ``attn.masked_bias`` (and
    ``attn.bias``) per layer: from_pretrained loads it, load_pretrained raised
    StateDictMismatch."""
    transformers = _transformers()
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    with testing.seeded(0):
        gpt2 = transformers.GPT2LMHeadModel(config).eval()
    gpt2.config.architectures = ["GPT2LMHeadModel"]
    gpt2.config.save_pretrained(tmp_path)
    state = dict(gpt2.state_dict())
    state.pop("lm_head.weight")  # tied to transformer.wte.weight: saved once
    for i in range(2):
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
    torch.save(state, tmp_path / "pytorch_model.bin")
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    reports: list[fastinfer.LoadReport] = []
    model = fastinfer.load_pretrained(tmp_path, on_report=reports.append)
    _same_state(model, reference)
    _same_state(model, gpt2)
    notes = "\n".join(reports[0].notes)
    assert "legacy buffers" in notes and "transformer.h.0.attn.masked_bias" in notes, notes
    assert "declares unused" in notes and "transformer.h.0.attn.bias" in notes, notes
    # Neither declared nor a legacy buffer of a module the model has: still refused.
    for extra, value in (
        ("transformer.h.0.attn.extra", torch.zeros(3)),
        ("transformer.h.7.attn.masked_bias", torch.tensor(-1e4)),  # no layer 7
    ):
        torch.save({**state, extra: value}, tmp_path / "pytorch_model.bin")
        with pytest.raises(fastinfer.StateDictMismatch, match=r"unexpected in the checkpoint \(1"):
            fastinfer.load_pretrained(tmp_path)


@pytest.mark.transformers
def test_a_base_model_loads_from_the_folder_of_a_model_with_a_head(tmp_path: Path) -> None:
    """``BertModel`` from a ``BertForSequenceClassification`` folder (``bert.`` prefix plus
    ``classifier.*``): from_pretrained loads it, load_pretrained raised StateDictMismatch."""
    transformers = _transformers()
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    with testing.seeded(0):
        classifier = transformers.BertForSequenceClassification(config).eval()
    classifier.save_pretrained(tmp_path / "cls")
    reference = transformers.BertModel.from_pretrained(tmp_path / "cls").eval()
    reports: list[fastinfer.LoadReport] = []
    model = fastinfer.load_pretrained(
        tmp_path / "cls", model_class=transformers.BertModel, on_report=reports.append
    )
    _same_state(model, reference)
    _same_state(model, classifier.bert)
    assert any("'bert.' part" in n and "classifier.weight" in n for n in reports[0].notes)
    # The other way round the head's weights are genuinely missing: still an error.
    classifier.bert.save_pretrained(tmp_path / "base")
    with pytest.raises(fastinfer.StateDictMismatch, match=r"missing.*\n.*classifier"):
        fastinfer.load_pretrained(
            tmp_path / "base", model_class=transformers.BertForSequenceClassification
        )

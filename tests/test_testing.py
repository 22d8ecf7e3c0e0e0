"""fastinfer.testing: the shared local models, inputs and checkpoint writers."""

import json
from pathlib import Path

import pytest
import torch

from fastinfer import ConfigError, testing


def test_tiny_mlp_is_deterministic_and_eval() -> None:
    a, b = testing.tiny_mlp(seed=1), testing.tiny_mlp(seed=1)
    x = torch.randn(3, 32)
    assert not a.training
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.equal(testing.tiny_mlp(seed=2)(x), a(x))


def test_seeded_restores_rng_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with testing.seeded(7):
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("padding", [0.0, 0.33, 0.7], ids=["pad0", "pad33", "pad70"])
def test_text_batch_padding_fraction(padding: float) -> None:
    ids, mask = testing.text_batch(batch_size=64, seq_len=128, padding=padding)
    assert ids.shape == mask.shape == (64, 128)
    assert mask[0].all()  # the longest row is full length
    assert abs((1 - mask.float().mean().item()) - padding) < 0.08
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] > 0).all()


def test_text_batch_rejects_bad_padding() -> None:
    with pytest.raises(ConfigError, match="padding"):
        testing.text_batch(padding=1.0)


def test_bert_like_classifier_masks_padding() -> None:
    model = testing.bert_like_classifier()
    ids, mask = testing.text_batch(batch_size=4, seq_len=16, padding=0.5)
    with torch.inference_mode():
        out = model(ids, mask)
        # Changing the tokens under padding must not change the result.
        noisy = ids.clone()
        noisy[mask == 0] = 7
        torch.testing.assert_close(model(noisy, mask), out)
    assert out.shape == (4, 2)


def test_rotary_mlp_has_a_non_persistent_buffer() -> None:
    model = testing.RotaryMLP(width=16, layers=2)
    assert "inv_freq" not in model.state_dict()
    assert model(torch.randn(2, 16)).shape == (2, 16)


def test_hash_tokenizer_pads_and_is_stable() -> None:
    tok = testing.HashTokenizer(vocab_size=100)
    batch = tok(["hello world", "hi"])
    assert batch["input_ids"].shape == (2, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert tok.encode("Hello") == tok.encode("hello") == testing.HashTokenizer(100).encode("hello")
    assert all(0 <= i < 100 for i in tok.encode("a b c d e f g"))


def test_synthetic_batch_fn_returns_items() -> None:
    fn = testing.synthetic_batch_fn(0.0, 0.0)
    assert fn([1, 2, 3]) == [1, 2, 3]


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_save_checkpoint_single_file(tmp_path: Path, fmt: str) -> None:
    model = testing.tiny_mlp()
    path = testing.save_checkpoint(model, tmp_path / f"m.{fmt}", format=fmt)
    if fmt == "torch":
        sd = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(path)
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)
    assert [p.name for p in tmp_path.iterdir()] == [f"m.{fmt}"]  # no temp file left behind


@pytest.mark.parametrize(
    ("fmt", "index"),
    [("torch", "pytorch_model.bin.index.json"), ("safetensors", "model.safetensors.index.json")],
)
def test_save_checkpoint_sharded_with_index(tmp_path: Path, fmt: str, index: str) -> None:
    model = testing.tiny_mlp(layers=3)
    folder = testing.save_checkpoint(model, tmp_path / "ckpt", format=fmt, shards=3)
    meta = json.loads((folder / index).read_text())
    assert set(meta["weight_map"]) == set(model.state_dict())
    files = set(meta["weight_map"].values())
    assert len(files) == 3 and all((folder / f).exists() for f in files)
    expected = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert meta["metadata"]["total_size"] == expected


def test_save_checkpoint_rejects_bad_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format"):
        testing.save_checkpoint(testing.tiny_mlp(), tmp_path / "x", format="onnx")  # type: ignore[arg-type]


@pytest.mark.transformers
def test_hf_models_build_locally() -> None:
    bert = testing.hf_bert()
    ids, mask = testing.text_batch(batch_size=2, seq_len=8)
    with torch.inference_mode():
        assert bert(input_ids=ids, attention_mask=mask).last_hidden_state.shape == (2, 8, 256)
        llama = testing.hf_llama()
        assert llama(input_ids=ids).logits.shape == (2, 8, 1000)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight  # tied

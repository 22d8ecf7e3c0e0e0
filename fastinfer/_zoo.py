"""A zoo of real architectures built from tiny configs with random weights (tests and docs).

Each :class:`ZooModel` is one architecture that people serve (BERT, Llama, ViT, Whisper's encoder,
torchvision's ResNet-50...) at a size that builds and runs in well under a second: one or two
layers, hidden size 32, short sequences, 32x32 images. Nothing is downloaded. Re-exported by
:mod:`fastinfer.testing` (``testing.zoo_model("bert")``, ``testing.ZOO``).

    entry = testing.zoo_model("llama")
    model = entry.build()                       # eval mode, seeded
    out = entry.call(model, entry.inputs(4))    # the main output tensor (B, T, ...)
    items = entry.items(4)                      # one request each, as a service receives them
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastinfer._optional import require

__all__ = ["ZOO", "SentenceEncoder", "ZooModel", "zoo_model"]

VOCAB = 96
IMAGE = 32  # pixels per side
SEQ = 12  # longest sequence of a text batch


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the zoo.

    ``kind`` is ``"text"`` (padded token dicts), ``"image"`` (``(3, 32, 32)`` tensors) or
    ``"audio"`` (``(n_mels, frames)`` features); ``requires`` the package it is built with.
    """

    name: str
    label: str
    kind: str
    requires: str
    make: Callable[[], nn.Module] = field(repr=False)
    make_full: Callable[[], nn.Module] | None = field(default=None, repr=False)
    full_name: str = ""  # the class of the whole saved model ``make_full`` builds
    decoder_inputs: bool = False  # an encoder-decoder: decoder_input_ids follow input_ids

    def available(self) -> str:
        """ "" when the package it needs imports here, else why not."""
        try:
            importlib.import_module(self.requires)
        except Exception as exc:  # torchvision may be installed yet fail to import
            return f"{self.requires} cannot be imported here ({type(exc).__name__}: {exc})"
        return ""

    def build(self, seed: int = 0) -> nn.Module:
        """The model with deterministic random weights, in eval mode."""
        with _seeded(seed):
            return self.make().eval()

    def build_full(self, seed: int = 0) -> nn.Module:
        """The whole saved model this entry is a part of (``WhisperModel`` for its encoder)."""
        with _seeded(seed):
            return (self.make_full or self.make)().eval()

    def items(self, n: int, *, seed: int = 0) -> list[Any]:
        """``n`` single requests: token dicts of different lengths (1-D tensors), or images."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "image":
            return [torch.randn(3, IMAGE, IMAGE, generator=g) for _ in range(n)]
        if self.kind == "audio":
            return [torch.randn(8, 32, generator=g) for _ in range(n)]
        out = []
        for i in range(n):
            length = SEQ if i == 0 else int(torch.randint(3, SEQ + 1, (1,), generator=g))
            ids = torch.randint(3, VOCAB, (length,), generator=g)
            item = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long)}
            if self.decoder_inputs:
                item["decoder_input_ids"] = ids.clone()
            out.append(item)
        return out

    def inputs(self, batch: int, *, seed: int = 0) -> dict[str, Any] | Any:
        """A batch of ``batch`` requests as the model takes it (right-padded text with a mask)."""
        items = self.items(batch, seed=seed)
        if self.kind != "text":
            key = {"image": "pixel_values", "audio": "input_features"}[self.kind]
            stacked = torch.stack(items)
            return stacked if self.requires == "torchvision" else {key: stacked}
        width = max(len(it["input_ids"]) for it in items)
        batch_inputs: dict[str, torch.Tensor] = {}
        for key in items[0]:
            rows = torch.zeros(len(items), width, dtype=torch.long)
            for r, it in enumerate(items):
                rows[r, : len(it[key])] = it[key]
            batch_inputs[key] = rows
        return batch_inputs

    @staticmethod
    def main_output(out: Any) -> torch.Tensor:
        """The main tensor of a model's output (see :func:`main_output`)."""
        return main_output(out)

    @staticmethod
    def call(model: Callable[..., Any], inputs: Any) -> torch.Tensor:
        """The model's main output tensor for ``inputs`` (hidden states or logits)."""
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
        return main_output(out)


def main_output(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: itself, or its hidden states or logits (also from
    the per-item dicts a batcher returns)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state", "logits"):
        value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no main output tensor in a {type(out).__name__}")


class _Transformer(nn.Module):
    """sentence-transformers' ``Transformer`` module: the Hugging Face model as ``auto_model``."""

    def __init__(self, auto_model: nn.Module) -> None:
        super().__init__()
        self.auto_model = auto_model

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        out = self.auto_model(**{k: features[k] for k in keys if k in features}, return_dict=True)
        return {**features, "token_embeddings": out.last_hidden_state}


class _MeanPooling(nn.Module):
    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, mask = features["token_embeddings"], features["attention_mask"]
        weights = mask[..., None].to(tokens.dtype)  # (B, T, 1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, D)
        return {**features, "sentence_embedding": pooled}


class SentenceEncoder(nn.Sequential):
    """A sentence-transformers-shaped wrapper (without the dependency): an ``nn.Sequential`` of a
    module holding the Hugging Face model as ``auto_model`` and mean pooling. Called with one
    dict of features, it returns the dict with ``token_embeddings`` and ``sentence_embedding``."""

    def __init__(self, auto_model: nn.Module) -> None:
        super().__init__(_Transformer(auto_model), _MeanPooling())


class _seeded:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.state)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LAYERS = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def _hf(cls_name: str, config_name: str, **config: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        transformers = require("transformers", purpose="the model zoo")
        cfg = getattr(transformers, config_name)(**config)
        if hasattr(cfg, "hidden_dropout_prob"):
            cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
        return getattr(transformers, cls_name)(cfg)  # type: ignore[no-any-return]

    return make


def _text(cls: str, config: str, **extra: Any) -> Callable[[], nn.Module]:
    return _hf(cls, config, vocab_size=VOCAB, hidden_size=32, **_TOKENS, **_LAYERS, **extra)


def _vision(cls: str, config: str) -> Callable[[], nn.Module]:
    return _hf(cls, config, image_size=IMAGE, patch_size=8, hidden_size=32, **_LAYERS)


_WHISPER = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 8,
    "max_source_positions": 16,  # 32 frames of input features
    "max_target_positions": 16,
    "decoder_start_token_id": 1,
    **_TOKENS,
}
_T5 = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 2,
    "decoder_start_token_id": 0,
    **_TOKENS,
}


def _whisper_encoder() -> nn.Module:
    whole: Any = _hf("WhisperModel", "WhisperConfig", **_WHISPER)()
    encoder: nn.Module = whole.encoder
    return encoder


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A torchvision model class (``weights=None``: never downloads) at a tiny size."""

    def make() -> nn.Module:
        models = importlib.import_module("torchvision.models")
        if name == "resnet":  # ResNet-50's blocks (Bottleneck), one per stage
            block = importlib.import_module("torchvision.models.resnet").Bottleneck
            return models.ResNet(block, [1, 1, 1, 1], **kwargs)  # type: ignore[no-any-return]
        return getattr(models, name)(**kwargs)  # type: ignore[no-any-return]

    return make


_ENTRIES = [
    ZooModel("bert", "BERT", "text", "transformers", _text("BertModel", "BertConfig")),
    ZooModel("roberta", "RoBERTa", "text", "transformers", _text("RobertaModel", "RobertaConfig")),
    ZooModel(
        "distilbert",
        "DistilBERT",
        "text",
        "transformers",
        _hf(
            "DistilBertModel",
            "DistilBertConfig",
            vocab_size=VOCAB,
            dim=32,
            n_layers=1,
            n_heads=2,
            hidden_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=0,
        ),
    ),
    ZooModel(
        "xlm-roberta",
        "XLM-RoBERTa",
        "text",
        "transformers",
        _text("XLMRobertaModel", "XLMRobertaConfig"),
    ),
    ZooModel(
        "deberta-v2",
        "DeBERTa-v2",
        "text",
        "transformers",
        _text("DebertaV2Model", "DebertaV2Config"),
    ),
    ZooModel(
        "modernbert",
        "ModernBERT",
        "text",
        "transformers",
        _text("ModernBertModel", "ModernBertConfig", cls_token_id=1, sep_token_id=2),
    ),
    ZooModel("vit", "ViT", "image", "transformers", _vision("ViTModel", "ViTConfig")),
    ZooModel(
        "clip-text", "CLIP (text)", "text", "transformers", _text("CLIPTextModel", "CLIPTextConfig")
    ),
    ZooModel(
        "clip-vision",
        "CLIP (vision)",
        "image",
        "transformers",
        _vision("CLIPVisionModel", "CLIPVisionConfig"),
    ),
    ZooModel(
        "whisper",
        "Whisper (encoder)",
        "audio",
        "transformers",
        _whisper_encoder,
        make_full=_hf("WhisperModel", "WhisperConfig", **_WHISPER),
        full_name="WhisperModel",
    ),
    ZooModel(
        "t5",
        "T5",
        "text",
        "transformers",
        _hf("T5Model", "T5Config", **_T5),
        decoder_inputs=True,
    ),
    ZooModel(
        "gpt2",
        "GPT-2",
        "text",
        "transformers",
        _hf(
            "GPT2LMHeadModel",
            "GPT2Config",
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **_TOKENS,
        ),
    ),
    ZooModel(
        "llama",
        "Llama",
        "text",
        "transformers",
        _text("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=1),
    ),
    ZooModel(
        "qwen2",
        "Qwen2",
        "text",
        "transformers",
        _text("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=1),
    ),
    ZooModel(
        "mixtral",
        "Mixtral",
        "text",
        "transformers",
        _text(
            "MixtralForCausalLM",
            "MixtralConfig",
            num_key_value_heads=1,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    ZooModel(
        "resnet50",
        "ResNet-50 (torchvision `ResNet` + `Bottleneck`, 1 block per stage)",
        "image",
        "torchvision",
        _torchvision("resnet", num_classes=10),
    ),
    ZooModel(
        "vit-b-16",
        "ViT-B/16 (torchvision `VisionTransformer`, 1 layer, width 32)",
        "image",
        "torchvision",
        _torchvision(
            "VisionTransformer",
            image_size=IMAGE,
            patch_size=16,
            num_layers=1,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        ),
    ),
    ZooModel(
        "mobilenet-v3",
        "MobileNetV3-small (torchvision)",
        "image",
        "torchvision",
        _torchvision("mobilenet_v3_small", weights=None, num_classes=10),
    ),
]

#: Every architecture of the zoo, by name.
ZOO: dict[str, ZooModel] = {e.name: e for e in _ENTRIES}


def zoo_model(name: str) -> ZooModel:
    """The zoo entry called ``name`` (see :data:`ZOO`)."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; the zoo has {sorted(ZOO)}") from None

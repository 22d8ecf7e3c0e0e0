"""The demo's model, tokenizer and request texts: a small BERT-like text classifier, built locally."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from fastinfer import testing

VOCAB = 5000
WORDS = [f"w{i}" for i in range(3000)]
MODEL_KW: dict[str, Any] = {
    "vocab_size": VOCAB,
    "d_model": 256,  # BERT-mini's shape: 4 layers, hidden 256, 4 heads, FFN 1024
    "nhead": 4,
    "num_layers": 4,
    "dim_feedforward": 1024,
    "num_classes": 3,
    "max_len": 128,
}
LABELS = ("negative", "neutral", "positive")


def tokenizer() -> testing.HashTokenizer:
    return testing.HashTokenizer(vocab_size=VOCAB, max_length=MODEL_KW["max_len"])


def build_model() -> testing.BertLikeClassifier:
    return testing.bert_like_classifier(**MODEL_KW)


def save(path: Path) -> Path:
    """Write the demo checkpoint (safetensors when available, else torch.save)."""
    return testing.save_checkpoint(build_model(), path, format="torch")


def texts(n: int, *, seed: int = 0, min_words: int = 16, max_words: int = 63) -> list[str]:
    """``n`` request texts of 17..64 tokens (with the leading [CLS]), deterministic."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for _ in range(n)
    ]


def postprocess(logits: torch.Tensor) -> list[dict[str, Any]]:
    probs = logits.softmax(-1)
    top = probs.argmax(-1)
    return [{"label": LABELS[int(i)], "score": round(float(p[i]), 4)} for i, p in zip(top, probs)]

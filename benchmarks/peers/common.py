"""What every stack shares: the two models, their checkpoint, tokenizer, request texts and answer.

Every server in this folder imports this module (with the repository on ``PYTHONPATH``, also in
the peers' own venvs), so all stacks build the same ``nn.TransformerEncoder`` classifier from
``fastinfer.testing``, load the same checkpoint, tokenize with the same ``HashTokenizer``, answer
``POST /predict {"text": ...}`` with ``{"label": ..., "score": ...}`` and are driven with the same
texts. Nothing is downloaded: weights are random, from a seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastinfer import testing
from fastinfer._cli.demo import model as demo_model

SEED = 19
MAX_BATCH_SIZE = 32  # every batching stack: 32 requests at most per forward pass
MAX_WAIT_MS = 5.0  # ... and waits at most 5 ms for a batch to fill (TorchServe's max_batch_delay)


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: its constructor arguments, labels and request-text lengths."""

    name: str
    description: str
    model_kw: dict[str, Any] = field(hash=False)
    labels: tuple[str, ...]
    words: tuple[int, int]  # min, max words per request text (+1 token for [CLS])

    def build(self) -> testing.BertLikeClassifier:
        """The model with its seeded random weights (what the checkpoint holds), in eval mode."""
        return testing.bert_like_classifier(**self.model_kw, seed=SEED)

    @property
    def factory(self) -> Any:
        """A zero-argument constructor, for ``fastinfer.load_model``."""
        return functools.partial(testing.bert_like_classifier, **self.model_kw, seed=SEED)

    def tokenizer(self) -> testing.HashTokenizer:
        return testing.HashTokenizer(
            vocab_size=self.model_kw["vocab_size"], max_length=self.model_kw["max_len"]
        )

    def texts(self, n: int, *, seed: int = 11) -> list[str]:
        lo, hi = self.words
        return demo_model.texts(n, seed=seed, min_words=lo, max_words=hi)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # issue 19's model: a 4-layer nn.TransformerEncoder classifier, width 256, 4 heads,
        # FFN 1024, every request exactly 64 tokens (no padding)
        ModelSpec(
            "encoder64",
            "4-layer TransformerEncoder, width 256, 4 heads, FFN 1024, 64 tokens",
            {
                "vocab_size": 30522,
                "d_model": 256,
                "nhead": 4,
                "num_layers": 4,
                "dim_feedforward": 1024,
                "num_classes": 2,
                "max_len": 64,
            },
            ("negative", "positive"),
            (63, 63),
        ),
        # the demo's BERT-mini-shaped classifier (fastinfer/_cli/demo/model.py), 17..64 tokens
        ModelSpec(
            "bert-mini",
            "the demo's BERT-mini-shaped classifier, 17..64 tokens",
            dict(demo_model.MODEL_KW),
            tuple(demo_model.LABELS),
            (16, 63),
        ),
    )
}


def save_checkpoint(spec: ModelSpec, path: Path) -> Path:
    """Write ``spec``'s seeded weights once (``torch.save`` of the state dict)."""
    return testing.save_checkpoint(spec.build(), path, format="torch")


def load_plain(spec: ModelSpec, checkpoint: str | Path) -> testing.BertLikeClassifier:
    """How a peer loads it: build, ``torch.load(weights_only=True)``, ``load_state_dict``, eval."""
    model = spec.build()
    model.load_state_dict(torch.load(checkpoint, weights_only=True, map_location="cpu"))
    return model.eval()


def postprocess(logits: torch.Tensor, labels: Sequence[str]) -> list[dict[str, Any]]:
    """``{"label", "score"}`` per row: the arg-max class and its softmax probability."""
    probs = logits.float().softmax(-1)
    top = probs.argmax(-1)
    return [{"label": labels[int(i)], "score": round(float(p[i]), 4)} for i, p in zip(top, probs)]


def predict(
    model: torch.nn.Module, tok: testing.HashTokenizer, spec: ModelSpec, texts: Sequence[str]
) -> list[dict[str, Any]]:
    """Tokenize, one forward pass under ``inference_mode``, post-process: one batch of texts."""
    enc = tok(list(texts))
    with torch.inference_mode():
        logits = model(enc["input_ids"], enc["attention_mask"])
    return postprocess(logits, spec.labels)


# --- for the server scripts ---------------------------------------------------------------


def server_args(description: str, variants: Sequence[str] = ()) -> argparse.Namespace:
    """The arguments every server script takes: which model, its checkpoint, where to listen."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", type=Path, help="a folder the server may write to")
    if variants:
        parser.add_argument("--variant", choices=list(variants), required=True)
    return parser.parse_args()


def listening_socket(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A bound listener with TCP_NODELAY, as the demo's server uses for uvicorn.

    Accepted connections inherit TCP_NODELAY; without it a response written as headers + body
    waits ~40 ms for the client's delayed ACK (Nagle).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def threads_report() -> str:
    """One line for a server's log: the torch threads this process computes with."""
    return json.dumps({"torch_threads": torch.get_num_threads()})

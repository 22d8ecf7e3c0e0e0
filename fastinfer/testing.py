"""Small models and helpers shared by the tests, benchmarks and examples.

Everything here is built locally with random weights: nothing is ever downloaded from a hub.

    >>> from fastinfer import testing
    >>> model = testing.tiny_mlp()
    >>> ids, mask = testing.text_batch(batch_size=4, seq_len=16, padding=0.5)
    >>> logits = testing.bert_like_classifier()(ids, mask)

Hugging Face models (:func:`hf_bert`, :func:`hf_llama`) need the ``transformers`` extra. The
model zoo (:data:`ZOO`, :func:`zoo_model`: BERT to Mixtral, ViT, Whisper's encoder, torchvision's
ResNet-50) builds real architectures from tiny configs; see ``fastinfer/_zoo.py``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastinfer._common.files import atomic_path
from fastinfer._optional import require
from fastinfer._zoo import ZOO, SentenceEncoder, ZooModel, zoo_model
from fastinfer.errors import ConfigError

__all__ = [
    "ZOO",
    "BertLikeClassifier",
    "HashTokenizer",
    "ManualClock",
    "RotaryMLP",
    "SentenceEncoder",
    "TinyMLP",
    "ZooModel",
    "bert_like_classifier",
    "hf_bert",
    "hf_llama",
    "save_checkpoint",
    "seeded",
    "synthetic_batch_fn",
    "text_batch",
    "tiny_mlp",
    "zoo_model",
]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded, then restore the previous RNG state."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    """A small MLP: ``layers`` Linear+GELU blocks and an output head."""

    def __init__(
        self, in_features: int = 32, hidden: int = 64, out_features: int = 8, layers: int = 2
    ):
        super().__init__()
        dims = [in_features] + [hidden] * layers
        self.body = nn.Sequential(
            *[m for a, b in itertools.pairwise(dims) for m in (nn.Linear(a, b), nn.GELU())]
        )
        self.head = nn.Linear(dims[-1], out_features)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tiny_mlp(
    in_features: int = 32,
    hidden: int = 64,
    out_features: int = 8,
    layers: int = 2,
    *,
    seed: int = 0,
) -> TinyMLP:
    """A :class:`TinyMLP` with deterministic random weights, in eval mode."""
    with seeded(seed):
        return TinyMLP(in_features, hidden, out_features, layers).eval()


class BertLikeClassifier(nn.Module):
    """A BERT-shaped text classifier built from ``nn.TransformerEncoder`` (batch first).

    ``forward(input_ids, attention_mask=None)`` takes ``(B, T)`` token ids and an optional ``(B, T)``
    mask (1 = real token, 0 = padding) and returns ``(B, num_classes)`` logits pooled from the
    first token, as BERT does.
    """

    position_ids: torch.Tensor

    def __init__(
        self,
        vocab_size: int = 1000,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 512,
        num_classes: int = 2,
        max_len: int = 512,
        *,
        enable_nested_tensor: bool = True,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.norm = nn.LayerNorm(d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, enable_nested_tensor=enable_nested_tensor
        )
        self.classifier = nn.Linear(d_model, num_classes)
        self.register_buffer("position_ids", torch.arange(max_len), persistent=False)
        self.max_len = max_len
        self.vocab_size = vocab_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.norm(self.embed(input_ids) + self.pos(self.position_ids[:seq]))  # (B, T, D)
        padding_mask = None if attention_mask is None else attention_mask == 0
        x = self.encoder(x, src_key_padding_mask=padding_mask)  # (B, T, D)
        return self.classifier(x[:, 0])


def bert_like_classifier(
    *,
    vocab_size: int = 1000,
    d_model: int = 128,
    nhead: int = 4,
    num_layers: int = 2,
    dim_feedforward: int = 512,
    num_classes: int = 2,
    max_len: int = 512,
    enable_nested_tensor: bool = True,
    seed: int = 0,
) -> BertLikeClassifier:
    """A :class:`BertLikeClassifier` with deterministic random weights, in eval mode.

    The defaults are BERT-mini-like and cheap on CPU; ``d_model=768, nhead=12, num_layers=12,
    dim_feedforward=3072`` gives BERT-base's shape.
    """
    with seeded(seed):
        return BertLikeClassifier(
            vocab_size,
            d_model,
            nhead,
            num_layers,
            dim_feedforward,
            num_classes,
            max_len,
            enable_nested_tensor=enable_nested_tensor,
        ).eval()


class RotaryMLP(nn.Module):
    """A stack of square Linear layers with a computed (non-persistent) rotary buffer.

    It has the shape of the loader benchmark's model: most bytes in Linear weights, plus a buffer
    that is computed at construction and never saved (like RoPE ``inv_freq``), which is what breaks
    the naive meta-device recipe.
    """

    inv_freq: torch.Tensor

    def __init__(self, width: int = 256, layers: int = 4, *, base: float = 10000.0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        inv_freq = 1.0 / (base ** (torch.arange(0, width, 2, dtype=torch.float32) / width))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rotate pairs of features by a position-independent angle derived from inv_freq.
        cos, sin = self.inv_freq.cos(), self.inv_freq.sin()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        x = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _transformers() -> Any:
    return require("transformers", purpose="Hugging Face test models")


def hf_bert(
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 1024,
    vocab_size: int = 1000,
    max_position_embeddings: int = 512,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> Any:
    """A small Hugging Face ``BertModel`` (BERT-mini shape by default) built from a config."""
    transformers = _transformers()
    config = transformers.BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _build_hf(transformers.BertModel, config, seed, attn_implementation)


def hf_llama(
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 1000,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> Any:
    """A small Hugging Face ``LlamaForCausalLM`` built from a config (tied embeddings by default)."""
    transformers = _transformers()
    config = transformers.LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    return _build_hf(transformers.LlamaForCausalLM, config, seed, attn_implementation)


def _build_hf(cls: Any, config: Any, seed: int, attn_implementation: str | None) -> Any:
    with seeded(seed):
        model = cls(config).eval()
    if attn_implementation:  # transformers 5 takes it here, not as a constructor argument
        model.set_attn_implementation(attn_implementation)
    return model


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def text_batch(
    batch_size: int = 8,
    seq_len: int = 64,
    *,
    padding: float = 0.0,
    vocab_size: int = 1000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids, attention_mask)`` of shape ``(batch_size, seq_len)``, right-padded.

    ``padding`` is the mean fraction of padded positions (0 = none). Lengths vary per row around
    ``seq_len * (1 - padding)``; the longest row is always full length, as after dynamic padding.
    Token ids are never all zero (timing on all-zero inputs lies). The same batches that
    ``swap_attention_(padding_profile=...)`` synthesises.
    """
    from fastinfer.attention._profile import synthetic_text_batch

    return synthetic_text_batch(
        batch_size, seq_len, padding=padding, vocab_size=vocab_size, seed=seed
    )


class HashTokenizer:
    """A dependency-free word tokenizer: lower-cased words hashed into ``vocab_size`` ids.

    ``tok(["a text", ...])`` returns ``{"input_ids", "attention_mask"}`` as ``(B, T)`` long
    tensors padded to the longest text (``max_length`` caps it), with id 1 as a leading ``[CLS]``.
    Deterministic across processes (it does not use Python's salted ``hash``).
    """

    pad_id, cls_id = 0, 1

    def __init__(self, vocab_size: int = 1000, max_length: int = 128):
        self.vocab_size = vocab_size
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        ids = [self.cls_id]
        for word in text.lower().split():
            h = 2166136261
            for byte in word.encode():  # FNV-1a
                h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
            ids.append(2 + h % (self.vocab_size - 2))
        return ids[: self.max_length]

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        encoded = [self.encode(t) for t in batch]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e)
            mask[row, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def synthetic_batch_fn(
    base_ms: float = 10.0, per_item_ms: float = 1.0, *, spin: bool = False
) -> Callable[[list[Any]], list[Any]]:
    """A batch function with a realistic cost shape: ``base_ms + per_item_ms * len(items)``.

    It returns its items unchanged. ``spin=True`` burns CPU instead of sleeping (closer to a real
    model, but it competes for cores).
    """

    def fn(items: list[Any]) -> list[Any]:
        cost = (base_ms + per_item_ms * len(items)) / 1000.0
        if spin:
            end = time.perf_counter() + cost
            while time.perf_counter() < end:
                pass
        else:
            time.sleep(cost)
        return list(items)

    return fn


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _state_dict(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    # never rewrite a file in place: it may be mmapped (SIGBUS)
    with atomic_path(path) as tmp:
        write(str(tmp))


def _write_one(sd: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        st = require("safetensors.torch", purpose="writing safetensors checkpoints")
        # safetensors refuses shared storage; tied tensors are saved as separate copies.
        _atomic_write(path, lambda p: st.save_file({k: v.clone() for k, v in sd.items()}, p))
    else:
        _atomic_write(path, lambda p: torch.save(sd, p))


def save_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    format: Literal["torch", "safetensors"] = "torch",
    shards: int | None = None,
) -> Path:
    """Write a checkpoint as ``torch.save`` or safetensors, one file or ``shards`` shard files.

    With ``shards``, ``path`` is a folder that receives the shards and the index JSON that
    Hugging Face uses (``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``).
    Files are written to a temporary name and renamed, so a reader that has the old file mmapped
    never sees it change. Returns the file or folder written.
    """
    if format not in ("torch", "safetensors"):
        raise ConfigError(f"format must be 'torch' or 'safetensors', got {format!r}")
    sd = _state_dict(model_or_state_dict)
    path = Path(path)
    if shards is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_one(sd, path, format)
        return path
    if shards < 1:
        raise ConfigError(f"shards must be >= 1, got {shards!r}")
    path.mkdir(parents=True, exist_ok=True)
    stem, ext, index_name = (
        ("model", "safetensors", "model.safetensors.index.json")
        if format == "safetensors"
        else ("pytorch_model", "bin", "pytorch_model.bin.index.json")
    )
    keys = list(sd)
    per_shard = math.ceil(len(keys) / shards) or 1
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        chunk = keys[i * per_shard : (i + 1) * per_shard]
        if not chunk:
            break
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        _write_one({k: sd[k] for k in chunk}, path / name, format)
        for k in chunk:
            weight_map[k] = name
            total += sd[k].numel() * sd[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write(path / index_name, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    return path


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


class ManualClock:
    """A clock that moves only when told to, for deterministic concurrency tests.

    It has the two methods ``DynamicBatcher(clock=...)`` uses: ``time()`` and
    ``call_at(when, callback)`` (returns a handle with ``cancel()``). ``advance(seconds)`` moves
    time forward and runs the callbacks that fall due, in time order, each with ``time()`` set to
    its due time. Call it from the thread that runs the code under test (the event loop's).

        >>> clock = ManualClock()
        >>> fired = []
        >>> _ = clock.call_at(0.005, lambda: fired.append(clock.time()))
        >>> clock.advance(0.010); fired
        [0.005]
    """

    class Handle:
        __slots__ = ("callback", "cancelled", "when")

        def __init__(self, when: float, callback: Callable[[], Any]) -> None:
            self.when, self.callback, self.cancelled = when, callback, False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, ManualClock.Handle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self._now

    __call__ = time

    def call_at(self, when: float, callback: Callable[[], Any]) -> ManualClock.Handle:
        handle = ManualClock.Handle(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), handle))
        return handle

    def pending(self) -> list[float]:
        """Due times of the armed (not cancelled) timers, soonest first."""
        return sorted(h.when for _, _, h in self._timers if not h.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every timer that falls due on the way."""
        if seconds < 0:
            raise ConfigError(f"a ManualClock only moves forward; got advance({seconds!r})")
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, handle = heapq.heappop(self._timers)
            if handle.cancelled:
                continue
            self._now = max(self._now, when)
            handle.callback()
        self._now = target

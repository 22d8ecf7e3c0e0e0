"""Synthetic example inputs from a padding profile ``(batch_size, seq_len, padding)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastinfer.attention._family_hf import is_hf
from fastinfer.errors import ConfigError

__all__ = ["PaddingProfile", "profile_inputs", "synthetic_text_batch"]


def synthetic_text_batch(
    batch_size: int,
    seq_len: int,
    *,
    padding: float = 0.0,
    vocab_size: int = 1000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids, attention_mask)`` of shape ``(batch_size, seq_len)``, right-padded.

    ``padding`` is the mean fraction of padded positions (0 = none). Lengths vary per row around
    ``seq_len * (1 - padding)``; the longest row is always full length, as after dynamic padding.
    Token ids are never all zero (timing on all-zero inputs lies).
    """
    if not 0.0 <= padding < 1.0:
        raise ConfigError(f"padding must be in [0, 1), got {padding!r}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=gen)
    mean_len = seq_len * (1.0 - padding)
    spread = min(mean_len - 1, seq_len - mean_len)
    lengths = (mean_len + (torch.rand(batch_size, generator=gen) * 2 - 1) * spread).round()
    lengths = lengths.clamp(1, seq_len).long()
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


@dataclass(frozen=True)
class PaddingProfile:
    batch_size: int
    seq_len: int
    padding: float

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1 or not 0.0 <= self.padding < 1.0:
            raise ConfigError(
                "padding_profile must be (batch_size >= 1, seq_len >= 1, padding in [0, 1)), "
                f"got {(self.batch_size, self.seq_len, self.padding)!r}"
            )


def profile_inputs(model: nn.Module, profile: PaddingProfile) -> Any:
    p = next(model.parameters())
    if is_hf(model):
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids, mask = synthetic_text_batch(
            profile.batch_size, profile.seq_len, padding=profile.padding, vocab_size=vocab
        )
        return {"input_ids": ids.to(p.device), "attention_mask": mask.to(p.device)}
    if isinstance(model, nn.TransformerEncoder | nn.TransformerEncoderLayer):
        first = model.layers[0] if isinstance(model, nn.TransformerEncoder) else model
        d = first.self_attn.embed_dim
        _, mask = synthetic_text_batch(profile.batch_size, profile.seq_len, padding=profile.padding)
        gen = torch.Generator().manual_seed(0)
        src = torch.randn(profile.batch_size, profile.seq_len, d, generator=gen).to(p)
        pad = (mask == 0).to(p.device)
        if not first.self_attn.batch_first:
            src = src.transpose(0, 1)
        return {"src": src, "src_key_padding_mask": pad}
    raise ConfigError(
        f"padding_profile can only build inputs for Hugging Face models and nn.TransformerEncoder"
        f"(Layer); for {type(model).__name__} pass example_inputs instead"
    )

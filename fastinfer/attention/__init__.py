"""Attention swap: route a model to its fastest correct attention path, say why, and undo.

:func:`swap_attention_` looks at what the model is built from and assembles candidate paths:

* Hugging Face models: the attention implementations the class supports and this machine can run
  (``eager``, ``sdpa``, ``flex_attention``, ``flash_attention_2`` on a GPU with fp16/bf16 and the
  kernel installed), switched in place with ``set_attn_implementation``;
* Hugging Face BERT-family encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT): the
  encoder replaced by one that runs the same weights either on the packed valid tokens
  (``hf:packed``) or through PyTorch's fused encoder-layer kernel with nested tensors
  (``hf:fused``), what optimum's BetterTransformer did;
* ``nn.TransformerEncoder`` / ``TransformerEncoderLayer`` / ``MultiheadAttention``: the native
  fastpath made to apply (``torch:fastpath``, ``torch:fastpath-nested``) or the packed encoder
  (``torch:packed``), with the reason PyTorch would give when its fastpath is not taken;
* classes registered with :func:`register_attention_swap`;
* optimum's legacy BetterTransformer, only where an optimum that ships it and a transformers it
  accepts are installed.

With ``example_inputs`` (or a ``padding_profile``) every candidate is verified against the
original on valid positions and timed (interleaved, median); the fastest correct one is kept.
:func:`undo_attention_swap_` restores the original exactly.

    >>> report = swap_attention_(model, example_inputs={"input_ids": ids, "attention_mask": mask})
    >>> print(report)
    >>> undo_attention_swap_(model)

Layout: ``_types`` (the report and the registry: a leaf), ``_swap`` (choose, apply, undo),
``_discover`` with ``_family_hf`` / ``_family_torch`` (candidates by model family),
``_outputs`` (calling and comparing), ``_diagnose`` and ``_why`` (PyTorch's fastpath
conditions), ``_packing`` / ``_kernels_hf`` / ``_kernels_torch`` (the replacement encoders),
``_profile`` (synthetic inputs), ``_undo``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fastinfer.attention import _swap
from fastinfer.attention._family_hf import optimum_status
from fastinfer.attention._types import AttentionReport, PathResult, register_attention_swap

__all__ = [
    "AttentionReport",
    "PathResult",
    "optimum_status",
    "register_attention_swap",
    "swap_attention_",
    "undo_attention_swap_",
]


def swap_attention_(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    prefer: str | Sequence[str] | None = None,
    verify: bool = True,
    padding_profile: tuple[int, int, float] | None = None,
    repeat: int = 5,
    warmup: int = 1,
    rtol: float | None = None,
    atol: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> AttentionReport:
    """Switch ``model`` in place to its fastest correct attention path; return what was done.

    Args:
        example_inputs: a batch the model is called with (a dict of keyword arguments, a tuple of
            positional ones, or one tensor). With it every candidate path is verified on valid
            positions and timed, and the fastest correct one is kept. The padding mask is found
            by name (``attention_mask``: 1 = token; ``src_key_padding_mask`` /
            ``key_padding_mask``: True = padding).
        prefer: a path name (or names) to restrict the choice to, e.g. ``"hf:packed"``.
        verify: compare with the original and undo the swap on mismatch (needs example inputs).
        padding_profile: ``(batch_size, seq_len, padding_fraction)`` to synthesise example inputs
            (Hugging Face models and bare ``nn.TransformerEncoder``).
        repeat / warmup: timed and untimed calls per candidate (timing is interleaved; median).
        rtol / atol: override the shared per-dtype tolerances
            (:mod:`fastinfer._common.tolerances`), as in :func:`fastinfer.compile_model`.

    Without inputs the path is chosen by rule (hf:packed for BERT-family encoders, hf:sdpa for
    other HF models, torch:fastpath-nested for nn.TransformerEncoder, registered replacements).

    Raises:
        AttentionSwapError: the model is already swapped, or a preferred path is unavailable.
        ConfigError: bad arguments.
    """
    return _swap.swap(
        model,
        example_inputs=example_inputs,
        prefer=prefer,
        verify=verify,
        padding_profile=padding_profile,
        repeat=repeat,
        warmup=warmup,
        rtol=rtol,
        atol=atol,
        clock=clock,
    )


def undo_attention_swap_(model: nn.Module) -> AttentionReport:
    """Restore the model exactly as it was before :func:`swap_attention_`; returns that report.

    Raises:
        AttentionSwapError: the model is not swapped.
    """
    return _swap.undo(model)

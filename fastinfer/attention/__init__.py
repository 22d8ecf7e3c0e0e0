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
``_guard`` (what they check before each fast call),
``_profile`` (synthetic inputs), ``_undo``.
"""

from fastinfer.attention._family_hf import optimum_status
from fastinfer.attention._swap import swap_attention_, undo_attention_swap_
from fastinfer.attention._types import AttentionReport, PathResult, register_attention_swap

__all__ = [
    "AttentionReport",
    "PathResult",
    "optimum_status",
    "register_attention_swap",
    "swap_attention_",
    "undo_attention_swap_",
]

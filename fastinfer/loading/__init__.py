"""Fast, correct model loading: meta-device construction + memory-mapped checkpoints + assign.

    with fastinfer.empty_init():
        model = MyModel()                      # parameters on meta: no storage, no init
    report = fastinfer.load_weights_(model, "model.safetensors")
    model = fastinfer.load_model(MyModel, "ckpt.pt", width=4096)   # the three steps in one

Weights stay in the page cache, mapped into the process (zero copy), so several processes that load
the same file share one copy. Buffers are built for real during construction (so computed,
non-persistent buffers such as RoPE ``inv_freq`` are never left on meta), tied weights stay tied,
and nothing is left on meta after a load (checked). See docs/loading.md.

Layout: ``_empty_init`` (construction on meta), ``_formats`` (finding, sniffing and mapping
checkpoint files), ``_pages`` (is a mapped file still whole; faulting its pages in without SIGBUS),
``_load`` (:func:`load_weights_`), ``_models`` (:func:`load_model`,
:func:`load_pretrained`), ``_hf`` (transformers' own key conversions for saved-format checkpoints),
``_save`` (:func:`save_weights`), ``_report`` (:class:`LoadReport`).
"""

from fastinfer.loading._empty_init import empty_init
from fastinfer.loading._load import load_weights_
from fastinfer.loading._models import load_model, load_pretrained
from fastinfer.loading._report import LoadReport
from fastinfer.loading._save import save_weights

__all__ = [
    "LoadReport",
    "empty_init",
    "load_model",
    "load_pretrained",
    "load_weights_",
    "save_weights",
]

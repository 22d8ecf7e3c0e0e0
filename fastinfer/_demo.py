"""The showcase behind ``fastinfer demo``: runs each primitive that exists and prints what it did."""

from __future__ import annotations

import time

import torch

from fastinfer import testing


def run_demo(*, quick: bool = False) -> int:
    print(f"fastinfer showcase (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    t0 = time.perf_counter()
    model = testing.bert_like_classifier()
    ids, mask = testing.text_batch(batch_size=8, seq_len=64, padding=0.3)
    with torch.inference_mode():
        logits = model(ids, mask)
    print(
        f"- built a BERT-like classifier locally and ran a batch of 8: logits {tuple(logits.shape)}"
        f" in {time.perf_counter() - t0:.2f}s"
    )
    return 0

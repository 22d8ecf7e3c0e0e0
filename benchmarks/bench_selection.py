"""How long choosing takes: ``swap_attention_`` and ``select_backend`` on BERT-base, batch 32 x 128.

    python benchmarks/bench_selection.py [--json PATH] [--padding 0.45]

Issue 15's selection targets: each call finishes in <= 10 s on a 2-core machine with its default
budget (the first time: nothing cached), and the same two calls in a *fresh process* with the same
model, inputs and cache directory take <= 1 s each and make the same choice (decision cache hit).
Hugging Face ``BertForSequenceClassification`` with BERT-base's shape (768 hidden, 12 layers, 12
heads, FFN 3072), random weights, under ``torch.inference_mode()`` as a service calls it;
``select_backend`` gets eager, the swapped copy, inductor, ONNX Runtime and OpenVINO, as
``bench_ceiling.py`` does (with its default budget it builds only what fits). Each phase runs in its own interpreter (``first`` then ``again``), so "again" proves the
cache survives a restart, not an in-memory memo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE = dict(d=768, layers=12, heads=12, ffn=3072)


def phase(cache_dir: str, padding: float) -> dict[str, object]:
    """Build the model, then time swap_attention_ and select_backend (in this process)."""
    import torch

    import fastinfer
    from benchmarks.bench_ceiling import classifier
    from fastinfer import testing

    model = classifier(BASE)
    ids, mask = testing.text_batch(32, 128, padding=padding, vocab_size=30522, seed=1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    swapped = classifier(BASE)
    t0 = time.perf_counter()
    with torch.inference_mode():
        swap = fastinfer.swap_attention_(swapped, example_inputs=inputs, cache_dir=cache_dir)
    t_swap = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = fastinfer.select_backend(
        model,
        inputs,
        candidates=["eager", ("swapped", swapped), "inductor", "onnxruntime", "openvino"],
        batch_sizes=(32,),
        cache_dir=cache_dir,
    )
    t_select = time.perf_counter() - t0
    return {
        "swap_seconds": t_swap,
        "swap_chosen": swap.chosen,
        "select_seconds": t_select,
        "select_winner": report.winner,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--padding", type=float, default=0.45)
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one timed phase
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.cache_dir, args.padding)))
        return
    cache_dir = tempfile.mkdtemp(prefix="fastinfer-selection-")
    runs = {}
    for name in ("first", "again"):
        cmd = [sys.executable, __file__, "--phase", name, "--cache-dir", cache_dir,
               "--padding", str(args.padding)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
    first, again = runs["first"], runs["again"]
    rows = [
        ("swap_attention_", "swap_seconds", "swap_chosen"),
        ("select_backend", "select_seconds", "select_winner"),
    ]
    print(f"BERT-base, batch 32 x 128, padding {args.padding:.0%}; decision cache {cache_dir}")
    print(f"{'call':<16} {'first (s)':>10} {'again (s)':>10}  choice (first / again)  targets")
    for label, t, c in rows:
        ok = first[t] <= 10 and again[t] <= 1 and first[c] == again[c]
        print(
            f"{label:<16} {first[t]:>10.2f} {again[t]:>10.2f}  {first[c]} / {again[c]}  "
            f"<= 10 s, <= 1 s, same: {'yes' if ok else 'NO'}"
        )
    if args.json:
        args.json.write_text(json.dumps({"padding": args.padding, **runs}, indent=2))


if __name__ == "__main__":
    main()

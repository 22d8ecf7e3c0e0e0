"""The packed attention path's dense layers: ``F.linear`` (MKL) vs oneDNN on reordered weights.

What ``fastinfer._attention_kernels.dense`` does on CPU in float32: the weight is reordered once
into oneDNN's blocked layout and every call runs oneDNN's matmul on it, with the GELU fused in
for the first feed-forward layer. Shapes: BERT-base's dense layers and one of BERT-mini's, on
1024 rows (batch 8 × 128 tokens). Trials interleaved; the ratio is ``F.linear``'s time over
``dense``'s, and the rate in GFLOP/s is reported beside it.

    python benchmarks/bench_dense.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from _harness import Bench, compare

from fastinfer import _attention_kernels as kernels

SHAPES = {  # name: (in, out, activation)
    "BERT-base QKV 768->2304": (768, 2304, ""),
    "BERT-base FFN in 768->3072 + GELU": (768, 3072, "gelu"),
    "BERT-base FFN out 3072->768": (3072, 768, ""),
    "BERT-mini FFN in 256->1024 + GELU": (256, 1024, "gelu"),
}
ROWS = 1024


def run_case(bench: Bench, case: str, k: int, n: int, act: str, repeat: int) -> None:
    x, w, b = torch.randn(ROWS, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    owner = torch.nn.Module()  # holds dense()'s cache of the reordered weight

    def plain() -> None:
        y = F.linear(x, w, b)
        if act:
            F.gelu(y)

    def fast() -> None:
        kernels.dense(owner, "w", x, w, b, act)

    with torch.inference_mode():
        result = compare({"F.linear": plain, "dense": fast}, baseline="F.linear", repeat=repeat)
        err = float((kernels.dense(owner, "w", x, w, b) - F.linear(x, w, b)).abs().max())
    bench.add(result, case=case, target=("dense", ">=", 1.0))
    flops = 2 * ROWS * k * n
    for name in ("F.linear", "dense"):
        bench.add_value(
            case, f"{name} rate", flops / result.stats[name].median / 1e9, unit="GFLOP/s"
        )
    bench.add_value(case, "max abs difference", err)


def main() -> None:
    bench = Bench("dense", description="F.linear vs oneDNN on reordered weights, CPU float32")
    repeat = 5 if bench.quick else 20
    if not kernels._onednn_available():
        bench.note("this torch has no oneDNN linear: dense() falls back to F.linear")
    torch.manual_seed(0)
    for case, (k, n, act) in SHAPES.items():
        run_case(bench, case, k, n, act, repeat)
    bench.note(f"torch threads={torch.get_num_threads()}, {ROWS} rows")
    bench.finish()


if __name__ == "__main__":
    main()

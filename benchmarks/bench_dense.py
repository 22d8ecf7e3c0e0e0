"""The packed attention path's dense layers: ``F.linear`` (MKL) vs oneDNN on reordered weights.

What ``fastinfer.attention._packing.dense`` does on CPU in float32: the weight is reordered once
into oneDNN's blocked layout and every call runs oneDNN's matmul on it, with the GELU fused in
for the first feed-forward layer. Shapes: BERT-base's dense layers and one of BERT-mini's, on
1024 rows (batch 8 × 128 tokens). Trials interleaved; the ratio is ``F.linear``'s time over
``dense``'s, and the rate in GFLOP/s is reported beside it. With the ``openvino`` extra, the same
layer as a one-layer OpenVINO model (f32, the same threads; its call includes copying the input
to and the output from numpy) runs beside them: whether OpenVINO's lead on whole models comes from
faster matmul kernels.

    python benchmarks/bench_dense.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from typing import Any

import torch
import torch.nn.functional as F
from _harness import Bench, compare

from fastinfer.attention import _packing as kernels

SHAPES = {  # name: (in, out, activation)
    "BERT-base QKV 768->2304": (768, 2304, ""),
    "BERT-base FFN in 768->3072 + GELU": (768, 3072, "gelu"),
    "BERT-base FFN out 3072->768": (3072, 768, ""),
    "BERT-mini FFN in 256->1024 + GELU": (256, 1024, "gelu"),
}
ROWS = 1024


def openvino_layer(w: torch.Tensor, b: torch.Tensor, act: str, x: torch.Tensor) -> Any:
    """The layer as a one-layer OpenVINO model (f32), or None without the extra."""
    try:
        import openvino as ov
    except ImportError:
        return None

    class Layer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, w, b)
            return F.gelu(y) if act else y

    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    }
    compiled = ov.Core().compile_model(ov.convert_model(Layer(), example_input=x), "CPU", config)
    request = compiled.create_infer_request()
    data = x.numpy()
    return lambda: request.infer([data])


def run_case(bench: Bench, case: str, k: int, n: int, act: str, repeat: int) -> None:
    x, w, b = torch.randn(ROWS, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    owner = torch.nn.Module()  # holds dense()'s cache of the reordered weight

    def plain() -> None:
        y = F.linear(x, w, b)
        if act:
            F.gelu(y)

    def fast() -> None:
        kernels.dense(owner, "w", x, w, b, act)

    fns = {"F.linear": plain, "dense": fast}
    ov = openvino_layer(w, b, act, x)
    if ov is not None:
        fns["openvino"] = ov
    with torch.inference_mode():
        result = compare(fns, baseline="F.linear", repeat=repeat)
        err = float((kernels.dense(owner, "w", x, w, b) - F.linear(x, w, b)).abs().max())
    bench.add(result, case=case, target=("dense", ">=", 1.0))
    flops = 2 * ROWS * k * n
    for name in fns:
        bench.add_value(
            case, f"{name} rate", flops / result.stats[name].median / 1e9, unit="GFLOP/s"
        )
    bench.add_value(case, "max abs difference", err)


def main() -> None:
    bench = Bench("dense", description="F.linear vs oneDNN on reordered weights, CPU float32")
    repeat = 5 if bench.quick else 20
    if not kernels.onednn_available():
        bench.note("this torch has no oneDNN linear: dense() falls back to F.linear")
    torch.manual_seed(0)
    for case, (k, n, act) in SHAPES.items():
        run_case(bench, case, k, n, act, repeat)
    bench.note(f"torch threads={torch.get_num_threads()}, {ROWS} rows")
    bench.finish()


if __name__ == "__main__":
    main()

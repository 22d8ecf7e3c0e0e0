"""ONNX Runtime with and without its transformer fusions, side by side (issue 15's ORT column).

``bench_ceiling.py`` times ORT on the graph ``onnxruntime.transformers.optimizer`` fuses
(``model_type="bert"``, raw 0/1 mask), as ``select_backend``'s ``onnxruntime`` candidate serves
it. On a 2-core AVX-512 machine that graph was not faster than the plain export run with ORT's own
session optimisations (``ORT_ENABLE_ALL``), so a peer timed only fused may be understated. This
script times both forms of one export in one process, interleaved, and prints fused / unfused.

    python benchmarks/bench_ort_fusions.py [--model mini|base] [--threads 2] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

CASES = ((8, 0.45), (32, 0.0), (1, 0.0))  # (batch, share of padding) x 128 tokens


def _sessions(folder: Path, model: Any, threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, model.config.vocab_size, (2, 128))
    plain = folder / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Hidden(),
            (ids, torch.ones_like(ids)),
            str(plain),
            input_names=["ids", "mask"],
            dynamic_axes={"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}},
            opset_version=17,
            dynamo=False,
        )
    options = FusionOptions("bert")
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    fused = optimizer.optimize_model(
        str(plain),
        model_type="bert",
        num_heads=model.config.num_attention_heads,
        hidden_size=model.config.hidden_size,
        optimization_options=options,
    )
    fused.save_model_to_file(str(folder / "fused.onnx"))

    def session(path: Path) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 4
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    return {"unfused": session(plain), "fused": session(folder / "fused.onnx")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mini", "base"), default="mini")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    from fastinfer import testing

    torch.manual_seed(0)
    base = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    }
    model = (testing.hf_bert() if args.model == "mini" else testing.hf_bert(**base)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        sessions = _sessions(Path(tmp), model, args.threads)
        print(
            f"BERT-{args.model}, {args.threads} threads, medians of {args.repeat} interleaved runs"
        )
        for batch, pad in CASES:
            ids = torch.randint(0, model.config.vocab_size, (batch, 128))
            mask = torch.ones_like(ids)
            for row in range(batch if pad else 0):
                mask[row, int(128 * (1 - pad * (row % 2 + 0.5))) :] = 0
            feed = {"ids": ids.numpy(), "mask": mask.numpy()}
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for s in sessions.values():
                s.run(None, feed)  # warm-up
            for _ in range(args.repeat):
                for name, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v) * 1000 for name, v in times.items()}
            print(
                f"b={batch:<3} padding {pad:.0%}: unfused {med['unfused']:.1f} ms, "
                f"fused {med['fused']:.1f} ms, fused / unfused {med['fused'] / med['unfused']:.2f}x"
            )


if __name__ == "__main__":
    main()

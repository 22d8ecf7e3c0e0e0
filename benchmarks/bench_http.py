"""HTTP load test: a plain FastAPI endpoint vs the fastinfer stack, same model, same machine.

    python benchmarks/bench_http.py [--quick] [--json PATH] [--rates 100,200,400]

Both services run in their own process on localhost (the demo's services, see
fastinfer/_demo/server.py) with the demo's BERT-like classifier and request texts of 17..64
tokens. For each: closed-loop saturation (64 concurrent clients) and open-loop Poisson arrivals at
several rates. The physical ceiling is the model's own offline throughput at full batches
(tokenize + forward, batch 32, no HTTP) measured in this run.

Targets (issue 9): fastinfer >= 2x the plain endpoint's saturated throughput with a lower p99, and
>= 70% of the offline ceiling.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _harness import Bench

from fastinfer._cli.demo import _service
from fastinfer._cli.demo import model as demo_model
from fastinfer._cli.loadgen import LoadResult, closed_loop, open_loop


def offline_ceiling(
    texts: list[str], batch: int = 32, seconds: float = 5.0, *, swapped: bool = False
) -> float:
    """Items/s of tokenize + forward at full batches, no HTTP: what the cores can do.

    ``swapped=True`` measures the model as the fastinfer service runs it (attention swapped), a
    stricter ceiling than the model as built."""
    model, tok = demo_model.build_model(), demo_model.tokenizer()
    if swapped:
        import fastinfer

        enc = tok(texts[:batch])
        fastinfer.swap_attention_(model, example_inputs=(enc["input_ids"], enc["attention_mask"]))
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    with torch.inference_mode():
        for b in batches[:2]:
            enc = tok(b)
            model(enc["input_ids"], enc["attention_mask"])
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for b in batches:
                enc = tok(b)
                demo_model.postprocess(model(enc["input_ids"], enc["attention_mask"]))
                done += len(b)
    return done / (time.perf_counter() - t0)


def main() -> None:
    bench = Bench("bench_http", description="plain FastAPI endpoint vs fastinfer stack over HTTP")
    bench.add_argument("--rates", default="100,200,400", help="open-loop rates, requests/s")
    bench.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    args = bench.args
    rates = [float(r) for r in args.rates.split(",")]
    n_closed = 600 if bench.quick else 3000
    open_s = 4.0 if bench.quick else 15.0
    texts = demo_model.texts(1024, seed=11)
    bodies = [{"text": t} for t in texts]

    def payload(i: int) -> dict[str, str]:
        return bodies[i % len(bodies)]

    seconds = 3.0 if bench.quick else 8.0
    ceiling = offline_ceiling(texts, seconds=seconds)
    bench.add_value("offline", "model as built, full batches (no HTTP)", ceiling, unit="items/s")
    ceiling_swapped = offline_ceiling(texts, seconds=seconds, swapped=True)
    bench.add_value(
        "offline", "model attention-swapped, full batches", ceiling_swapped, unit="items/s"
    )

    saturated: dict[str, LoadResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = demo_model.save(Path(tmp) / "classifier.pt")
        for mode in ("plain", "fastinfer"):
            with _service(mode, ckpt) as url:
                target = f"{url}/predict"
                conc = args.concurrency
                asyncio.run(closed_loop(target, payload, concurrency=conc, requests=conc * 2))
                res = asyncio.run(
                    closed_loop(target, payload, concurrency=conc, requests=n_closed, label=mode)
                )
                saturated[mode] = res
                bench.add_value(
                    f"closed c={conc}", f"{mode} throughput", res.throughput, unit="req/s"
                )
                bench.add_value(f"closed c={conc}", f"{mode} p50", res.p50, unit="s")
                bench.add_value(f"closed c={conc}", f"{mode} p99", res.p99, unit="s")
                for rate in rates:
                    r = asyncio.run(
                        open_loop(target, payload, rate=rate, duration_seconds=open_s, label=mode)
                    )
                    case = f"open {rate:g}/s"
                    bench.add_value(case, f"{mode} achieved", r.throughput, unit="req/s")
                    bench.add_value(case, f"{mode} p50", r.p50, unit="s")
                    bench.add_value(case, f"{mode} p99", r.p99, unit="s")
                    errors = r.sent - r.ok
                    if errors:
                        bench.note(
                            f"{mode} at {rate:g}/s: {errors} of {r.sent} not 200: {r.statuses}"
                        )

    plain, fast = saturated["plain"], saturated["fastinfer"]
    bench.add_value(
        "targets",
        "fastinfer / plain throughput",
        fast.throughput / plain.throughput,
        unit="x",
        target=(">=", 2.0),
    )
    bench.add_value(
        "targets", "fastinfer p99 / plain p99", fast.p99 / plain.p99, unit="x", target=("<", 1.0)
    )
    bench.add_value(
        "targets",
        "fastinfer / offline ceiling",
        fast.throughput / ceiling,
        unit="x",
        target=(">=", 0.7),
    )
    bench.add_value(
        "targets", "fastinfer / swapped-model ceiling", fast.throughput / ceiling_swapped, unit="x"
    )
    bench.add_value("targets", "plain / offline ceiling", plain.throughput / ceiling, unit="x")
    bench.finish()


if __name__ == "__main__":
    main()

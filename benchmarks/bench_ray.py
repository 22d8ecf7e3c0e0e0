"""Inside Ray Serve: fastinfer's DynamicBatcher vs ``@serve.batch``, same cluster, same model.

    python benchmarks/bench_ray.py [--quick] [--json PATH] [--rates 200,500] [--seconds 12]

One local Ray cluster (``ray.init(num_cpus=2)``) runs two deployments of one replica each with
the same synthetic model (``fastinfer.testing.synthetic_batch_fn(10, 1)``: 10 ms + 1 ms per item,
run in a worker thread in both), the same ``max_batch_size=32``, the same wait (10 ms, Serve's
default ``batch_wait_timeout_s``) and the same ``max_ongoing_requests`` (1024, so Serve admits
enough requests into the replica for batches to fill). The driver sends open-loop Poisson arrivals
through each deployment's handle (bounded in time and count), variants interleaved, and measures
each request from send to result: p50/p99 and each replica's mean batch size.

Target (issue 10): fastinfer's p50 at 500 req/s <= 0.2x Ray's.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Bench

ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH = 32
WAIT_S = 0.010


def deployments(serve: Any) -> tuple[Any, Any]:
    """The two deployments (defined here so Ray pickles them by value)."""

    @serve.deployment(
        name="RayBatch", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.5}
    )
    class RayBatch:
        def __init__(self) -> None:
            from fastinfer.testing import synthetic_batch_fn

            self.fn = synthetic_batch_fn(10, 1)
            self.sizes: list[int] = []

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
        async def run(self, items: list[Any]) -> list[Any]:
            self.sizes.append(len(items))
            return await asyncio.to_thread(self.fn, items)

        async def __call__(self, x: Any) -> Any:
            return await self.run(x)

        def take_sizes(self) -> list[int]:
            out, self.sizes = self.sizes, []
            return out

    @serve.deployment(
        name="FastInfer", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.5}
    )
    class FastInfer:
        def __init__(self) -> None:
            from fastinfer.integrations.ray import FastInferReplica
            from fastinfer.testing import synthetic_batch_fn

            self.fi = FastInferReplica(name="synthetic", aggregator=None)
            self._seen: dict[int, int] = {}
            self.batcher = self.fi.batcher(
                synthetic_batch_fn(10, 1),
                max_batch_size=MAX_BATCH,
                max_wait_ms=WAIT_S * 1000,
            )

        async def __call__(self, x: Any) -> Any:
            return await self.batcher.submit(x)

        def take_sizes(self) -> list[int]:
            """Batch sizes since the last call (a diff of the batcher's size histogram)."""
            counts = dict(self.batcher.statistics().batch_size_counts)
            out = [k for k, v in counts.items() for _ in range(v - self._seen.get(k, 0))]
            self._seen = counts
            return out

    return RayBatch, FastInfer


async def open_loop(handle: Any, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``seconds`` (at most rate*seconds*1.2 requests)."""
    rng = random.Random(seed)
    cap = int(rate * seconds * 1.2)
    latencies: list[float] = []
    errors = 0
    wrong = 0

    async def one(i: int) -> None:
        nonlocal errors, wrong
        t0 = time.perf_counter()
        try:
            out = await handle.remote(i)
        except Exception:
            errors += 1
            return
        latencies.append(time.perf_counter() - t0)
        wrong += out != i

    tasks = []
    start = time.perf_counter()
    at = start
    i = 0
    while i < cap:
        at += rng.expovariate(rate)
        if at - start > seconds:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
        i += 1
    sent_s = time.perf_counter() - start
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    xs = sorted(latencies)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] if xs else float("nan")

    return {
        "sent": i,
        "ok": len(xs),
        "errors": errors,
        "wrong": wrong,
        "offered_rps": i / sent_s if sent_s else 0.0,
        "p50": q(0.50),
        "p99": q(0.99),
        "mean": statistics.fmean(xs) if xs else float("nan"),
    }


def main() -> None:
    bench = Bench("bench_ray", description="fastinfer DynamicBatcher vs @serve.batch in Ray Serve")
    bench.add_argument("--rates", default="200,500", help="open-loop rates, requests/s")
    bench.add_argument("--seconds", type=float, default=None, help="seconds per load run")
    bench.add_argument("--repeat", type=int, default=None, help="runs per variant and rate")
    args = bench.args
    rates = [float(r) for r in args.rates.split(",")]
    seconds = args.seconds or (4.0 if bench.quick else 12.0)
    repeat = args.repeat or (1 if bench.quick else 3)

    import ray
    from ray import serve

    t0 = time.perf_counter()
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",  # always a new local cluster, never someone else's
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    try:
        RayBatch, FastInfer = deployments(serve)
        handles = {
            "ray serve.batch": serve.run(RayBatch.bind(), name="raybatch", route_prefix=None),
            "fastinfer": serve.run(FastInfer.bind(), name="fastinfer", route_prefix=None),
        }
        bench.note(f"cluster + deployments up in {time.perf_counter() - t0:.1f}s")

        async def run_all() -> dict[tuple[str, float], list[dict[str, Any]]]:
            for h in handles.values():  # warm up routers and replicas
                await asyncio.gather(*(h.remote(i) for i in range(64)))
                await h.take_sizes.remote()
            results: dict[tuple[str, float], list[dict[str, Any]]] = {}
            seed = 0
            for rep in range(repeat):
                for rate in rates:
                    order = list(handles) if rep % 2 == 0 else list(reversed(handles))
                    for name in order:
                        seed += 1
                        res = await open_loop(handles[name], rate, seconds, seed)
                        sizes = await handles[name].take_sizes.remote()
                        res["mean_batch"] = statistics.fmean(sizes) if sizes else 0.0
                        results.setdefault((name, rate), []).append(res)
                        print(
                            f"{name:16s} {rate:5.0f}/s rep {rep}: p50 {res['p50'] * 1e3:7.1f} ms "
                            f"p99 {res['p99'] * 1e3:7.1f} ms batch {res['mean_batch']:5.1f} "
                            f"offered {res['offered_rps']:.0f}/s ok {res['ok']}/{res['sent']}",
                            flush=True,
                        )
            return results

        results = asyncio.run(run_all())
    finally:
        serve.shutdown()
        ray.shutdown()

    def med(name: str, rate: float, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, rate)])

    for rate in rates:
        base_p50 = med("ray serve.batch", rate, "p50")
        base_p99 = med("ray serve.batch", rate, "p99")
        for name in handles:
            p50, p99 = med(name, rate, "p50"), med(name, rate, "p99")
            is_fi = name == "fastinfer"
            target = ("<=", 0.2) if is_fi and rate == 500 else None
            bench.add_value(
                f"p50 @ {rate:g}/s",
                name,
                p50,
                unit="s",
                ratio=p50 / base_p50 if is_fi else None,
                target=target,
            )
            bench.add_value(
                f"p99 @ {rate:g}/s", name, p99, unit="s", ratio=p99 / base_p99 if is_fi else None
            )
            bench.add_value(f"mean batch @ {rate:g}/s", name, med(name, rate, "mean_batch"))
            bench.add_value(
                f"offered @ {rate:g}/s", name, med(name, rate, "offered_rps"), unit="req/s"
            )
            bad = sum(r["errors"] + r["wrong"] for r in results[(name, rate)])
            if bad:
                bench.note(f"{name} @ {rate:g}/s: {bad} failed or wrong responses")
    bench.note(
        f"{repeat} run(s) of {seconds:g}s per variant and rate, medians shown; 1 replica each, "
        f"max_batch_size={MAX_BATCH}, wait {WAIT_S * 1000:g} ms, max_ongoing_requests=1024"
    )
    bench.finish()


if __name__ == "__main__":
    main()

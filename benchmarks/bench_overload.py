"""HTTP overload at 10x capacity against the example service: fast rejections, bounded latency.

    python benchmarks/bench_overload.py [--quick] [--json PATH] [--factor 10] [--generators 2]

The service is ``examples/text_classification_service.py`` as shipped, run with uvicorn in its
own process on 127.0.0.1. Its queue is sized at start-up from the measured cost of a full batch
for its ``LATENCY_TARGET_MS`` (``svc.admission``), and after a ``QueueFull`` its route is shed at
the door. The run:

1. capacity: closed loop, 64 clients, the 200s per second;
2. overload: Poisson arrivals at ``factor`` x capacity for a while, from ``generators`` processes
   (aiohttp). Every request is counted: 200, 503 (with or without Retry-After), any other status,
   connection error or client timeout, or not sent because the generator itself was saturated;
   the server's own count of /predict requests (its HTTP metrics) must equal what was sent.

"before" runs the same example with its configuration on 75b60b0 (``max_queue_size=1024``, no
shedding at the door), at the same offered rate, for the comparison (skip it: ``--no-before``).

Targets (issue 17): rejections p99 <= 50 ms; accepted p99 within the configured latency target;
nothing lost. The load generator shares the machine's cores with the server, so on a small
machine it may not reach the offered rate: the achieved rate is reported.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _harness import Bench

from fastinfer._cli.loadgen import closed_loop
from fastinfer._common.quantiles import quantile

TEXTS = [f"review number {i} " + "rather good " * (i % 11) for i in range(512)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the service


def serve_before(port: int) -> None:
    """The example with its 75b60b0 configuration: queue limit 1024, no shedding at the door."""
    import uvicorn

    from fastinfer.integrations._limits import RequestLimits

    sys.path.insert(0, str(ROOT / "examples"))
    import text_classification_service as ex  # type: ignore[import-not-found]

    ex.svc.admission = lambda *a, **k: {"max_queue_size": 1024}
    for mw in ex.app.user_middleware:
        if mw.cls is RequestLimits:
            mw.kwargs["door"] = None
    uvicorn.run(ex.app, host="127.0.0.1", port=port, log_level="warning")


class Service:
    def __init__(self, variant: str) -> None:
        self.variant, self.port = variant, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if variant == "example":
            cmd = [sys.executable, "-m", "uvicorn", "examples.text_classification_service:app"]
            cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        else:
            cmd = [sys.executable, __file__, "--serve-before", str(self.port)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)

    def __enter__(self) -> Service:
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.variant} service exited with {self.proc.returncode}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200:
                    self.readiness = r.json()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the {self.variant} service was not ready after 300 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def predict_count(self) -> float:
        """The server's own count of /predict requests answered (its HTTP metrics)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "fastinfer_http_request_seconds_count"
            and s.labels.get("route") == "/predict"
        )

    def metric(self, name: str, **labels: str) -> float:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


# --------------------------------------------------------------------------- the load


def _generator(args: tuple[str, float, float, int, float]) -> dict[str, Any]:
    """One generator process: Poisson arrivals at ``rate`` for ``seconds``; every request's fate."""
    url, rate, seconds, seed, timeout = args
    import aiohttp

    async def run() -> dict[str, Any]:
        rng = random.Random(seed)
        records: list[tuple[int, float, bool]] = []  # (status or 0, seconds, Retry-After given)
        errors: Counter[str] = Counter()
        skipped = 0
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=4096)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as client:

            async def one(i: int) -> None:
                t0 = time.perf_counter()
                try:
                    async with client.post(url, json={"text": TEXTS[i % len(TEXTS)]}) as resp:
                        await resp.read()
                        records.append(
                            (resp.status, time.perf_counter() - t0, "Retry-After" in resp.headers)
                        )
                except Exception as exc:
                    errors[type(exc).__name__] += 1
                    records.append((0, time.perf_counter() - t0, False))

            t0 = time.perf_counter()
            next_at, i = t0, 0
            while next_at < t0 + seconds:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= 4096:
                    skipped += 1  # the generator is saturated: counted, not sent
                else:
                    task = asyncio.create_task(one(i))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
                next_at += rng.expovariate(rate)
            sending = time.perf_counter() - t0
            if tasks:
                await asyncio.gather(*tasks)
        return {
            "scheduled": i,
            "skipped": skipped,
            "records": records,
            "errors": dict(errors),
            "send_seconds": sending,
        }

    return asyncio.run(run())


def overload(
    url: str, rate: float, seconds: float, generators: int, timeout: float = 60.0
) -> dict[str, Any]:
    per = rate / generators
    ctx = mp.get_context("spawn")
    with ctx.Pool(generators) as pool:
        parts = pool.map(
            _generator, [(url, per, seconds, 1000 + k, timeout) for k in range(generators)]
        )
    records = [r for p in parts for r in p["records"]]
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    return {
        "scheduled": sum(p["scheduled"] for p in parts),
        "skipped": sum(p["skipped"] for p in parts),
        "sent": len(records),
        "records": records,
        "errors": dict(errors),
        "send_seconds": max(p["send_seconds"] for p in parts),
    }


def pct(xs: list[float], q: float) -> float:
    return quantile(sorted(xs), q) if xs else float("nan")


# --------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-before":
        serve_before(int(sys.argv[2]))
        return
    bench = Bench("bench_overload", description="HTTP overload at 10x capacity, example service")
    bench.add_argument("--factor", type=float, default=10.0, help="offered load / capacity")
    bench.add_argument("--generators", type=int, default=2, help="load generator processes")
    bench.add_argument("--no-before", action="store_true", help="skip the 75b60b0 configuration")
    args = bench.args
    seconds = 4.0 if bench.quick else 20.0
    n_capacity = 256 if bench.quick else 1500
    variants = ["example"] if args.no_before else ["example", "before"]

    capacity = None
    for variant in variants:
        with Service(variant) as svc:
            url = f"{svc.url}/predict"

            def payload(i: int) -> dict[str, str]:
                return {"text": TEXTS[i % len(TEXTS)]}

            if capacity is None:
                admission = next(iter(svc.readiness["admission"].values()))
                serving = next(iter(svc.readiness["serving"].values()))
                target_ms = admission["latency_target_ms"]
                bench.note(
                    f"example service: {serving.get('choice', serving['reason'])}; latency "
                    f"target {target_ms:g} ms, admission queue {admission['max_queue_size']} "
                    f"(measured batch of 32: {admission['batch_seconds'] * 1e3:.1f} ms)"
                )
                asyncio.run(closed_loop(url, payload, concurrency=64, requests=128))  # warm
                res = asyncio.run(
                    closed_loop(url, payload, concurrency=64, requests=n_capacity, label="cap")
                )
                capacity = res.throughput
                bench.add_value("capacity", "closed loop, 64 clients", capacity, unit="req/s")
            rate = args.factor * capacity
            before = svc.predict_count()
            shed_before = svc.metric("fastinfer_http_refused_total")
            out = overload(url, rate, seconds, args.generators)
            served = svc.predict_count() - before
            shed = svc.metric("fastinfer_http_refused_total") - shed_before

        statuses = Counter(s for s, _, _ in out["records"])
        ok = [t for s, t, _ in out["records"] if s == 200]
        rejected = [t for s, t, _ in out["records"] if s == 503]
        no_retry_after = sum(1 for s, _, ra in out["records"] if s == 503 and not ra)
        case = f"{variant} @ {args.factor:g}x"
        offered = out["scheduled"] / out["send_seconds"]
        achieved = out["sent"] / out["send_seconds"]
        bench.add_value(case, "offered (scheduled)", offered, unit="req/s")
        bench.add_value(case, "sent by the generators", achieved, unit="req/s")
        bench.add_value(case, "accepted (200)", len(ok), unit="requests")
        bench.add_value(case, "rejected (503)", len(rejected), unit="requests")
        bench.add_value(case, "shed at the door", shed, unit="requests")
        bench.add_value(case, "rejection p50", pct(rejected, 0.5), unit="s")
        bench.add_value(case, "rejection p99", pct(rejected, 0.99), unit="s", target=("<=", 0.050))
        bench.add_value(case, "accepted p50", pct(ok, 0.5), unit="s")
        bench.add_value(
            case, "accepted p99", pct(ok, 0.99), unit="s", target=("<=", target_ms / 1000)
        )
        lost = out["sent"] - sum(statuses.values())
        other = {k: v for k, v in statuses.items() if k not in (200, 503)}
        bench.add_value(
            case,
            "lost: sent - answered + errors + other statuses",
            lost + sum(other.values()),
            unit="requests",
            target=("<=", 0),
        )
        bench.add_value(
            case,
            "server count - sent (0: the server saw each)",
            served - out["sent"],
            unit="requests",
        )
        bench.note(
            f"{case}: scheduled {out['scheduled']}, not sent (generator saturated) "
            f"{out['skipped']}, sent {out['sent']}, statuses {dict(statuses)}, "
            f"client errors {out['errors']}, 503 without Retry-After {no_retry_after}, "
            f"server counted {served:.0f}"
        )
    bench.finish()


if __name__ == "__main__":
    main()

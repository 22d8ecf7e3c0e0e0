"""HTTP load generation for the demo and ``benchmarks/bench_http.py`` (a real client: aiohttp).

aiohttp, not httpx: measured here against one trivial endpoint, httpx's async pool delivered 420,
268 and 143 requests/s at 1, 16 and 64 connections (it degrades as connections grow), aiohttp
936, 989 and 1157. A load generator slower than the server measures the generator.

Two shapes of load:

- closed loop: ``concurrency`` callers, each sends its next request when the last one returned
  (throughput at a given concurrency; what a load test tool such as wrk does);
- open loop: Poisson arrivals at ``rate`` requests/s regardless of how fast the server answers
  (latency at a given offered load; the honest way to measure queueing).

Both are bounded in requests and time and stop by themselves; they only target the URL given
(the demo and benchmarks pass a localhost URL).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastinfer._common.quantiles import quantile
from fastinfer._optional import require

Payload = Callable[[int], Any]  # request number -> JSON body


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured. Latencies in seconds; only successful requests count in them."""

    label: str
    sent: int
    ok: int
    statuses: dict[int, int]
    duration_seconds: float
    latencies: tuple[float, ...] = field(repr=False)

    @property
    def throughput(self) -> float:
        """Successful requests per second over the run."""
        return self.ok / self.duration_seconds if self.duration_seconds else 0.0

    def latency_at(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the latencies (the shared definition)."""
        if not self.latencies:
            return float("nan")
        return quantile(sorted(self.latencies), q / 100)

    @property
    def p50(self) -> float:
        return self.latency_at(50)

    @property
    def p99(self) -> float:
        return self.latency_at(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies) if self.latencies else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "sent": self.sent,
            "ok": self.ok,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "duration_seconds": self.duration_seconds,
            "throughput_rps": self.throughput,
            "p50_s": self.p50,
            "p99_s": self.p99,
            "mean_s": self.mean,
        }


async def _one(client: Any, url: str, body: Any, lat: list[float], statuses: Counter[int]) -> None:
    t0 = time.perf_counter()
    try:
        async with client.post(url, json=body) as resp:
            await resp.read()
            code = resp.status
    except Exception:
        code = 0  # connection error or client timeout
    statuses[code] += 1
    if code == 200:
        lat.append(time.perf_counter() - t0)


def _client(concurrency: int, timeout: float) -> Any:
    aiohttp = require("aiohttp", purpose="the HTTP load generator")
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def closed_loop(
    url: str,
    payload: Payload,
    *,
    concurrency: int,
    requests: int,
    max_seconds: float = 60.0,
    timeout: float = 30.0,
    label: str = "",
    on_done: Callable[[], None] | None = None,
) -> LoadResult:
    """``concurrency`` callers send ``requests`` requests in total (or stop after ``max_seconds``)."""
    lat: list[float] = []
    statuses: Counter[int] = Counter()
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async with _client(concurrency, timeout) as client:

        async def caller() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                await _one(client, url, payload(i), lat, statuses)
                if on_done:
                    on_done()

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    return LoadResult(
        label, sum(statuses.values()), statuses[200], dict(statuses), duration, tuple(lat)
    )


async def open_loop(
    url: str,
    payload: Payload,
    *,
    rate: float,
    duration_seconds: float,
    seed: int = 0,
    timeout: float = 30.0,
    max_in_flight: int = 2048,
    label: str = "",
) -> LoadResult:
    """Poisson arrivals at ``rate``/s for ``duration_seconds``; waits for the stragglers, then returns."""
    rng = random.Random(seed)
    lat: list[float] = []
    statuses: Counter[int] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    async with _client(max_in_flight, timeout) as client:
        t0 = time.perf_counter()
        next_at, i = t0, 0
        while next_at < t0 + duration_seconds:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                statuses[-1] += 1  # the generator itself is saturated: count, do not send
            else:
                task = asyncio.create_task(_one(client, url, payload(i), lat, statuses))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
            next_at += rng.expovariate(rate)
        if tasks:
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return LoadResult(
        label, sum(statuses.values()), statuses[200], dict(statuses), duration, tuple(lat)
    )

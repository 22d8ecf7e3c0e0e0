"""Metrics recorder: cost of one histogram observation against prometheus_client, and merge time.

    python benchmarks/bench_metrics.py [--quick] [--json PATH]

Cases (all in one run, trials interleaved):
- observe, 1 thread: ``prometheus_client.Histogram.observe`` vs ``fastinfer`` (default latency
  buckets) and ``fastinfer-loglinear`` (1089 high-resolution buckets). Target: fastinfer <= 0.5x
  prometheus_client's time (speed-up >= 2).
- observe, 4 threads: the same with four threads observing into one histogram at once.
- merge: a parent merging 8 workers' deltas of 50 series each (20 histogram series, 20 counters,
  10 gauges). Target < 5 ms.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import Bench, compare, summarize

from fastinfer.metrics import LogLinearBuckets, MetricsRecorder

bench = Bench("metrics", description="histogram observe cost vs prometheus_client; merge time")
QUICK = bench.quick
N = 20_000 if QUICK else 100_000  # observations per trial per thread
REPEAT = 5 if QUICK else 15

rng = random.Random(0)
VALUES = [rng.lognormvariate(-4.0, 1.5) for _ in range(N)]  # latencies around 18 ms


def observers() -> dict[str, Callable[[float], None]]:
    from prometheus_client import CollectorRegistry, Histogram

    prom = Histogram("bench_latency_seconds", "latency", registry=CollectorRegistry())
    rec = MetricsRecorder()
    fast = rec.histogram("bench_latency_seconds", "latency")
    fine = rec.histogram("bench_fine_latency_seconds", "latency", buckets=LogLinearBuckets())
    return {
        "prometheus_client": prom.observe,
        "fastinfer": fast.observe,
        "fastinfer-loglinear": fine.observe,
    }


def loop(observe: Callable[[float], None]) -> Callable[[], None]:
    values = VALUES

    def run() -> None:
        for v in values:
            observe(v)

    return run


class Threaded:
    """``threads`` persistent threads that each run ``fn`` once per round."""

    def __init__(self, fn: Callable[[], None], threads: int) -> None:
        self.fn = fn
        self.start = threading.Barrier(threads + 1)
        self.done = threading.Barrier(threads + 1)
        self.stop = False
        self.pool = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for t in self.pool:
            t.start()

    def _work(self) -> None:
        while True:
            self.start.wait()
            if self.stop:
                return
            self.fn()
            self.done.wait()

    def __call__(self) -> None:
        self.start.wait()
        self.done.wait()

    def close(self) -> None:
        self.stop = True
        self.start.wait()
        for t in self.pool:
            t.join()


def per_observation(comparison_stats: dict[str, float], n: int) -> dict[str, float]:
    return {k: v / n for k, v in comparison_stats.items()}


def bench_observe() -> None:
    obs = observers()
    c = compare({k: loop(f) for k, f in obs.items()}, baseline="prometheus_client", repeat=REPEAT)
    # rows are per observation: scale the comparison by N
    scaled = type(c)(
        c.baseline,
        {k: _scale(s, N) for k, s in c.stats.items()},
        {k: [x / N for x in v] for k, v in c.samples.items()},
    )
    bench.add(scaled, case="observe, 1 thread", target=("fastinfer", ">=", 2.0))

    obs = observers()
    runners = {k: Threaded(loop(f), 4) for k, f in obs.items()}
    try:
        c4 = compare(runners, baseline="prometheus_client", repeat=REPEAT)  # type: ignore[arg-type]
    finally:
        for r in runners.values():
            r.close()
    total = 4 * N
    scaled4 = type(c4)(
        c4.baseline,
        {k: _scale(s, total) for k, s in c4.stats.items()},
        {k: [x / total for x in v] for k, v in c4.samples.items()},
    )
    bench.add(scaled4, case="observe, 4 threads", target=("fastinfer", ">=", 2.0))
    # the no-lost-counts check, on the benchmark's own numbers
    snap_counts = {
        k: f.__self__._read()[0]
        if hasattr(f, "__self__") and hasattr(f.__self__, "_read")
        else None
        for k, f in obs.items()
    }
    for k, counts in snap_counts.items():
        if counts is not None:
            expected = 4 * N * (REPEAT + 2)  # 2 warm-up rounds
            assert sum(counts) == expected, (k, sum(counts), expected)


def _scale(stats, n):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(
        stats,
        median=stats.median / n,
        mean=stats.mean / n,
        minimum=stats.minimum / n,
        maximum=stats.maximum / n,
        q1=stats.q1 / n,
        q3=stats.q3 / n,
    )


def worker_deltas(workers: int, *, loglinear: bool) -> list:  # type: ignore[type-arg]
    """Each worker: 20 histogram series, 20 counter series, 10 gauges, all changed."""
    out = []
    r = random.Random(1)
    buckets = LogLinearBuckets() if loglinear else None
    for _ in range(workers):
        rec = MetricsRecorder()
        h = rec.histogram("w_latency_seconds", labels=("route",), buckets=buckets)
        c = rec.counter("w_requests_total", labels=("route",))
        g = rec.gauge("w_depth", labels=("route",), merge="sum")
        for i in range(20):
            for _ in range(200):
                h.labels(i).observe(r.lognormvariate(-4, 1.5))
            c.labels(i).inc(r.randint(1, 100))
        for i in range(10):
            g.labels(i).set(r.random())
        out.append(rec.collect_delta())
    return out


def bench_merge() -> None:
    for loglinear in (False, True):
        deltas = worker_deltas(8, loglinear=loglinear)
        series = sum(len(m.series) for d in deltas for m in d.metrics.values())
        assert series == 8 * 50
        samples = []
        for _ in range(5 if QUICK else 30):
            parent = MetricsRecorder()
            t0 = time.perf_counter()
            for i, d in enumerate(deltas):
                parent.merge(d, worker=str(i))
            samples.append(time.perf_counter() - t0)
        st = summarize(samples)
        label = "8 workers x 50 series" + (", log-linear" if loglinear else "")
        bench.add_value(
            f"merge ({label})",
            "fastinfer",
            st.median * 1e3,
            unit="ms",
            target=("<", 5.0),
        )
        merged = parent.snapshot()
        assert merged["w_latency_seconds"].get(route=0).count == 8 * 200  # type: ignore[union-attr]


def main() -> None:
    bench_observe()
    bench_merge()
    bench.note(
        "observe rows are time per observation (median of trials of "
        f"{N} observations per thread); ratio = prometheus_client time / variant time, "
        "so >= 2.0x means <= 0.5x prometheus_client's cost"
    )
    bench.note("the machine is shared with other work: only ratios within this run mean anything")
    bench.finish()


if __name__ == "__main__":
    main()

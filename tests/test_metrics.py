"""Metrics recorder: exact values under threads, percentile accuracy, exposition, merges, tracking."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import math
import multiprocessing as mp
import pickle
import random
import re
import sys
import threading
import types
import weakref
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastinfer
from fastinfer import CardinalityError, ConfigError, MetricNameError, MetricsRecorder
from fastinfer import metrics as fm
from fastinfer._common import export as ex
from fastinfer.metrics import LogLinearBuckets, MetricsSnapshot, standard_metrics

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Instruments
# --------------------------------------------------------------------------------------------


def test_counter_gauge_histogram_values() -> None:
    rec = MetricsRecorder()
    c = rec.counter("app_requests_total", "requests", labels=("outcome",))
    c.labels("ok").inc()
    c.labels(outcome="ok").inc(2)
    c.labels("failed").inc()
    g = rec.gauge("app_queue_depth", "depth")
    g.set(5)
    g.inc()
    g.dec(3)
    h = rec.histogram("app_latency_seconds", "latency")
    for v in (0.001, 0.002, 0.5):
        h.observe(v)
    snap = rec.snapshot()
    assert snap.value("app_requests_total", outcome="ok") == 3
    assert snap.value("app_requests_total", outcome="failed") == 1
    assert snap.value("app_queue_depth") == 3
    s = snap["app_latency_seconds"].get()
    assert s is not None
    assert (s.count, s.min, s.max) == (3, 0.001, 0.5)
    assert s.sum == pytest.approx(0.503)
    assert s.mean == pytest.approx(0.503 / 3)
    assert snap["app_latency_seconds"].unit == "seconds"
    assert snap["app_latency_seconds"].buckets == fm.DEFAULT_LATENCY_BUCKETS
    assert sum(s.bucket_counts) == 3
    # a value equal to a bound lands in that bucket (Prometheus "le")
    idx = fm.DEFAULT_LATENCY_BUCKETS.index(0.001)
    assert s.bucket_counts[idx] == 1


def test_get_or_create_returns_same_metric_and_refuses_a_different_definition() -> None:
    rec = MetricsRecorder()
    a = rec.histogram("x_seconds", labels=("model",))
    assert rec.histogram("x_seconds", labels=("model",)) is a
    with pytest.raises(ConfigError, match="already exists as histogram"):
        rec.histogram("x_seconds", labels=("other",))
    with pytest.raises(ConfigError, match="already exists"):
        rec.gauge("x_seconds")
    assert rec.get("x_seconds") is a
    with pytest.raises(KeyError, match="no metric 'nope'"):
        rec.get("nope")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.counter("1bad_total"), "invalid metric name"),
        (lambda r: r.counter("bad-name_total"), "invalid metric name"),
        (lambda r: r.gauge("__x"), "reserved"),
        (lambda r: r.gauge("ok_gauge", labels=("bad-label",)), "invalid label name"),
        (lambda r: r.gauge("ok_gauge", labels=("__x",)), "invalid label name"),
        (lambda r: r.histogram("h_seconds", labels=("le",)), "reserved for histogram"),
        (lambda r: r.gauge("ok_gauge", labels=("a", "a")), "repeats label names"),
        (lambda r: r.histogram("latency_ms"), "record base units"),
        (lambda r: r.histogram("latency", unit="milliseconds"), "record base units"),
        (lambda r: r.histogram("latency", unit="seconds"), "does not end in '_seconds'"),
        (lambda r: r.timer("step_time"), "must end in '_seconds'"),
    ],
    ids=[
        "digit-start",
        "dash",
        "dunder",
        "label-dash",
        "label-dunder",
        "le",
        "dupe-labels",
        "ms-suffix",
        "ms-unit",
        "unit-suffix",
        "timer-name",
    ],
)
def test_names_and_labels_follow_prometheus_rules(call, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MetricNameError, match=match):
        call(MetricsRecorder())


def test_sample_name_collisions_are_refused() -> None:
    rec = MetricsRecorder()
    rec.histogram("x_seconds")
    with pytest.raises(MetricNameError, match="already exposes"):
        rec.counter("x_seconds_count")
    rec.counter("jobs_total")
    with pytest.raises(MetricNameError, match="already exposes"):
        rec.gauge("jobs")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.counter("c_total").inc(-1), "can only go up"),
        (lambda r: r.counter("c_total").inc(float("nan")), "can only go up"),
        (lambda r: r.histogram("h_seconds").observe(float("nan")), "not NaN"),
        (lambda r: r.histogram("h_seconds").observe("fast"), "real Python number"),
        (lambda r: r.counter("c_total", labels=("a",)).inc(), r"use c_total.labels\(...\)"),
        (lambda r: r.histogram("h_seconds", labels=("a",)).observe(1), "labels"),
        (lambda r: r.counter("c_total", labels=("a",)).labels(), "got 0 values"),
        (lambda r: r.counter("c_total", labels=("a",)).labels(b=1), "has labels"),
        (lambda r: r.counter("c_total").labels("x"), "has no labels"),
        (lambda r: r.histogram("h_seconds", buckets=[1, 1]), "strictly increasing"),
        (lambda r: r.histogram("h_seconds", buckets="fine"), "not understood"),
        (lambda r: r.gauge("g", merge="avg"), "merge must be one of"),
        (lambda r: r.counter("c_total", labels="outcome"), "write labels="),
        (lambda r: MetricsRecorder(max_series=0), "positive int"),
        (lambda r: LogLinearBuckets(per_octave=3), "power of two"),
        (lambda r: LogLinearBuckets(low=2, high=1), "0 < low < high"),
    ],
    ids=[
        "neg-inc",
        "nan-inc",
        "nan-observe",
        "str-observe",
        "labelled-inc",
        "labelled-observe",
        "few-values",
        "wrong-names",
        "no-labels",
        "buckets-order",
        "buckets-str",
        "merge-mode",
        "labels-str",
        "max-series",
        "per-octave",
        "low-high",
    ],
)
def test_bad_input_raises_config_error(call, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=match):
        call(MetricsRecorder())


def test_cardinality_limit_names_metric_limit_and_fix() -> None:
    rec = MetricsRecorder(max_series=3)
    c = rec.counter("hits_total", labels=("user",))
    for u in range(3):
        c.labels(u).inc()
    c.labels(0).inc()  # an existing label set is always fine
    with pytest.raises(CardinalityError) as info:
        c.labels(99).inc()
    msg = str(info.value)
    assert "'hits_total'" in msg and "max_series=3" in msg and "user" in msg
    assert "raise the limit" in msg and "unbounded" in msg
    wide = rec.counter("wide_total", labels=("k",), max_series=10)
    for k in range(10):
        wide.labels(k).inc()
    with pytest.raises(CardinalityError):
        wide.labels("one-more")
    assert rec.statistics().series == 3 + 10


# --------------------------------------------------------------------------------------------
# Concurrency: no lost counts
# --------------------------------------------------------------------------------------------


def test_concurrent_observations_lose_no_counts() -> None:
    rec = MetricsRecorder()
    h = rec.histogram("c_seconds", labels=("kind",))
    c = rec.counter("c_total")
    g = rec.gauge("c_gauge")
    threads, per_thread = 8, 20_000
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            series = h.labels("shared")  # every thread races to create the same series
            barrier.wait()
            for j in range(per_thread):
                series.observe((j % 7) * 0.001)
                c.inc()
                g.inc()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    snap = rec.snapshot()
    total = threads * per_thread
    s = snap["c_seconds"].get(kind="shared")
    assert s is not None and s.count == total and sum(s.bucket_counts) == total
    assert s.sum == pytest.approx(threads * sum((j % 7) * 0.001 for j in range(per_thread)))
    assert snap.value("c_total") == total
    assert snap.value("c_gauge") == total
    assert len(snap["c_seconds"].series) == 1


def test_thread_churn_folds_shards_and_keeps_every_count() -> None:
    rec = MetricsRecorder()
    h = rec.histogram("churn_seconds")
    series = h._unlabelled()

    def work(observe: Callable[[float], None] = h.observe) -> None:
        for _ in range(10):
            observe(0.01)

    for _ in range(30):  # one short-lived thread per "request"
        t = threading.Thread(target=work)
        t.start()
        t.join()
    h.observe(0.02)  # this thread keeps its shard
    assert len(series._shards) <= 2  # finished threads' shards were folded into the base
    s = rec.snapshot()["churn_seconds"].get()
    assert s is not None and s.count == 301 and s.max == 0.02
    assert s.sum == pytest.approx(3.02)
    ref = weakref.ref(series)
    del rec, h, series, s, work, t
    gc.collect()
    assert ref() is None  # this thread's shard does not keep a dropped recorder alive


# --------------------------------------------------------------------------------------------
# Percentiles
# --------------------------------------------------------------------------------------------

_DISTS = {
    "lognormal": lambda rng, n: rng.lognormal(-4.0, 1.2, n),
    "uniform": lambda rng, n: rng.uniform(0.001, 0.2, n),
    "exponential": lambda rng, n: rng.exponential(0.05, n) + 1e-5,
    "bimodal": lambda rng, n: np.concatenate(
        [rng.normal(0.01, 0.001, n // 2).clip(1e-4), rng.normal(0.8, 0.05, n - n // 2)]
    ),
    "pareto": lambda rng, n: (rng.pareto(1.5, n) + 1) * 0.002,
}


@pytest.mark.parametrize("dist", list(_DISTS), ids=list(_DISTS))
@pytest.mark.parametrize("n", [200, 30_000], ids=["n200", "n30k"])
def test_log_linear_percentiles_within_two_percent_of_numpy(dist: str, n: int) -> None:
    rng = np.random.default_rng(abs(hash((dist, n))) % 2**32)
    values = _DISTS[dist](rng, n)
    rng.shuffle(values)
    rec = MetricsRecorder()
    buckets = LogLinearBuckets()
    h = rec.histogram("d_seconds", buckets=buckets)
    for v in values.tolist():
        h.observe(v)
    s = rec.snapshot()["d_seconds"].get()
    assert s is not None and s.count == n
    assert buckets.relative_error <= 0.02
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        want = float(np.percentile(values, q))
        got = getattr(s, key)
        assert abs(got - want) <= buckets.relative_error * want + 1e-12, (key, got, want)
    assert s.min == values.min() and s.max == values.max()
    assert s.sum == pytest.approx(values.sum(), rel=1e-9)


def test_coarse_bucket_percentiles_are_bounded_and_ordered() -> None:
    rng = np.random.default_rng(1)
    values = rng.lognormal(-3, 1, 5000)
    rec = MetricsRecorder()
    h = rec.histogram("d_seconds")
    for v in values.tolist():
        h.observe(v)
    s = rec.snapshot()["d_seconds"].get()
    assert s is not None and s.min is not None and s.max is not None
    ps = [s.p50, s.p90, s.p99, s.p999]
    assert ps == sorted(ps)
    assert all(s.min <= p <= s.max for p in ps)  # type: ignore[operator]
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        want = float(np.percentile(values, q))
        idx = np.searchsorted(fm.DEFAULT_LATENCY_BUCKETS, want)  # right bucket at least
        lo = fm.DEFAULT_LATENCY_BUCKETS[idx - 1] if idx else s.min
        hi = fm.DEFAULT_LATENCY_BUCKETS[idx] if idx < len(fm.DEFAULT_LATENCY_BUCKETS) else s.max
        assert lo <= getattr(s, key) <= hi, key
    one = MetricsRecorder()
    h1 = one.histogram("one_seconds")
    for _ in range(10):
        h1.observe(0.3)
    s1 = one.snapshot()["one_seconds"].get()
    assert s1 is not None and s1.p50 == s1.p999 == 0.3  # clamped to min == max


def test_log_linear_bounds_are_exact_and_cover_the_range() -> None:
    b = LogLinearBuckets(low=1e-6, high=100, per_octave=16)
    bounds = b.bounds()
    assert bounds[0] == 2.0**-20 and bounds[-1] == 2.0**7
    assert all(x < y for x, y in itertools.pairwise(bounds))
    assert set(b.export_bounds()) <= set(bounds)
    assert b.relative_error == 1 / 32
    assert LogLinearBuckets().bounds() == LogLinearBuckets().bounds()  # same in every process


# --------------------------------------------------------------------------------------------
# Snapshot: frozen plain data, table, dict/JSON
# --------------------------------------------------------------------------------------------


def _sample_recorder() -> MetricsRecorder:
    rec = MetricsRecorder(clock=lambda: 1234.5)
    rec.counter("s_requests_total", "reqs", labels=("outcome",)).labels("ok").inc(4)
    rec.gauge("s_depth", "depth").set(2.5)
    h = rec.histogram("s_latency_seconds", "lat", labels=("model",))
    for v in (0.002, 0.004, 0.2):
        h.labels("bert").observe(v)
    rec.histogram("s_batch_size", "sizes").observe(8)
    return rec


def test_snapshot_is_frozen_plain_data_and_round_trips_through_json() -> None:
    snap = _sample_recorder().snapshot()
    assert snap.time == 1234.5 and not snap.delta
    with pytest.raises(FrozenInstanceError):
        snap.time = 0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        snap["s_depth"].series[0].value = 1  # type: ignore[misc]
    doc = json.loads(snap.to_json())
    assert doc["metrics"]["s_requests_total"]["series"][0] == {
        "labels": {"outcome": "ok"},
        "value": 4,
    }
    lat = doc["metrics"]["s_latency_seconds"]["series"][0]
    assert lat["count"] == 3 and lat["labels"] == {"model": "bert"}
    back = MetricsSnapshot.from_dict(doc)
    assert back == snap
    assert pickle.loads(pickle.dumps(snap)) == snap
    with pytest.raises(ConfigError, match="not a MetricsSnapshot"):
        MetricsSnapshot.from_dict({"metrics": {"x": {}}})


def test_snapshot_prints_a_table_and_html() -> None:
    snap = _sample_recorder().snapshot()
    text = str(snap)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["metric", "labels", "kind", "count/value"]
    row = next(line for line in lines if line.startswith("s_latency_seconds"))
    assert "model=bert" in row and "ms" in row and " 3 " in row
    assert "s_depth" in text and "2.5" in text
    html = snap._repr_html_()
    assert html.startswith("<table>") and "s_latency_seconds" in html
    assert str(MetricsRecorder().snapshot()) == "(no metrics)"


def test_plot_draws_each_histogram() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _sample_recorder().snapshot().plot()
    try:
        assert len(fig.axes) == 2
        assert "s_latency_seconds" in fig.axes[0].get_title()
        assert "s_batch_size" in fig.axes[1].get_title()
    finally:
        plt.close(fig)
    with pytest.raises(ConfigError, match="no histogram named"):
        _sample_recorder().snapshot().plot(["nope"])


# --------------------------------------------------------------------------------------------
# Timer
# --------------------------------------------------------------------------------------------


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timer_context_manager_and_decorator(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _FakeClock()
    monkeypatch.setattr(fm._timer.time, "perf_counter", clock)
    rec = MetricsRecorder()
    with rec.timer("t_block_seconds") as t:
        clock.now += 0.25
    assert t.elapsed == 0.25

    @rec.timer("t_call_seconds", labels={"route": "/x"})
    def handler(fail: bool = False) -> str:
        clock.now += 0.5
        if fail:
            raise RuntimeError("boom")
        return "ok"

    @rec.timer("t_async_seconds")
    async def ahandler() -> int:
        clock.now += 2.0
        return 7

    assert handler() == "ok"
    with pytest.raises(RuntimeError):
        handler(fail=True)  # a failing call is still timed
    assert asyncio.run(ahandler()) == 7
    timer = rec.histogram("t_nested_seconds").time()
    with timer:  # the same timer nests within one thread
        clock.now += 1
        with timer:
            clock.now += 1
    snap = rec.snapshot()
    assert snap["t_block_seconds"].get().sum == 0.25  # type: ignore[union-attr]
    call = snap["t_call_seconds"].get(route="/x")
    assert call is not None and call.count == 2 and call.sum == 1.0
    assert snap["t_async_seconds"].get().sum == 2.0  # type: ignore[union-attr]
    nested = snap["t_nested_seconds"].get()
    assert nested is not None and (nested.min, nested.max) == (1.0, 2.0)


def test_timer_cuda_sync_is_a_no_op_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rec = MetricsRecorder()
    with rec.timer("cpu_seconds", cuda_sync=True):
        torch.ones(8).sum()
    with rec.timer("cpu_seconds", cuda_sync="events"):
        pass
    assert rec.snapshot()["cpu_seconds"].get().count == 2  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="cuda_sync"):
        rec.timer("cpu_seconds", cuda_sync="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [True, "events"], ids=["sync", "events"])
def test_timer_cuda_sync_counts_queued_device_work(mode: bool | str) -> None:
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    rec = MetricsRecorder()
    with rec.timer("gpu_seconds", cuda_sync=mode) as synced:  # type: ignore[arg-type]
        for _ in range(20):
            a = a @ a / 64
    with rec.timer("gpu_nosync_seconds") as unsynced:
        for _ in range(20):
            a = a @ a / 64
    torch.cuda.synchronize()
    assert synced.elapsed is not None and unsynced.elapsed is not None
    # 20 4096^3 matmuls take milliseconds on any GPU; launching them alone takes far less
    assert synced.elapsed > 2 * unsynced.elapsed


# --------------------------------------------------------------------------------------------
# Prometheus export
# --------------------------------------------------------------------------------------------


def _families(text: str) -> dict[str, object]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(fam: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}  # type: ignore[attr-defined]


@pytest.mark.serve
def test_exposition_parses_back_with_exact_values() -> None:
    rec = _sample_recorder()
    fams = _families(rec.exposition())
    assert fams["s_requests"].type == "counter"  # type: ignore[attr-defined]
    assert _samples(fams["s_requests"])[("s_requests_total", (("outcome", "ok"),))] == 4
    assert _samples(fams["s_depth"])[("s_depth", ())] == 2.5
    lat = _samples(fams["s_latency_seconds"])
    m = (("model", "bert"),)
    assert lat[("s_latency_seconds_count", m)] == 3
    assert lat[("s_latency_seconds_sum", m)] == pytest.approx(0.206)
    assert lat[("s_latency_seconds_bucket", (("le", "0.0025"), *m))] == 1
    assert lat[("s_latency_seconds_bucket", (("le", "0.005"), *m))] == 2
    assert lat[("s_latency_seconds_bucket", (("le", "0.25"), *m))] == 3
    assert lat[("s_latency_seconds_bucket", (("le", "+Inf"), *m))] == 3
    assert fams["s_latency_seconds"].documentation == "lat"  # type: ignore[attr-defined]
    assert "# UNIT s_latency_seconds seconds" in rec.exposition(openmetrics=True)


@pytest.mark.serve
def test_collector_plugs_into_any_registry_and_sees_later_changes() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    rec = MetricsRecorder()
    registry = CollectorRegistry()
    rec.register(registry)
    c = rec.counter("late_total")  # created after registering
    c.inc(3)
    assert _samples(_families(generate_latest(registry).decode())["late"])[("late_total", ())] == 3
    c.inc()
    assert _samples(_families(generate_latest(registry).decode())["late"])[("late_total", ())] == 4
    other = CollectorRegistry()
    other.register(rec.collector())
    assert b"late_total 4.0" in generate_latest(other)


@pytest.mark.serve
def test_log_linear_histograms_export_power_of_two_buckets() -> None:
    rec = MetricsRecorder()
    h = rec.histogram("ll_seconds", buckets=LogLinearBuckets(low=2**-10, high=2**2))
    values = [0.003, 0.01, 0.01, 0.3, 1.5, 9.0]
    for v in values:
        h.observe(v)
    fam = _families(rec.exposition())["ll_seconds"]
    buckets = {
        s.labels["le"]: s.value
        for s in fam.samples  # type: ignore[attr-defined]
        if s.name.endswith("_bucket")
    }
    assert len(buckets) == 13 + 1  # 2**-10 .. 2**2 and +Inf
    for le, count in buckets.items():
        bound = math.inf if le == "+Inf" else float(le)
        assert count == sum(v <= bound for v in values), le


# --------------------------------------------------------------------------------------------
# Merging across processes
# --------------------------------------------------------------------------------------------


def test_deltas_merge_exactly_and_duplicates_are_ignored() -> None:
    parent = MetricsRecorder()
    w1, w2 = MetricsRecorder(), MetricsRecorder()
    everything = MetricsRecorder()  # records what both workers record, for comparison
    rng = random.Random(0)
    for rnd in range(3):
        for w in (w1, w2):
            for _ in range(50):
                v = rng.lognormvariate(-4, 1)
                out = rng.choice(["ok", "failed"])
                for r in (w, everything):
                    r.histogram("m_latency_seconds", labels=("model",)).labels("a").observe(v)
                    r.counter("m_requests_total", labels=("outcome",)).labels(out).inc()
            w.gauge("m_depth", merge="sum").set(rnd + (1 if w is w1 else 10))
        d1, d2 = w1.collect_delta(), w2.collect_delta()
        assert parent.merge(pickle.loads(pickle.dumps(d1)), worker="w1")
        assert parent.merge(MetricsSnapshot.from_dict(json.loads(d2.to_json())), worker="w2")
        assert not parent.merge(d1, worker="w1")  # a resent delta is ignored
    got, want = parent.snapshot(), everything.snapshot()
    gl, wl = got["m_latency_seconds"].get(model="a"), want["m_latency_seconds"].get(model="a")
    assert gl is not None and wl is not None
    assert gl.bucket_counts == wl.bucket_counts
    assert (gl.count, gl.min, gl.max, gl.p50, gl.p99) == (wl.count, wl.min, wl.max, wl.p50, wl.p99)
    assert gl.sum == pytest.approx(wl.sum, rel=1e-12)
    for out in ("ok", "failed"):
        assert got.value("m_requests_total", outcome=out) == want.value(
            "m_requests_total", outcome=out
        )
    assert got.value("m_depth") == (2 + 1) + (2 + 10)  # merge="sum" of the last values
    st = parent.statistics()
    assert (st.deltas_merged, st.duplicate_deltas_ignored, st.workers) == (6, 3, 2)
    empty = w1.collect_delta()
    assert empty.metrics == {} and parent.merge(empty, worker="w1")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # which worker records it
            st.floats(1e-6, 100.0),  # the observation
            st.booleans(),  # ship a delta after it
        ),
        max_size=80,
    ),
    st.sampled_from(["default", "log-linear"]),
)
def test_merge_of_any_split_equals_recording_in_one_place(
    events: list[tuple[int, float, bool]], buckets: str
) -> None:
    spec = None if buckets == "default" else "log-linear"
    workers = [MetricsRecorder() for _ in range(3)]
    parent, reference = MetricsRecorder(), MetricsRecorder()
    reference.histogram("h_seconds", buckets=spec)
    for w in workers:
        w.histogram("h_seconds", buckets=spec)
    for who, value, ship in events:
        workers[who].histogram("h_seconds", buckets=spec).observe(value)
        workers[who].counter("n_total").inc()
        reference.histogram("h_seconds", buckets=spec).observe(value)
        if ship:
            parent.merge(workers[who].collect_delta(), worker=str(who))
    for i, w in enumerate(workers):
        parent.merge(w.collect_delta(), worker=str(i))
    got, want = parent.snapshot(), reference.snapshot()
    g, r = got["h_seconds"].get(), want["h_seconds"].get()
    assert g is not None and r is not None
    assert (g.count, g.bucket_counts, g.min, g.max) == (r.count, r.bucket_counts, r.min, r.max)
    assert (g.p50, g.p99) == (r.p50, r.p99)
    assert g.sum == pytest.approx(r.sum, rel=1e-9, abs=1e-12)
    assert (got.value("n_total") if "n_total" in got else 0) == len(events)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("sum", 7.0), ("max", 5.0), ("min", 2.0), ("last", 5.0)],
    ids=["sum", "max", "min", "last"],
)
def test_gauge_merge_modes(mode: str, expected: float) -> None:
    parent = MetricsRecorder()
    a, b = MetricsRecorder(), MetricsRecorder()
    a.gauge("g_value", merge=mode).set(2)  # type: ignore[arg-type]
    b.gauge("g_value", merge=mode).set(5)  # type: ignore[arg-type]
    parent.merge(a.collect_delta(), worker="a")
    parent.merge(b.collect_delta(), worker="b")
    assert parent.snapshot().value("g_value") == expected


def test_gauge_per_worker_label_restart_and_forget() -> None:
    parent = MetricsRecorder()
    a1 = MetricsRecorder()
    a1.gauge("g_busy").set(1)
    a1.gauge("g_stale").set(9)
    a1.counter("g_done_total").inc(5)
    b = MetricsRecorder()
    b.gauge("g_busy").set(0.5)
    parent.merge(a1.collect_delta(), worker="a")
    parent.merge(b.collect_delta(), worker="b")
    snap = parent.snapshot()
    assert snap["g_busy"].label_names == ("worker",)
    assert snap.value("g_busy", worker="a") == 1 and snap.value("g_busy", worker="b") == 0.5
    a2 = MetricsRecorder()  # worker "a" restarted: a new recorder (new source)
    a2.gauge("g_busy").set(0.25)
    a2.counter("g_done_total").inc(2)
    parent.merge(a2.collect_delta(), worker="a")
    snap = parent.snapshot()
    assert snap.value("g_busy", worker="a") == 0.25
    assert snap["g_stale"].series == ()  # the dead incarnation's gauges are gone
    assert snap.value("g_done_total") == 7  # its counts are not
    assert parent.statistics().worker_restarts == 1
    parent.forget_worker("b")
    snap = parent.snapshot()
    assert snap.value("g_busy", worker="b") is None
    assert parent.statistics().workers == 1


def test_merge_refuses_cumulative_snapshots_and_mismatched_buckets() -> None:
    parent = MetricsRecorder()
    w = MetricsRecorder()
    w.histogram("b_seconds", buckets=[0.1, 1]).observe(0.5)
    with pytest.raises(ConfigError, match="collect_delta"):
        parent.merge(w.snapshot())
    parent.histogram("b_seconds", buckets=[0.2, 2])
    with pytest.raises(ConfigError, match="buckets"):
        parent.merge(w.collect_delta(), worker="w")
    assert parent.statistics().deltas_merged == 0  # nothing half-merged
    with pytest.raises(ConfigError, match="own deltas"):
        w.merge(w.collect_delta())


def test_merge_of_log_linear_keeps_resolution() -> None:
    parent = MetricsRecorder()
    w = MetricsRecorder()
    h = w.histogram("r_seconds", buckets="log-linear")
    values = [0.0011 * (1.07**i) for i in range(200)]
    for v in values:
        h.observe(v)
    parent.merge(w.collect_delta(), worker="w")
    merged = parent.get("r_seconds")
    assert isinstance(merged, fm.Histogram) and merged.midpoint
    s = parent.snapshot()["r_seconds"].get()
    assert s is not None
    assert abs(s.p50 - np.percentile(values, 50)) <= 0.02 * np.percentile(values, 50)  # type: ignore[operator]


def _worker(conn, name: str, seed: int, rounds: int, crash: bool) -> None:  # type: ignore[no-untyped-def]
    """A pool-like worker: records and ships deltas over its own pipe; crash=True dies after."""
    import os

    from fastinfer.metrics import MetricsRecorder

    rec = MetricsRecorder()
    rng = random.Random(seed)
    hist = rec.histogram("p_latency_seconds", labels=("model",))
    reqs = rec.counter("p_requests_total", labels=("outcome",))
    busy = rec.gauge("p_busy")
    for r in range(rounds):
        for _ in range(100):
            hist.labels("m").observe(rng.lognormvariate(-4, 1))
            reqs.labels(rng.choice(["ok", "rejected"])).inc()
        busy.set(r)
        conn.send((name, rec.collect_delta()))  # synchronous: shipped once send() returns
    if crash:
        for _ in range(100):  # recorded but never shipped: lost with the process
            hist.labels("m").observe(1.0)
        os._exit(3)
    conn.send((name, "done"))
    conn.close()


def _expected(seed: int, rounds: int) -> tuple[list[float], dict[str, int]]:
    rng = random.Random(seed)
    vals, outs = [], {"ok": 0, "rejected": 0}
    for _ in range(rounds):
        for _ in range(100):
            vals.append(rng.lognormvariate(-4, 1))
            outs[rng.choice(["ok", "rejected"])] += 1
    return vals, outs


@pytest.mark.slow
def test_merge_from_spawned_worker_processes_is_exact_across_a_restart() -> None:
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    parent = MetricsRecorder()

    def run(plan: list[tuple[str, int, int, bool]]) -> list[int | None]:
        readers, procs = [], []
        for p in plan:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(writer, *p))
            proc.start()
            writer.close()  # the child holds the only write end: EOF when it dies
            readers.append(reader)
            procs.append(proc)
        open_readers = list(readers)
        while open_readers:
            ready = wait(open_readers, timeout=120)
            assert ready, "no worker sent anything for 120 s"
            for r in ready:
                try:
                    name, item = r.recv()  # type: ignore[union-attr]
                except EOFError:  # the worker exited (or died): nothing more will come
                    open_readers.remove(r)
                    continue
                if not isinstance(item, str):
                    parent.merge(item, worker=name)
        for proc in procs:
            proc.join(timeout=60)
        return [proc.exitcode for proc in procs]

    assert run([("w0", 1, 3, False), ("w1", 2, 2, True)]) == [0, 3]
    assert run([("w1", 3, 2, False)]) == [0]  # w1 restarted under the same name

    vals: list[float] = []
    outs = {"ok": 0, "rejected": 0}
    for seed, rounds in ((1, 3), (2, 2), (3, 2)):
        v, o = _expected(seed, rounds)
        vals += v
        for k in outs:
            outs[k] += o[k]
    ref = MetricsRecorder()
    h = ref.histogram("p_latency_seconds", labels=("model",))
    for v in vals:
        h.labels("m").observe(v)
    want = ref.snapshot()["p_latency_seconds"].get(model="m")
    snap = parent.snapshot()
    got = snap["p_latency_seconds"].get(model="m")
    assert got is not None and want is not None
    assert got.count == len(vals) == 700  # the crashed worker's unshipped 100 are not there
    assert got.bucket_counts == want.bucket_counts and (got.min, got.max) == (want.min, want.max)
    assert got.sum == pytest.approx(want.sum, rel=1e-12)
    assert snap.value("p_requests_total", outcome="ok") == outs["ok"]
    assert snap.value("p_requests_total", outcome="rejected") == outs["rejected"]
    assert snap.value("p_busy", worker="w0") == 2 and snap.value("p_busy", worker="w1") == 1
    st = parent.statistics()
    assert (st.workers, st.worker_restarts, st.deltas_merged) == (2, 1, 7)


# --------------------------------------------------------------------------------------------
# track(): other primitives' statistics()
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BatcherStats:
    """Declares its exports the way fastinfer's own statistics classes do."""

    queue_depth: int = ex.gauge(standard="fastinfer_queue_depth")
    requests_ok: int = ex.counter(standard="fastinfer_requests_total", labels={"outcome": "ok"})
    requests_rejected: int = ex.counter(
        standard="fastinfer_requests_total", labels={"outcome": "rejected"}
    )
    batches_total: int = ex.counter()
    mean_batch_size: float = ex.gauge()
    worker_busy_ratio: dict[str, float] = ex.gauge(
        standard="fastinfer_worker_busy_ratio", key_label="worker", default_factory=dict
    )
    name: str = ex.not_exported("text", default="b")
    queue_per_worker: dict[int, int] = ex.gauge(
        key_label="worker", default_factory=lambda: {0: 1, 1: 4}
    )
    # would collide with the standard histogram: skipped
    compile_seconds: float = ex.gauge(default=2.5)


class _FakeBatcher:
    def __init__(self) -> None:
        self.stats = _BatcherStats(3, 10, 2, 4, 2.5, {"0": 0.5, "1": 0.75})
        self.fail = False

    def statistics(self) -> _BatcherStats:
        if self.fail:
            raise RuntimeError("closed")
        return self.stats


def test_track_exports_statistics_at_snapshot_and_scrape_time() -> None:
    rec = MetricsRecorder()
    b = _FakeBatcher()
    rec.track(b, prefix="fastinfer_batcher")
    snap = rec.snapshot()
    assert snap.value("fastinfer_queue_depth") == 3
    assert snap.value("fastinfer_requests_total", outcome="ok") == 10
    assert snap.value("fastinfer_requests_total", outcome="rejected") == 2
    assert snap["fastinfer_batcher_batches_total"].kind == "counter"
    assert snap.value("fastinfer_batcher_batches_total") == 4
    assert snap["fastinfer_batcher_mean_batch_size"].kind == "gauge"
    assert snap.value("fastinfer_worker_busy_ratio", worker="1") == 0.75
    assert "fastinfer_batcher_name" not in snap
    assert snap.value("fastinfer_batcher_queue_per_worker", worker="1") == 4
    assert snap["fastinfer_batcher_queue_per_worker"].label_names == ("worker",)
    rec2 = MetricsRecorder()
    standard_metrics(rec2)
    rec2.track(b, prefix="fastinfer")  # compile_seconds is not turned into a clashing gauge
    assert rec2.snapshot()["fastinfer_compile_seconds"].kind == "histogram"
    b.stats = _BatcherStats(0, 12, 2, 5, 2.4)
    assert rec.snapshot().value("fastinfer_requests_total", outcome="ok") == 12
    b.fail = True
    assert rec.snapshot().value("fastinfer_requests_total", outcome="ok") == 12  # last value kept
    assert rec.statistics().track_errors == 1


def test_track_needs_labels_to_tell_two_objects_apart() -> None:
    rec = MetricsRecorder()
    a, a2, b = _FakeBatcher(), _FakeBatcher(), _FakeBatcher()  # tracking holds weak references
    rec.track(a, labels={"model": "a"})
    with pytest.raises(ConfigError, match="labels="):
        rec.track(a2, labels={"model": "a"})
    rec.track(b, labels={"model": "b"})
    snap = rec.snapshot()
    assert snap.value("fastinfer_queue_depth", model="a") == 3
    assert snap.value("fastinfer_queue_depth", model="b") == 3
    with pytest.raises(ConfigError, match="statistics"):
        rec.track(object())


def test_tracked_counters_ship_as_deltas() -> None:
    w, parent = MetricsRecorder(), MetricsRecorder()
    b = _FakeBatcher()
    w.track(b)
    parent.merge(w.collect_delta(), worker="w")
    b.stats = _BatcherStats(1, 15, 2, 4, 2.5)
    parent.merge(w.collect_delta(), worker="w")
    assert parent.snapshot().value("fastinfer_requests_total", outcome="ok") == 15


def test_tracked_object_that_is_collected_is_dropped() -> None:
    rec = MetricsRecorder()
    b = _FakeBatcher()
    rec.track(b)
    del b
    gc.collect()
    rec.snapshot()
    assert rec.statistics().tracked == 0


# --------------------------------------------------------------------------------------------
# Standard names, docs, dashboard
# --------------------------------------------------------------------------------------------

_CONTRACT = {
    "fastinfer_request_latency_seconds": "histogram",
    "fastinfer_queue_wait_seconds": "histogram",
    "fastinfer_batch_size": "histogram",
    "fastinfer_batch_execution_seconds": "histogram",
    "fastinfer_queue_depth": "gauge",
    "fastinfer_batches_in_flight": "gauge",
    "fastinfer_requests_total": "counter",
    "fastinfer_compile_seconds": "histogram",
    "fastinfer_compile_cache_total": "counter",
    "fastinfer_load_seconds": "histogram",
    "fastinfer_workers_alive": "gauge",
    "fastinfer_worker_restarts_total": "counter",
    "fastinfer_worker_busy_ratio": "gauge",
}


def test_standard_metrics_match_the_contract_and_are_idempotent() -> None:
    rec = MetricsRecorder()
    std = standard_metrics(rec)
    assert standard_metrics(rec).request_latency is std.request_latency
    snap = rec.snapshot()
    assert {m.name: m.kind for m in snap} == _CONTRACT
    assert {n: s.kind for n, s in fm.STANDARD_METRICS.items()} == _CONTRACT
    assert snap["fastinfer_requests_total"].label_names == ("outcome",)
    assert snap["fastinfer_compile_cache_total"].label_names == ("result",)
    assert snap["fastinfer_worker_busy_ratio"].label_names == ("worker",)
    std.observe_request(latency=0.02, queue_wait=0.005, outcome="rejected")
    std.observe_batch(size=8, seconds=0.01)
    snap = rec.snapshot()
    assert snap.value("fastinfer_requests_total", outcome="rejected") == 1
    assert snap["fastinfer_batch_size"].get().max == 8  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="outcome must be one of"):
        std.observe_request(outcome="weird")


def _python_blocks(md: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", md, flags=re.S)


@pytest.mark.serve
def test_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    blocks = _python_blocks((ROOT / "docs" / "metrics.md").read_text())
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("docs_metrics_example")  # dataclasses need a real module
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, "docs/metrics.md", "exec"), module.__dict__)
    assert list(tmp_path.glob("fastinfer-traces/*.json"))  # the profiling example wrote its trace


def test_docs_table_and_grafana_dashboard_use_only_standard_names() -> None:
    md = (ROOT / "docs" / "metrics.md").read_text()
    for name in _CONTRACT:
        assert f"`{name}`" in md, name
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bfastinfer_[a-z_]+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in _CONTRACT, f"{name} in {expr!r} is not a standard metric"
            used.add(base)
    assert {"fastinfer_request_latency_seconds", "fastinfer_requests_total"} <= used
    assert used >= set(_CONTRACT) - {"fastinfer_load_seconds"}


def test_public_names() -> None:
    assert fastinfer.MetricsRecorder is MetricsRecorder
    assert fastinfer.MetricsSnapshot is MetricsSnapshot


def test_track_exports_sub_unit_fields_in_seconds() -> None:
    # A statistics() field in milliseconds becomes a *_seconds gauge (units are explicit).
    from dataclasses import dataclass
    from typing import Any

    from fastinfer import MetricsRecorder

    @dataclass(frozen=True)
    class Stats:
        max_wait_ms: float = ex.gauge(unit="ms")
        queue_depth: int = ex.gauge(standard="fastinfer_queue_depth")

    @dataclass(frozen=True)
    class Undeclared:  # a user's own statistics: exported by field names, nothing standard
        max_wait_ms: float
        queue_depth: int
        done_total: int

    class Thing:
        def __init__(self, stats: Any) -> None:
            self.stats = stats

        def statistics(self) -> Any:
            return self.stats

    thing = Thing(Stats(max_wait_ms=5.0, queue_depth=3))
    rec = MetricsRecorder()
    rec.track(thing, prefix="fastinfer_demo")
    snap = rec.snapshot()
    assert snap.value("fastinfer_demo_max_wait_seconds") == 0.005
    assert "fastinfer_demo_max_wait_ms" not in snap
    assert snap.value("fastinfer_queue_depth") == 3

    other = Thing(Undeclared(max_wait_ms=2.0, queue_depth=4, done_total=7))
    rec2 = MetricsRecorder()
    rec2.track(other, prefix="app")
    snap2 = rec2.snapshot()
    assert snap2.value("app_max_wait_seconds") == 0.002
    assert snap2.value("app_queue_depth") == 4 and "fastinfer_queue_depth" not in snap2
    assert snap2["app_done_total"].kind == "counter"

"""Snapshots: frozen, picklable plain data (what a scrape, a merge or a notebook reads)."""

from __future__ import annotations

import itertools
import json
import math
import threading
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastinfer._common.quantiles import PERCENTILES, quantile_from
from fastinfer.errors import ConfigError
from fastinfer.metrics import _display
from fastinfer.metrics._names import GaugeMode, Kind
from fastinfer.metrics._series import Gauge, Histogram, Metric

__all__ = [
    "MetricSnapshot",
    "MetricsSnapshot",
    "SeriesSnapshot",
    "hist_series_snapshot",
    "metric_snapshot",
]


@dataclass(frozen=True)
class SeriesSnapshot:
    """One label set of a metric. Counters and gauges fill ``value``; histograms the rest.

    ``bucket_counts`` are per bucket (not cumulative), one per bound plus the +Inf bucket.
    Percentiles are estimated from the buckets (exact to the bucket width, clamped to min/max).
    In a delta (:meth:`MetricsRecorder.collect_delta`) histograms carry ``bucket_deltas`` instead:
    ``(bucket index, added count)`` for the buckets that changed, so merging 1000-bucket
    histograms costs what changed, not what exists.
    """

    labels: Mapping[str, str]
    value: float | None = None
    count: int = 0
    sum: float = 0.0
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    p999: float | None = None
    bucket_counts: tuple[int, ...] = ()
    bucket_deltas: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class MetricSnapshot:
    """One metric family at one moment."""

    name: str
    kind: Kind
    help: str
    unit: str
    label_names: tuple[str, ...]
    series: tuple[SeriesSnapshot, ...]
    buckets: tuple[float, ...] = ()  # histogram upper bounds, +Inf implied
    export_buckets: tuple[float, ...] | None = None
    midpoint: bool = False
    merge: GaugeMode = "worker"

    def get(self, **labels: object) -> SeriesSnapshot | None:
        """The series with exactly these label values, or None."""
        want = {k: str(v) for k, v in labels.items()}
        for s in self.series:
            if dict(s.labels) == want:
                return s
        return None

    def __getitem__(self, labels: Mapping[str, object]) -> SeriesSnapshot:
        found = self.get(**labels)
        if found is None:
            raise KeyError(f"metric {self.name!r} has no series with labels {dict(labels)}")
        return found


@dataclass(frozen=True)
class MetricsSnapshot:
    """A frozen, plain-data view of a recorder: picklable, printable, convertible to JSON.

    ``delta`` snapshots (from :meth:`MetricsRecorder.collect_delta`) hold only what changed since the
    previous one from the same ``source``; ``seq`` numbers them from 1.
    """

    metrics: Mapping[str, MetricSnapshot]
    time: float
    source: str = ""
    seq: int = 0
    delta: bool = False
    pid: int = 0

    def __getitem__(self, name: str) -> MetricSnapshot:
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"no metric {name!r}; have {sorted(self.metrics)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.metrics

    def __iter__(self) -> Iterator[MetricSnapshot]:
        return iter(self.metrics.values())

    def value(self, name: str, **labels: object) -> float | None:
        """A counter's or gauge's value (a histogram's count), or None when the series is absent."""
        s = self[name].get(**labels)
        if s is None:
            return None
        return s.value if s.value is not None else float(s.count)

    # -- plain data ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and numbers (``json.dumps``-able)."""
        out: dict[str, Any] = {
            "time": self.time,
            "source": self.source,
            "seq": self.seq,
            "delta": self.delta,
            "pid": self.pid,
            "metrics": {},
        }
        for m in self.metrics.values():
            md: dict[str, Any] = {
                "kind": m.kind,
                "help": m.help,
                "unit": m.unit,
                "label_names": list(m.label_names),
                "series": [],
            }
            if m.kind == "histogram":
                md["buckets"] = list(m.buckets)
                md["export_buckets"] = None if m.export_buckets is None else list(m.export_buckets)
                md["midpoint"] = m.midpoint
            if m.kind == "gauge":
                md["merge"] = m.merge
            for s in m.series:
                sd: dict[str, Any] = {"labels": dict(s.labels)}
                if m.kind == "histogram":
                    for f in ("count", "sum", "min", "max", "mean", "p50", "p90", "p99", "p999"):
                        sd[f] = getattr(s, f)
                    sd["bucket_counts"] = list(s.bucket_counts)
                    if s.bucket_deltas:
                        sd["bucket_deltas"] = [list(p) for p in s.bucket_deltas]
                else:
                    sd["value"] = s.value
                md["series"].append(sd)
            out["metrics"][m.name] = md
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricsSnapshot:
        """Rebuild a snapshot from :meth:`to_dict` output (for example after JSON transport)."""
        try:
            metrics: dict[str, MetricSnapshot] = {}
            for name, md in data["metrics"].items():
                series = tuple(series_from_dict(sd) for sd in md["series"])
                eb = md.get("export_buckets")
                metrics[name] = MetricSnapshot(
                    name=name,
                    kind=md["kind"],
                    help=md.get("help", ""),
                    unit=md.get("unit", ""),
                    label_names=tuple(md["label_names"]),
                    series=series,
                    buckets=tuple(md.get("buckets", ())),
                    export_buckets=None if eb is None else tuple(eb),
                    midpoint=bool(md.get("midpoint", False)),
                    merge=md.get("merge", "worker"),
                )
            return cls(
                metrics=metrics,
                time=float(data["time"]),
                source=str(data.get("source", "")),
                seq=int(data.get("seq", 0)),
                delta=bool(data.get("delta", False)),
                pid=int(data.get("pid", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"not a MetricsSnapshot.to_dict() document ({type(exc).__name__}: {exc})"
            ) from None

    # -- display (fastinfer.metrics._display) -------------------------------------------------

    def __str__(self) -> str:
        return _display.text(self)

    def _repr_html_(self) -> str:
        return _display.html(self)

    def plot(self, names: Sequence[str] | None = None) -> Any:
        """Draw each histogram's distribution with its p50/p99 (matplotlib). Returns the figure."""
        return _display.plot(self, names)


def series_from_dict(sd: Mapping[str, Any]) -> SeriesSnapshot:
    skip = ("labels", "bucket_counts", "bucket_deltas")
    kw: dict[str, Any] = {k: v for k, v in sd.items() if k not in skip}
    return SeriesSnapshot(
        labels=dict(sd["labels"]),
        bucket_counts=tuple(sd.get("bucket_counts", ())),
        bucket_deltas=tuple((int(i), int(c)) for i, c in sd.get("bucket_deltas", ())),
        **kw,
    )


def bucket_percentiles(
    counts: Sequence[int], bounds: Sequence[float], lo: float, hi: float, midpoint: bool
) -> dict[str, float]:
    """Percentiles (the one definition in :mod:`fastinfer._common.quantiles`) of order statistics
    estimated from bucket counts, clamped to [min, max]."""
    cum = list(itertools.accumulate(counts))
    n = cum[-1]
    nb = len(bounds)

    def order_stat(k: int) -> float:  # estimate of the k-th smallest value (0-based)
        j = bisect_right(cum, k)
        below = cum[j - 1] if j else 0
        lower = bounds[j - 1] if j else lo
        upper = bounds[j] if j < nb else hi
        lower, upper = max(lower, lo), min(upper, hi)
        if upper <= lower:
            return lower
        if midpoint:
            return (lower + upper) / 2
        return lower + (upper - lower) * ((k - below + 0.5) / counts[j])

    out = {}
    for key, q in PERCENTILES:
        out[key] = min(max(quantile_from(order_stat, n, q), lo), hi)
    return out


def hist_series_snapshot(
    labels: Mapping[str, str],
    counts: Sequence[int],
    total: float,
    lo: float,
    hi: float,
    bounds: Sequence[float],
    midpoint: bool,
    *,
    percentiles: bool = True,
) -> SeriesSnapshot:
    n = sum(counts)
    if n == 0:
        return SeriesSnapshot(labels=labels, count=0, sum=0.0, bucket_counts=tuple(counts))
    pct: dict[str, Any] = (
        bucket_percentiles(counts, bounds, lo, hi, midpoint) if percentiles else {}
    )
    return SeriesSnapshot(
        labels=labels,
        count=n,
        sum=total,
        min=lo,
        max=hi,
        mean=total / n,
        bucket_counts=tuple(counts),
        **pct,
    )


def metric_snapshot(
    metric: Metric, merge_lock: threading.Lock, *, percentiles: bool = True
) -> MetricSnapshot:
    names = metric.label_names
    series: list[SeriesSnapshot] = []
    if isinstance(metric, Histogram):
        for key, child in metric._series_items():
            counts, total, lo, hi = child._read()
            series.append(
                hist_series_snapshot(
                    dict(zip(names, key)),
                    counts,
                    total,
                    lo,
                    hi,
                    metric.bounds,
                    metric.midpoint,
                    percentiles=percentiles,
                )
            )
        return MetricSnapshot(
            metric.name,
            "histogram",
            metric.help,
            metric.unit,
            names,
            tuple(series),
            metric.bounds,
            metric.export_bounds,
            metric.midpoint,
        )
    if isinstance(metric, Gauge):
        names, series = gauge_series(metric, merge_lock)
        return MetricSnapshot(
            metric.name,
            "gauge",
            metric.help,
            metric.unit,
            names,
            tuple(series),
            merge=metric.merge_mode,
        )
    for key, child in metric._series_items():
        series.append(SeriesSnapshot(labels=dict(zip(names, key)), value=child.value))
    return MetricSnapshot(metric.name, metric.kind, metric.help, metric.unit, names, tuple(series))


def gauge_series(
    g: Gauge, merge_lock: threading.Lock
) -> tuple[tuple[str, ...], list[SeriesSnapshot]]:
    """Local values plus values merged from workers, combined by the gauge's merge mode."""
    names = g.label_names
    local = {key: (c.value, c._stamp) for key, c in g._series_items() if c._stamp}
    with merge_lock:
        workers = {w: dict(v) for w, v in g._workers.items()}
    if not workers:
        return names, [
            SeriesSnapshot(labels=dict(zip(names, k)), value=v) for k, (v, _) in local.items()
        ]
    if g.merge_mode == "worker":
        if "worker" in names:  # the label set already names the worker
            merged = dict(local)
            for vals in workers.values():
                merged.update(vals)
            return names, [
                SeriesSnapshot(labels=dict(zip(names, k)), value=v) for k, (v, _) in merged.items()
            ]
        out_names = (*names, "worker")
        out = [
            SeriesSnapshot(labels={**dict(zip(names, k)), "worker": ""}, value=v)
            for k, (v, _) in local.items()
        ]
        for w in sorted(workers):
            for k, (v, _) in workers[w].items():
                out.append(SeriesSnapshot(labels={**dict(zip(names, k)), "worker": w}, value=v))
        return out_names, out
    groups: dict[tuple[str, ...], list[tuple[float, int]]] = {}
    for k, vs in local.items():
        groups.setdefault(k, []).append(vs)
    for vals in workers.values():
        for k, vs in vals.items():
            groups.setdefault(k, []).append(vs)
    out = []
    for k, items in groups.items():
        values = [v for v, _ in items]
        if g.merge_mode == "sum":
            try:
                value = math.fsum(values)
            except OverflowError:  # finite values whose sum passes 1.8e308: exported as ±inf
                value = sum(values)
        elif g.merge_mode == "max":
            value = max(values)
        elif g.merge_mode == "min":
            value = min(values)
        else:  # last
            value = max(items, key=lambda it: it[1])[0]
        out.append(SeriesSnapshot(labels=dict(zip(names, k)), value=value))
    return names, out

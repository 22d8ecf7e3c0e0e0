"""The prometheus_client bridge: a custom collector that reads a fresh snapshot per scrape."""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastinfer._optional import require
from fastinfer.metrics._snapshot import metric_snapshot

if TYPE_CHECKING:
    from fastinfer.metrics._recorder import MetricsRecorder

__all__ = ["PrometheusCollector"]


class PrometheusCollector:
    """A prometheus_client custom collector: every scrape reads a fresh snapshot."""

    def __init__(self, recorder: MetricsRecorder) -> None:
        require("prometheus_client", purpose="Prometheus export")
        self._recorder = recorder

    def describe(self) -> list[Any]:
        return []  # metrics are created at run time; skip the registry's up-front name check

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        rec = self._recorder
        rec._refresh_tracked()
        for metric in list(rec._metrics.values()):
            snap = metric_snapshot(metric, rec._merge_lock, percentiles=False)
            names = list(snap.label_names)
            unit = snap.unit if snap.unit and snap.name.endswith("_" + snap.unit) else ""
            fam: Any
            if snap.kind == "counter":
                fam = CounterMetricFamily(snap.name, snap.help, labels=names)
                for s in snap.series:
                    fam.add_metric([s.labels[n] for n in names], s.value)
            elif snap.kind == "gauge":
                fam = GaugeMetricFamily(snap.name, snap.help, labels=names, unit=unit)
                for s in snap.series:
                    fam.add_metric([s.labels[n] for n in names], s.value)
            else:
                fam = HistogramMetricFamily(snap.name, snap.help, labels=names, unit=unit)
                export = snap.export_buckets
                idx = (
                    range(len(snap.buckets))
                    if export is None
                    else [bisect_left(snap.buckets, b) for b in export]
                )
                for s in snap.series:
                    cum = list(itertools.accumulate(s.bucket_counts))
                    buckets = [(floatToGoString(snap.buckets[i]), cum[i]) for i in idx]
                    buckets.append(("+Inf", cum[-1]))
                    fam.add_metric([s.labels[n] for n in names], buckets, s.sum)
            yield fam

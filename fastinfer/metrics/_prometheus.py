"""The prometheus_client bridge: a custom collector that reads a fresh snapshot per scrape.

A scrape never fails because of one series: each series is checked before it is handed to
prometheus_client (label values that are text that UTF-8 can encode, numbers that convert to a
float where numbers go),
and one that is not exportable is left out of that scrape, logged once and counted
(``RecorderStatistics.series_dropped``); every other series is exported. Values are validated
where they enter (see ``_series``), so this is the guard for what got past that: a subclass, a
bug, a value written around the public methods.
"""

from __future__ import annotations

import itertools
import logging
import math
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastinfer._optional import require
from fastinfer.metrics._series import _shown, bad_label_value
from fastinfer.metrics._snapshot import MetricSnapshot, SeriesSnapshot, metric_snapshot

if TYPE_CHECKING:
    from fastinfer.metrics._recorder import MetricsRecorder

__all__ = ["PrometheusCollector"]

logger = logging.getLogger("fastinfer.metrics")

_LOGGED_MAX = 1000  # series remembered as already logged (the log line is once per series)


def _number(value: object) -> bool:
    """A number prometheus_client can render: an int or float that converts to a float (an int
    past the float range, such as 10**400, raises OverflowError when the scrape is rendered)."""
    if not isinstance(value, int | float):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _problem(snap: MetricSnapshot, s: SeriesSnapshot) -> str | None:
    """Why series ``s`` of ``snap`` cannot be exported (None when it can)."""
    if not isinstance(s.labels, Mapping) or set(s.labels) != set(snap.label_names):
        return f"its labels {s.labels!r} do not match the label names {list(snap.label_names)}"
    for label in snap.label_names:
        why = bad_label_value(snap.name, label, s.labels[label])
        if why is not None:
            return why
    if snap.kind != "histogram":
        if not _number(s.value):
            return f"its value {_shown(s.value)} is not a number that converts to a float"
        return None
    counts: Sequence[Any] = s.bucket_counts
    if len(counts) != len(snap.buckets) + 1 or not all(
        isinstance(c, int) and c >= 0 for c in counts
    ):
        return f"its bucket counts {counts!r} do not fit its {len(snap.buckets)} buckets"
    if not _number(s.sum) or math.isnan(s.sum):
        return f"its sum {_shown(s.sum)} is not a number that converts to a float"
    return None


class PrometheusCollector:
    """A prometheus_client custom collector: every scrape reads a fresh snapshot."""

    def __init__(self, recorder: MetricsRecorder) -> None:
        require("prometheus_client", purpose="Prometheus export")
        self._recorder = recorder

    def describe(self) -> list[Any]:
        return []  # metrics are created at run time; skip the registry's up-front name check

    def collect(self) -> Iterator[Any]:
        rec = self._recorder
        rec._refresh_tracked()
        for metric in list(rec._metrics.values()):
            try:
                snap = metric_snapshot(metric, rec._merge_lock, percentiles=False)
            except Exception as e:  # a series that cannot even be read: the family is left out
                self._drop(metric.name, None, f"reading it failed ({type(e).__name__}: {e})")
                continue
            try:
                family = self._family(snap)
            except Exception as e:  # a bug past the per-series checks: still not the whole scrape
                self._drop(metric.name, None, f"building it failed ({type(e).__name__}: {e})")
                continue
            yield family

    def _family(self, snap: MetricSnapshot) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        names = list(snap.label_names)
        unit = snap.unit if snap.unit and snap.name.endswith("_" + snap.unit) else ""
        help = snap.help
        if not help.isascii():  # checked when created; never let it fail a scrape
            help = help.encode("utf-8", "backslashreplace").decode("utf-8")
        fam: Any
        if snap.kind == "counter":
            fam = CounterMetricFamily(snap.name, help, labels=names)
        elif snap.kind == "gauge":
            fam = GaugeMetricFamily(snap.name, help, labels=names, unit=unit)
        else:
            fam = HistogramMetricFamily(snap.name, help, labels=names, unit=unit)
            export = snap.export_buckets
            idx = (
                range(len(snap.buckets))
                if export is None
                else [bisect_left(snap.buckets, b) for b in export]
            )
        for s in snap.series:
            why = _problem(snap, s)
            if why is not None:
                self._drop(snap.name, s.labels, why)
                continue
            values = [s.labels[n] for n in names]
            if snap.kind == "histogram":
                cum = list(itertools.accumulate(s.bucket_counts))
                buckets = [(floatToGoString(snap.buckets[i]), cum[i]) for i in idx]
                buckets.append(("+Inf", cum[-1]))
                fam.add_metric(values, buckets, float(s.sum))
            else:
                fam.add_metric(values, float(s.value))  # type: ignore[arg-type]  # _problem checked it
        return fam

    def _drop(self, name: str, labels: Mapping[str, Any] | None, why: str) -> None:
        rec = self._recorder
        key = (name, repr(sorted(labels.items())) if isinstance(labels, Mapping) else repr(labels))
        with rec._merge_lock:
            rec._series_dropped += 1
            first = key not in rec._drops_logged and len(rec._drops_logged) < _LOGGED_MAX
            if first:
                rec._drops_logged.add(key)
        if first:
            shown = "the whole metric" if labels is None else f"series {key[1]}"
            logger.error(
                "metric %r: %s left out of the scrape: %s (logged once per series; counted in "
                "MetricsRecorder.statistics().series_dropped)",
                name,
                shown,
                why,
            )

"""The prometheus_client bridge: a custom collector that reads a fresh snapshot per scrape.

A scrape never fails because of one series: each series is checked before it is handed to
prometheus_client (label values that are text that UTF-8 can encode, numbers that convert to a
float where numbers go),
and one that is not exportable is left out of that scrape, logged once and counted
(``RecorderStatistics.series_dropped``); every other series is exported. Values are validated
where they enter (see ``_series``), so this is the guard for what got past that: a subclass, a
bug, a value written around the public methods.

Names: :meth:`PrometheusCollector.describe` returns the recorder's families (without samples), so
a registry's own duplicate check covers them when the collector is registered; for metrics created
afterwards, :func:`check_registries` and :func:`claim_names` do the same check against, and hold
the names in, the registries that ``MetricsRecorder.register()`` registered on.
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

__all__ = ["DUPLICATES", "PrometheusCollector", "ScrapeOnly", "check_registries", "claim_names"]

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
        """The recorder's metric families, without samples: a registry checks their names
        against its other collectors' when this collector is registered."""
        return [_empty_family(m) for m in list(self._recorder._metrics.values())]

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
        from prometheus_client.utils import floatToGoString

        names = list(snap.label_names)
        fam = _new_family(snap.kind, snap.name, snap.help, names, snap.unit)
        if snap.kind == "histogram":
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


def _new_family(kind: str, name: str, help: str, label_names: list[str], unit: str) -> Any:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    unit = unit if unit and name.endswith("_" + unit) else ""
    if not help.isascii():  # checked when created; never let it fail a scrape
        help = help.encode("utf-8", "backslashreplace").decode("utf-8")
    if kind == "counter":
        return CounterMetricFamily(name, help, labels=label_names)
    if kind == "gauge":
        return GaugeMetricFamily(name, help, labels=label_names, unit=unit)
    return HistogramMetricFamily(name, help, labels=label_names, unit=unit)


def _empty_family(metric: Any) -> Any:
    return _new_family(metric.kind, metric.name, metric.help, list(metric.label_names), metric.unit)


class ScrapeOnly:
    """A collector with no ``describe()``: for a registry of its own (``exposition()``), where
    there is nothing to check names against."""

    def __init__(self, collector: PrometheusCollector) -> None:
        self.collect = collector.collect


# What prometheus_client's CollectorRegistry.register() raises on a clash starts with this.
DUPLICATES = "Duplicated timeseries"


def _registry_state(registry: Any) -> tuple[Any, dict[str, Any], dict[Any, list[str]]] | None:
    """A prometheus_client CollectorRegistry's lock and name tables (None for another kind of
    registry: such a registry checks names only when a collector is registered)."""
    lock = getattr(registry, "_lock", None)
    names = getattr(registry, "_names_to_collectors", None)
    collectors = getattr(registry, "_collector_to_names", None)
    if lock is None or not isinstance(names, dict) or not isinstance(collectors, dict):
        return None
    return lock, names, collectors


def check_registries(registrations: list[tuple[Any, Any]], metric: str, samples: list[str]) -> None:
    """MetricNameError when a sample name of new metric ``metric`` is exposed by another
    collector of a registry this recorder is registered on."""
    for registry, collector in registrations:
        state = _registry_state(registry)
        if state is None:
            continue
        lock, names, collectors = state
        with lock:
            if collector not in collectors:
                continue  # unregistered since
            for s in samples:
                owner = names.get(s)
                if owner is not None and owner is not collector:
                    from fastinfer.errors import MetricNameError

                    raise MetricNameError(
                        f"metric {metric!r} would expose {s!r}, which another collector "
                        f"({type(owner).__module__}.{type(owner).__qualname__}) of a "
                        "prometheus_client registry this recorder "
                        "is registered on already exposes; Prometheus would get the same series "
                        f"twice. Fix: rename the metric (for example 'myapp_{metric}')"
                    )


def claim_names(registrations: list[tuple[Any, Any]], samples: list[str]) -> None:
    """Hold ``samples`` for this recorder's collector in each registry it is registered on (so a
    clashing collector registered later is refused there). Never raises: call
    :func:`check_registries` first. Registrations whose collector was unregistered are dropped."""
    alive = []
    for registry, collector in registrations:
        state = _registry_state(registry)
        if state is None:
            alive.append((registry, collector))
            continue
        lock, names, collectors = state
        with lock:
            held = collectors.get(collector)
            if held is None:
                continue
            for s in samples:
                if s not in names:
                    names[s] = collector
                    held.append(s)
        alive.append((registry, collector))
    registrations[:] = alive

"""The metric registry at the heart of a MetricsRecorder: creating and finding metrics (private).

:class:`~fastinfer.MetricsRecorder` is assembled from this registry, ``_merge.Merging``
(cross-process deltas) and ``_tracking.Tracking`` (other objects' ``statistics()``); the state
they share is declared here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

from fastinfer.errors import ConfigError, MetricNameError
from fastinfer.metrics._buckets import LogLinearBuckets, resolve_buckets
from fastinfer.metrics._names import (
    GAUGE_MODES,
    GaugeMode,
    check_help,
    check_unit,
    validate_labels,
    validate_name,
)
from fastinfer.metrics._series import Counter, Gauge, Histogram, Metric
from fastinfer.metrics._timer import Timer

__all__ = ["MetricRegistry", "describe"]


class MetricRegistry:
    """Creates metrics, checks that a name means one thing, and finds them again."""

    max_series: int
    _clock: Callable[[], float]
    _metrics: dict[str, Metric]
    _sample_names: dict[str, str]
    _lock: threading.RLock
    _merge_lock: threading.Lock
    _series_dropped: int  # series left out of a scrape (see _prometheus)
    _registrations: list[tuple[Any, Any]]  # (prometheus registry, our collector) from register()
    _drops_logged: set[tuple[str, str]]

    def _refresh_tracked(self) -> None:  # Tracking's: read tracked objects before any read
        raise NotImplementedError

    def _get_or_create(self, name: str, kind: str, make: Callable[[], Metric]) -> Any:
        existing = self._metrics.get(name)
        if existing is None:
            with self._lock:
                existing = self._metrics.get(name)
                if existing is None:
                    metric = make()
                    self._reserve(metric)
                    self._metrics[name] = metric
                    return metric
        new = make()
        if existing._spec() != new._spec():
            raise ConfigError(
                f"metric {name!r} already exists as {describe(existing)}; asked for "
                f"{describe(new)}. Fix: use one definition (or another name)."
            )
        return existing

    @staticmethod
    def _samples(metric: Metric) -> list[str]:
        name = metric.name
        if metric.kind == "histogram":
            return [name, f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"]
        if metric.kind == "counter":
            base = name[:-6] if name.endswith("_total") else name
            return [base, f"{base}_total", f"{base}_created"]
        return [name]

    def _check_samples(self, metric: Metric) -> None:
        """MetricNameError when ``metric`` would expose a sample name another metric exposes, in
        this recorder or in a prometheus_client registry it was registered on with register()."""
        samples = self._samples(metric)
        for s in samples:
            owner = self._sample_names.get(s)
            if owner is not None and owner != metric.name:
                raise MetricNameError(
                    f"metric {metric.name!r} would expose {s!r}, which metric {owner!r} already "
                    "exposes; rename one of them"
                )
        if self._registrations:
            from fastinfer.metrics._prometheus import check_registries

            check_registries(self._registrations, metric.name, samples)

    def _reserve(self, metric: Metric) -> None:
        """Check ``metric``'s sample names, then hold them (here and in the registries this
        recorder is registered on, so that a collector registered there later cannot clash)."""
        self._check_samples(metric)
        samples = self._samples(metric)
        for s in samples:
            self._sample_names[s] = metric.name
        if self._registrations:
            from fastinfer.metrics._prometheus import claim_names

            claim_names(self._registrations, samples)

    def _common(
        self, name: str, labels: Iterable[str], kind: str, help: object = ""
    ) -> tuple[str, tuple[str, ...]]:
        name = validate_name(name)
        check_help(name, help)
        return name, validate_labels(name, labels, kind=kind)

    def _limit(self, max_series: int | None) -> int:
        if max_series is None:
            return self.max_series
        if not isinstance(max_series, int) or max_series < 1:
            raise ConfigError(f"max_series must be a positive int, got {max_series!r}")
        return max_series

    def counter(
        self,
        name: str,
        help: str = "",
        *,
        labels: Sequence[str] = (),
        max_series: int | None = None,
    ) -> Counter:
        """A counter; the name should end in ``_total`` (it is exported as ``<base>_total``)."""
        name, names = self._common(name, labels, "counter", help)
        limit = self._limit(max_series)
        return cast(
            "Counter",
            self._get_or_create(name, "counter", lambda: Counter(name, help, "", names, limit)),
        )

    def gauge(
        self,
        name: str,
        help: str = "",
        *,
        labels: Sequence[str] = (),
        unit: str = "",
        merge: GaugeMode = "worker",
        max_series: int | None = None,
    ) -> Gauge:
        """A gauge. ``merge`` says how values from worker processes combine in :meth:`merge`:
        ``"worker"`` keeps one series per worker (a ``worker`` label), ``"sum"``/``"max"``/
        ``"min"``/``"last"`` aggregate them into one value."""
        name, names = self._common(name, labels, "gauge", help)
        unit = check_unit(name, unit)
        if merge not in GAUGE_MODES:
            raise ConfigError(f"gauge {name!r}: merge must be one of {GAUGE_MODES}, got {merge!r}")
        limit = self._limit(max_series)
        return cast(
            "Gauge",
            self._get_or_create(
                name, "gauge", lambda: Gauge(name, help, unit, names, limit, merge)
            ),
        )

    def histogram(
        self,
        name: str,
        help: str = "",
        *,
        unit: str | None = None,
        labels: Sequence[str] = (),
        buckets: Sequence[float] | LogLinearBuckets | str | None = None,
        max_series: int | None = None,
    ) -> Histogram:
        """A histogram. ``unit`` defaults from the name's suffix (``_seconds`` -> ``"seconds"``).

        ``buckets``: upper bounds, :class:`LogLinearBuckets` (or ``"log-linear"``) for percentiles
        with bounded relative error, or None for the unit's defaults (latency buckets for seconds,
        powers of two otherwise).
        """
        name, names = self._common(name, labels, "histogram", help)
        if unit is None:
            unit = (
                "seconds"
                if name.endswith("_seconds")
                else ("bytes" if name.endswith("_bytes") else "")
            )
        unit = check_unit(name, unit)
        bounds, export, midpoint = resolve_buckets(name, unit, buckets)
        limit = self._limit(max_series)
        return cast(
            "Histogram",
            self._get_or_create(
                name,
                "histogram",
                lambda: Histogram(name, help, unit, names, limit, bounds, export, midpoint),
            ),
        )

    def timer(
        self,
        name: str,
        help: str = "",
        *,
        labels: Mapping[str, object] | None = None,
        buckets: Sequence[float] | LogLinearBuckets | str | None = None,
        cuda_sync: bool | Literal["events"] = False,
    ) -> Timer:
        """A :class:`Timer` (context manager and decorator) observing into histogram ``name``,
        which must end in ``_seconds``. ``labels`` gives label values by name."""
        if not (isinstance(name, str) and name.endswith("_seconds")):
            raise MetricNameError(
                f"timer name {name!r} must end in '_seconds': timers record seconds "
                "(for example 'app_step_seconds')"
            )
        labels = dict(labels or {})
        hist = self.histogram(name, help, unit="seconds", labels=tuple(labels), buckets=buckets)
        series = hist.labels(**labels) if labels else hist._unlabelled()
        return Timer(series, cuda_sync=cuda_sync)

    def get(self, name: str) -> Counter | Gauge | Histogram:
        """The metric called ``name`` (KeyError naming the known ones if absent)."""
        try:
            return cast("Counter | Gauge | Histogram", self._metrics[name])
        except KeyError:
            raise KeyError(f"no metric {name!r}; have {sorted(self._metrics)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def names(self) -> list[str]:
        return list(self._metrics)


def describe(m: Metric) -> str:
    extra = ""
    if isinstance(m, Histogram):
        extra = f", {len(m.bounds)} buckets"
    if isinstance(m, Gauge):
        extra = f", merge={m.merge_mode!r}"
    return f"{m.kind}(unit={m.unit!r}, labels={list(m.label_names)}{extra})"

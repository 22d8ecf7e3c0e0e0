"""Tracking: export other objects' ``statistics()`` at every snapshot and scrape (private part).

Each statistics dataclass declares, per field, the metric it is exported as
(:mod:`fastinfer._common.export`): the recorder reads those declarations and knows no other
primitive's field names.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from fastinfer._common.export import SUBUNITS, Export, export_of
from fastinfer.errors import ConfigError
from fastinfer.metrics._names import Kind, validate_labels, validate_name
from fastinfer.metrics._registry import MetricRegistry
from fastinfer.metrics._series import Metric, bad_label_value
from fastinfer.metrics._standard import STANDARD_METRICS

__all__ = ["Tracking", "declared_export"]

logger = logging.getLogger("fastinfer.metrics")


@dataclass
class _Tracked:
    ref: Callable[[], Any]
    prefix: str
    labels: dict[str, str]
    names: dict[str, str]
    counters: frozenset[str]
    standard: bool
    failed: bool = False


def _as_float(value: float) -> float:
    """``float(value)``, or NaN for an int past the float range (skipped like NaN, not raised)."""
    try:
        return float(value)
    except OverflowError:
        return math.nan


def declared_export(f: Any) -> Export:
    """A field's export declaration; a dataclass that declares none (a user's own statistics) is
    exported by its field names: numbers become gauges, ``*_total`` counters, ``*_ms`` seconds."""
    exp = export_of(f)
    if exp is not None:
        return exp
    unit = next((u for u in SUBUNITS if f.name.endswith(f"_{u}")), "")
    label = "worker" if f.name.endswith("_per_worker") else "key"
    return Export("counter" if f.name.endswith("_total") else "gauge", key_label=label, unit=unit)


class Tracking(MetricRegistry):
    """track(obj): obj.statistics() becomes metrics, refreshed before every read."""

    _tracked: list[_Tracked]
    _track_errors: int

    def track(
        self,
        obj: Any,
        *,
        prefix: str = "",
        labels: Mapping[str, object] | None = None,
        names: Mapping[str, str] | None = None,
        counters: Iterable[str] = (),
        standard: bool = True,
    ) -> None:
        """Export ``obj.statistics()`` (a dataclass of numbers) at every snapshot and scrape.

        Each field is exported as its statistics class declares (:mod:`fastinfer._common.export`):
        fields that feed a standard metric (``queue_depth``, ``requests_ok``, ``cache_hits``...;
        see docs/metrics.md) go there when ``standard``; other numeric fields become gauges or
        counters called ``<prefix>_<field>`` (a field in milliseconds as ``..._seconds``).
        ``counters`` makes listed fields counters; ``names`` maps a field to a metric name
        explicitly; ``labels`` are constant labels added to every series (to tell two batchers
        apart). Dict fields of numbers become one series per key, labelled as declared
        (``key``, or ``worker`` for per-worker fields).
        """
        stats_fn = getattr(obj, "statistics", None)
        if not callable(stats_fn):
            raise ConfigError(
                f"track() needs an object with a statistics() method, got {type(obj).__name__}"
            )
        stats = stats_fn()
        if not is_dataclass(stats) or isinstance(stats, type):
            raise ConfigError(
                f"{type(obj).__name__}.statistics() must return a dataclass instance, "
                f"got {type(stats).__name__}"
            )
        if prefix:
            validate_name(prefix, "prefix")
        try:
            ref: Callable[[], Any] = weakref.ref(obj)
        except TypeError:
            ref = lambda: obj  # noqa: E731
        t = _Tracked(
            ref=ref,
            prefix=prefix,
            labels={str(k): str(v) for k, v in (labels or {}).items()},
            names=dict(names or {}),
            counters=frozenset(counters),
            standard=standard,
        )
        validate_labels(prefix or "track", tuple(t.labels), kind="gauge")
        for label, value in t.labels.items():
            why = bad_label_value(prefix or "track", label, value)
            if why is not None:
                raise ConfigError(why)
        plan = self._track_plan(t, stats)
        mine = {(n, k) for n, _, k, _ in plan}
        for other in self._tracked:
            o = other.ref()
            if o is None:
                continue
            clash = mine & {(n, k) for n, _, k, _ in self._track_plan(other, o.statistics())}
            if clash:
                name, key = sorted(clash)[0]
                raise ConfigError(
                    f"track(): {type(obj).__name__} and {type(o).__name__} would both write "
                    f"{name}{dict(key)}; pass labels={{...}} (e.g. {{'model': 'a'}}) to tell them apart"
                )
        for mname, kind, key, _ in plan:  # create (and validate) every metric now
            self._tracked_metric(mname, kind, tuple(k for k, _ in key))
        with self._lock:
            self._tracked.append(t)

    def _track_plan(
        self, t: _Tracked, stats: Any
    ) -> list[tuple[str, Kind, tuple[tuple[str, str], ...], float]]:
        plan: list[tuple[str, Kind, tuple[tuple[str, str], ...], float]] = []
        for f in fields(stats):
            exp = declared_export(f)
            if exp.kind is None:
                continue
            value = getattr(stats, f.name)
            items: list[tuple[dict[str, str], float]]
            if isinstance(value, bool | int | float):
                items = [({}, _as_float(value))]
            elif isinstance(value, Mapping):
                items = [
                    ({exp.key_label: str(k)}, _as_float(v))
                    for k, v in value.items()
                    if isinstance(v, bool | int | float)
                ]
            else:
                continue  # e.g. an Optional number that is None right now
            if f.name in t.names:
                mname = t.names[f.name]
                kind: Kind = (
                    "counter" if (mname.endswith("_total") or f.name in t.counters) else "gauge"
                )
                extra: dict[str, str] = {}
            elif t.standard and exp.standard:
                mname, kind, extra = exp.standard, exp.kind, dict(exp.labels)
            else:
                field = f.name
                if exp.unit in SUBUNITS:  # record base units: x_ms -> x_seconds
                    field = field.removesuffix(f"_{exp.unit}") + "_seconds"
                    items = [(lab, v * SUBUNITS[exp.unit]) for lab, v in items]
                base = f"{t.prefix.rstrip('_')}_{field}" if t.prefix else field
                kind = "counter" if (exp.kind == "counter" or f.name in t.counters) else "gauge"
                mname, extra = base, {}
                std = STANDARD_METRICS.get(mname)
                if std is not None and std.kind != kind:
                    continue  # e.g. compile_seconds: the standard histogram is fed by callbacks
            for lab, v in items:
                if not math.isfinite(v):
                    continue  # NaN, inf or past 1.8e308 right now: the metric keeps its last value
                key = tuple(sorted({**t.labels, **extra, **lab}.items()))
                plan.append((mname, kind, key, v))
        return plan

    def _tracked_metric(self, name: str, kind: Kind, label_names: tuple[str, ...]) -> Metric:
        existing = self._metrics.get(name)
        if (
            existing is not None
            and existing.kind == kind
            and set(existing.label_names) == set(label_names)
        ):
            return existing  # same labels in another order, or another merge mode: reuse it
        spec = STANDARD_METRICS.get(name)
        if spec is not None and set(spec.labels) <= set(label_names):
            extra = tuple(n for n in label_names if n not in spec.labels)
            label_names = (*spec.labels, *extra)
        if kind == "counter":
            return self.counter(name, spec.help if spec else "", labels=label_names)
        merge = spec.merge if spec is not None else "worker"
        return self.gauge(name, spec.help if spec else "", labels=label_names, merge=merge)

    def _refresh_tracked(self) -> None:
        if not self._tracked:
            return
        with self._lock:
            tracked = list(self._tracked)
        alive = []
        for t in tracked:
            obj = t.ref()
            if obj is None:
                continue
            alive.append(t)
            try:
                plan = self._track_plan(t, obj.statistics())
                for mname, kind, key, value in plan:
                    metric = self._tracked_metric(mname, kind, tuple(k for k, _ in key))
                    values = dict(key)
                    child = metric._child(tuple(values[n] for n in metric.label_names))
                    if kind == "counter":
                        child._set_total(value)
                    else:
                        child.set(value)
                t.failed = False
            except Exception:
                self._track_errors += 1
                if not t.failed:
                    logger.exception(
                        "reading statistics() of tracked %s failed; its metrics keep their last values",
                        type(obj).__name__,
                    )
                t.failed = True
        if len(alive) != len(tracked):
            with self._lock:
                self._tracked = [t for t in self._tracked if t.ref() is not None]

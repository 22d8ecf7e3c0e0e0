"""What :class:`~fastinfer.integrations.fastapi.FastInferService` exports of the objects it
manages: their ``statistics()`` (``svc.manage``), the standard metrics per model (``labels=``),
and the bookkeeping that lets a second lifespan build its objects afresh.

One model feeds the standard metrics unlabelled (``svc.batcher_hooks()``, ``svc.manage(obj,
name=...)``). Several models feed them each with its own labels, the same label names for all
(``svc.batcher_hooks(labels={"model": "a"})``, ``svc.manage(obj, name="a", labels={"model":
"a"})``): ``fastinfer_request_latency_seconds{model="a"}``, ``fastinfer_requests_total{model="a",
outcome="ok"}``... A metric has one set of label names, so the two ways do not mix in one service.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastinfer._common.export import counter, gauge
from fastinfer.errors import ConfigError
from fastinfer.metrics import (
    STANDARD_METRICS,
    BatcherHooks,
    MetricsRecorder,
    StandardMetrics,
    standard_metrics,
)
from fastinfer.metrics._standard import (
    BATCH_EXECUTION,
    BATCH_SIZE,
    QUEUE_WAIT,
    REQUEST_LATENCY,
    WORKER_BUSY_RATIO,
    WORKER_RESTARTS,
    WORKERS_ALIVE,
)

__all__ = [
    "Exported",
    "PoolWorkers",
    "Registrations",
    "labelled_hooks",
    "track",
    "unlabelled_metrics",
]


def _labels_hint(name: str) -> str:
    return (
        f"give each model its own labels, with the same label names for all: "
        f"svc.manage(..., name={name!r}, labels={{'model': {name!r}}}) and "
        f"DynamicBatcher(..., **svc.batcher_hooks(labels={{'model': {name!r}}})) (the models "
        "managed before it too: labelled and unlabelled standard metrics do not mix)"
    )


class Exported:
    """What the recorder tracks for a managed object: the service holds it while the object
    serves and drops it once the object was closed and a new lifespan starts, so that the new
    lifespan's object takes over its metrics (the recorder holds a weak reference)."""

    __slots__ = ("__weakref__", "obj")

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def statistics(self) -> Any:
        return self.obj.statistics()

    def __repr__(self) -> str:
        return f"<statistics of {self.obj!r}>"


def track(
    recorder: MetricsRecorder,
    obj: Any,
    name: str,
    standard: bool,
    labels: Mapping[str, object] | None,
) -> Exported:
    """Export ``obj.statistics()`` through ``recorder`` (``svc.manage``), naming the fixes that
    exist when two managed objects would feed the same standard metrics."""
    exported = Exported(obj)
    try:
        recorder.track(exported, prefix=f"fastinfer_{name}", standard=standard, labels=labels)
    except ConfigError as exc:
        text = str(exc)
        clash = re.search(r"would both write (\S+?);", text)
        mismatch = re.search(r"metric '(fastinfer_\w+)' already exists as", text)
        if clash is None and not (mismatch and mismatch.group(1) in STANDARD_METRICS):
            raise
        what = clash.group(1) if clash else f"{mismatch.group(1) if mismatch else ''}, {text}"
        raise ConfigError(
            f"manage({name!r}): {type(obj).__name__} feeds the same standard metrics as an "
            f"object already managed ({what}). Fix, for a second model: {_labels_hint(name)}; "
            f"for a second stage behind the first (a PinnedPool the batcher feeds): "
            f"svc.manage(..., name={name!r}, standard=False) exports its statistics as "
            f"fastinfer_{name}_* only"
        ) from None
    return exported


@dataclass(frozen=True)
class WorkerCounts:
    """The standard worker metrics of one pool (a :class:`PoolWorkers` snapshot)."""

    workers_alive: int = gauge(standard=WORKERS_ALIVE)
    worker_restarts_total: int = counter(standard=WORKER_RESTARTS)
    busy_ratio_per_worker: dict[int, float] = gauge(
        standard=WORKER_BUSY_RATIO, key_label="worker", default_factory=dict
    )


class PoolWorkers:
    """A pool's worker counts as their standard metrics (``fastinfer_workers_alive``,
    ``fastinfer_worker_restarts_total``, ``fastinfer_worker_busy_ratio{worker}``, what the
    dashboards plot). ``serve_model`` manages its pool with ``standard=False`` (its queue depth
    and request counts would double the batcher's), so these are tracked apart."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def statistics(self) -> WorkerCounts:
        s = self.pool.statistics()
        return WorkerCounts(
            workers_alive=s.workers_alive,
            worker_restarts_total=s.worker_restarts_total,
            busy_ratio_per_worker=dict(s.busy_ratio_per_worker),
        )

    def __repr__(self) -> str:
        return f"<worker metrics of {self.pool!r}>"


def labelled_hooks(recorder: MetricsRecorder, labels: Mapping[str, object]) -> BatcherHooks:
    """``svc.batcher_hooks(labels=...)``: the standard distributions of one model, labelled."""
    if not isinstance(labels, Mapping) or not labels:
        raise ConfigError(
            f"batcher_hooks(labels=...) takes a non-empty mapping such as {{'model': 'a'}}, "
            f"got {labels!r}"
        )
    values = {str(k): str(v) for k, v in labels.items()}
    series = {}
    for metric in (REQUEST_LATENCY, QUEUE_WAIT, BATCH_SIZE, BATCH_EXECUTION):
        spec = STANDARD_METRICS[metric]
        try:
            hist = recorder.histogram(metric, spec.help, unit=spec.unit, labels=sorted(values))
            series[metric] = hist.labels(**values)
        except ConfigError as exc:
            raise ConfigError(
                f"batcher_hooks(labels={values!r}): {exc} Every model of the service needs the "
                "same label names (or none, for a service of one model): pass labels= with them "
                "to each svc.batcher_hooks() and svc.manage()"
            ) from None
    latency, wait = series[REQUEST_LATENCY], series[QUEUE_WAIT]
    size, execution = series[BATCH_SIZE], series[BATCH_EXECUTION]

    def on_batch(rec: Any) -> None:
        size.observe(rec.size)
        if rec.execution_seconds is not None:
            execution.observe(rec.execution_seconds)
        for seconds in rec.queue_wait_seconds:
            wait.observe(seconds)

    def on_request(rec: Any) -> None:
        if rec.outcome == "ok":
            latency.observe(rec.latency_seconds)

    return BatcherHooks(on_batch=on_batch, on_request=on_request)


def unlabelled_metrics(recorder: MetricsRecorder) -> StandardMetrics:
    """``svc.metrics``: the standard metrics without labels (created at first use)."""
    try:
        return standard_metrics(recorder)
    except ConfigError as exc:
        raise ConfigError(
            f"the standard metrics of this service have labels (its models were wired with "
            f"labels=...), so svc.metrics and svc.batcher_hooks() without labels cannot be "
            f"used: {exc} Fix: pass labels= to svc.batcher_hooks() and svc.manage() here too"
        ) from None


class Registrations:
    """What ``svc.manage`` registered beyond its ``(name, obj)`` list: each object's exported
    statistics, and which objects were managed outside the setup function (at import time):
    those are closed at the end of a lifespan, and a later lifespan cannot use them."""

    def __init__(self) -> None:
        self.exported: dict[int, list[Exported]] = {}
        self.outside: set[int] = set()
        self.retired: list[str] = []  # managed outside setup, closed: no later lifespan serves
        self._stale: list[Exported] = []  # closed objects' statistics, dropped at the next start

    def add(self, obj: Any, exported: Exported | None, in_setup: bool) -> None:
        if exported is not None:
            self.attach(obj, exported)
        if not in_setup:
            self.outside.add(id(obj))

    def attach(self, obj: Any, exported: Exported) -> None:
        """Export more of managed ``obj``'s statistics: dropped when ``obj`` is."""
        self.exported.setdefault(id(obj), []).append(exported)

    def closing(self, items: list[tuple[str, Any]]) -> None:
        """``items`` are being closed: their metrics stay until the next lifespan starts."""
        for name, obj in items:
            self._stale.extend(self.exported.pop(id(obj), []))
            if id(obj) in self.outside:
                self.outside.discard(id(obj))
                self.retired.append(name)

    def new_lifespan(self) -> None:
        self._stale.clear()  # the recorder stops reading them (it holds weak references)

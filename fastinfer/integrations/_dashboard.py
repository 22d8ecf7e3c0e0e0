"""The live dashboard of :class:`~fastinfer.integrations.fastapi.FastInferService` (opt-in).

``GET /dashboard`` is one self-contained HTML page (inline CSS, JavaScript and SVG, nothing
fetched from elsewhere; :mod:`._dashboard_page`) that polls ``GET /dashboard/data`` every second.
The data is read from the service's :class:`~fastinfer.metrics.MetricsRecorder` and readiness:

- request rate, by status class, and p50/p99 latency of the app's routes over the last
  ``window_seconds`` (the HTTP metrics; the service's own routes are not counted);
- queue depth and batches in flight (the managed batchers' statistics);
- the batch-size distribution over the window (over the whole run when no batch ran lately);
- request outcomes, requests refused at the HTTP layer, and the setup phases with their times.

Windows are differences between snapshots the dashboard keeps (one at most every 0.25 s, shared
by every open page), so the page shows what happens now, not averages since start-up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastinfer.metrics import MetricsRecorder, MetricsSnapshot

# One definition of bucket percentiles: the metrics package's (the same as every snapshot's).
from fastinfer.metrics._snapshot import hist_series_snapshot

__all__ = ["Dashboard", "add_dashboard_routes"]

HTTP = "fastinfer_http_request_seconds"
BATCH_SIZE = "fastinfer_batch_size"
QUEUE_DEPTH = "fastinfer_queue_depth"
IN_FLIGHT = "fastinfer_batches_in_flight"
REQUESTS = "fastinfer_requests_total"
REFUSED = "fastinfer_http_refused_total"
COMPILE_CACHE = "fastinfer_compile_cache_total"


@dataclass
class _Hist:
    bounds: tuple[float, ...] = ()
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    lo: float | None = None
    hi: float | None = None

    @property
    def n(self) -> int:
        return sum(self.counts)


@dataclass
class _Sample:
    t: float
    http: _Hist
    http_by_class: dict[str, int]
    batch: _Hist
    counters: dict[str, dict[str, float]]
    gauges: dict[str, float]


def _hist(snap: MetricsSnapshot, name: str, keep: Callable[[dict[str, str]], bool]) -> _Hist:
    if name not in snap:
        return _Hist()
    metric = snap[name]
    out = _Hist(bounds=tuple(metric.buckets), counts=[0] * (len(metric.buckets) + 1))
    for s in metric.series:
        if not keep(dict(s.labels)) or not s.bucket_counts:
            continue
        out.counts = [a + b for a, b in zip(out.counts, s.bucket_counts)]
        out.total += s.sum
        if s.min is not None:
            out.lo = s.min if out.lo is None else min(out.lo, s.min)
        if s.max is not None:
            out.hi = s.max if out.hi is None else max(out.hi, s.max)
    return out


def _by_label(snap: MetricsSnapshot, name: str) -> dict[str, float]:
    if name not in snap:
        return {}
    metric = snap[name]
    out: dict[str, float] = {}
    for s in metric.series:
        key = ",".join(s.labels.values()) or "total"
        out[key] = out.get(key, 0.0) + float(s.value or 0.0)
    return out


def _gauge(snap: MetricsSnapshot, name: str) -> float:
    if name not in snap:
        return 0.0
    return float(sum(s.value or 0.0 for s in snap[name].series))


class Dashboard:
    """Windowed numbers for the page, from a recorder and the service's readiness."""

    def __init__(
        self,
        recorder: MetricsRecorder,
        readiness: Callable[[], dict[str, Any]],
        *,
        own_paths: set[str],
        window_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recorder = recorder
        self.readiness = readiness
        self.own_paths = own_paths
        self.window = window_seconds
        self.clock = clock
        self._samples: deque[_Sample] = deque()
        self._lock = threading.Lock()

    def _sample(self) -> _Sample:
        snap = self.recorder.snapshot()

        def app_route(labels: dict[str, str]) -> bool:
            return labels.get("route") not in self.own_paths

        by_class: dict[str, int] = {}
        if HTTP in snap:
            for s in snap[HTTP].series:
                if app_route(dict(s.labels)):
                    status = s.labels.get("status", "?")
                    by_class[status] = by_class.get(status, 0) + s.count
        return _Sample(
            t=self.clock(),
            http=_hist(snap, HTTP, app_route),
            http_by_class=by_class,
            batch=_hist(snap, BATCH_SIZE, lambda labels: True),
            counters={name: _by_label(snap, name) for name in (REQUESTS, REFUSED, COMPILE_CACHE)},
            gauges={name: _gauge(snap, name) for name in (QUEUE_DEPTH, IN_FLIGHT)},
        )

    def data(self) -> dict[str, Any]:
        """What ``GET /dashboard/data`` returns (plain JSON)."""
        with self._lock:
            now = self.clock()
            if not self._samples or now - self._samples[-1].t >= 0.25:
                self._samples.append(self._sample())
            while len(self._samples) > 2 and self._samples[1].t < now - self.window:
                self._samples.popleft()  # keep one sample at or before the window's start
            new = self._samples[-1]
            old = self._samples[0] if len(self._samples) > 1 else None
        out: dict[str, Any] = {
            "readiness": self.readiness(),
            "window_seconds": None,
            "request_rate": None,
            "status_rates": {},
            "latency_p50_ms": None,
            "latency_p99_ms": None,
            "queue_depth": new.gauges[QUEUE_DEPTH],
            "batches_in_flight": new.gauges[IN_FLIGHT],
            "requests": new.counters[REQUESTS],
            "refused": new.counters[REFUSED],
            "compile_cache": new.counters[COMPILE_CACHE],
            "http_requests": new.http.n,
        }
        batch = new.batch
        if old is not None and new.t > old.t:
            dt = new.t - old.t
            out["window_seconds"] = round(dt, 3)
            http = _delta(new.http, old.http)
            out["request_rate"] = http.n / dt
            out["status_rates"] = {
                k: (v - old.http_by_class.get(k, 0)) / dt for k, v in new.http_by_class.items()
            }
            if http.n:
                pct = hist_series_snapshot(
                    {},
                    http.counts,
                    http.total,
                    new.http.lo or 0.0,
                    new.http.hi or 0.0,
                    http.bounds,
                    False,
                )
                out["latency_p50_ms"] = (pct.p50 or 0.0) * 1000
                out["latency_p99_ms"] = (pct.p99 or 0.0) * 1000
            recent = _delta(new.batch, old.batch)
            if recent.n:
                batch = recent
        out["batch_sizes"] = _batch_rows(batch)
        out["batch_sizes_scope"] = "window" if batch is not new.batch else "total"
        out["batch_size_mean"] = batch.total / batch.n if batch.n else None
        return out


def _delta(new: _Hist, old: _Hist) -> _Hist:
    if not old.counts or len(old.counts) != len(new.counts):
        return new
    return _Hist(
        bounds=new.bounds,
        counts=[a - b for a, b in zip(new.counts, old.counts)],
        total=new.total - old.total,
        lo=new.lo,
        hi=new.hi,
    )


def _batch_rows(h: _Hist) -> list[dict[str, Any]]:
    """Non-empty power-of-two buckets as ``{"label": "5-8", "count": n}``, smallest first."""
    rows = []
    lower = 0.0
    for i, count in enumerate(h.counts):
        upper = h.bounds[i] if i < len(h.bounds) else float("inf")
        if count:
            lo = int(lower) + 1
            hi = "+" if upper == float("inf") else str(int(upper))
            label = hi if str(lo) == hi else (f"{lo}+" if hi == "+" else f"{lo}-{hi}")
            rows.append({"label": label, "count": count})
        lower = upper
    return rows


def add_dashboard_routes(
    app: Any,
    recorder: MetricsRecorder,
    readiness: Callable[[], dict[str, Any]],
    paths: dict[str, str],
) -> None:
    """``GET paths["dashboard"]`` (the page) and ``GET paths["dashboard_data"]`` (its JSON)."""
    from fastapi.responses import HTMLResponse, JSONResponse

    from fastinfer.integrations._dashboard_page import CSP, render_page

    board = Dashboard(recorder, readiness, own_paths=set(paths.values()))
    page = render_page(paths["dashboard_data"])

    @app.get(paths["dashboard"], include_in_schema=False)
    async def dashboard() -> Any:
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP})

    @app.get(paths["dashboard_data"], include_in_schema=False)
    async def dashboard_data() -> Any:
        body = await asyncio.to_thread(board.data)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

"""Ray Serve integration: fastinfer's batcher, compile cache, thread plan and metrics in a replica.

Imported only from here (``import fastinfer`` never imports Ray). Needs the ``ray`` extra.

Ray Serve hosts the replicas (placement across nodes, autoscaling, HTTP); fastinfer does what
happens inside one replica. :class:`FastInferReplica` is built in the deployment's ``__init__``:

1. sizes torch's threads to the CPUs Ray assigned to the replica (``num_cpus``), capped by the
   machine's/container's core budget (:class:`fastinfer.CorePlan`), so replicas on one node do not
   oversubscribe it;
2. imports a compile-cache bundle (a path on an image layer or shared volume, the bundle's bytes,
   or a Ray ``ObjectRef`` from :func:`put_bundle`) so :meth:`FastInferReplica.compile` loads the
   compiled graphs instead of compiling them;
3. builds a :class:`fastinfer.DynamicBatcher` (work-conserving: a batch is sealed when the model
   is free, unlike ``@serve.batch`` which seals on its timer while the previous batch still runs);
4. records the standard metrics and ships ``collect_delta()`` every ``ship_interval_seconds`` to one
   named Ray actor per cluster, whose merged recorder :func:`metrics_app` serves to Prometheus.

    from ray import serve
    from fastinfer.integrations.ray import FastInferReplica, metrics_app, put_bundle

    @serve.deployment(num_replicas=2, max_ongoing_requests=256, ray_actor_options={"num_cpus": 2})
    class Classifier:
        def __init__(self, bundle):
            self.fi = FastInferReplica(name="classifier", bundle=bundle)
            compiled = self.fi.compile(build_model(), torch.randn(8, 32), batch_sizes=(1, 8, 32))
            self.batcher = self.fi.batcher(
                lambda x: compiled(x), max_batch_size=32, max_wait_ms=5, collate="stack"
            )

        async def __call__(self, request):
            x = torch.tensor((await request.json())["x"])
            return {"y": (await self.batcher.submit(x)).tolist()}

        def __del__(self):
            self.fi.close()

    serve.run(Classifier.bind("/opt/cache/model.tar"), name="classifier")
    serve.run(metrics_app(), name="fastinfer-metrics", route_prefix="/fastinfer-metrics")

Set ``max_ongoing_requests`` well above ``max_batch_size``: Serve's default (5) never lets more
than 5 requests into a replica, so no batch can grow past 5. See docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastinfer._common.export import gauge, not_exported
from fastinfer._optional import require
from fastinfer.batching import DynamicBatcher
from fastinfer.compiling import CompiledModel, InductorCache, compile_model
from fastinfer.errors import CardinalityError, ConfigError
from fastinfer.metrics import MetricsRecorder, MetricsSnapshot, standard_metrics
from fastinfer.pool import CorePlan, ThreadSettings, configure_threads

__all__ = [
    "AGGREGATOR_NAME",
    "AGGREGATOR_NAMESPACE",
    "FastInferReplica",
    "ReplicaStatistics",
    "assigned_cpus",
    "import_bundle",
    "merged_exposition",
    "metrics_aggregator",
    "metrics_app",
    "put_bundle",
    "replica_threads",
]

logger = logging.getLogger(__name__)

#: Name and namespace of the cluster-wide metrics actor (namespaced so the driver, which runs in
#: an anonymous namespace, and the replicas, which run in Serve's, find the same actor).
AGGREGATOR_NAME = "fastinfer-metrics"
AGGREGATOR_NAMESPACE = "fastinfer"
_MAX_PENDING = 600  # deltas kept while the aggregator is unreachable (10 min at 1 s)


def _ray() -> Any:
    return require("ray", purpose="fastinfer.integrations.ray")


# --------------------------------------------------------------------------------------------
# Threads from Ray's CPU assignment
# --------------------------------------------------------------------------------------------


def assigned_cpus() -> float | None:
    """CPUs Ray assigned to the calling actor/task (``num_cpus``), or None outside a Ray worker."""
    ray = _ray()
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    worker = getattr(ctx, "worker", None)
    if getattr(worker, "mode", None) != getattr(ray, "WORKER_MODE", 1):  # the driver: none
        return None
    cpus = ctx.get_assigned_resources().get("CPU")
    return float(cpus) if cpus else None


def replica_threads(cpus: float | None, *, plan: CorePlan | None = None) -> int:
    """Intra-op threads for a replica given ``cpus`` CPUs: ``floor(cpus)`` (at least 1), never more
    than the physical cores the process may use (``plan.core_budget``, which honours the cgroup
    CPU quota). ``cpus=None`` (no assignment known) gives the core budget.

        >>> replica_threads(2.0, plan=plan_with_8_cores)   # 2
        >>> replica_threads(0.5, plan=plan_with_8_cores)   # 1
    """
    if cpus is not None and (isinstance(cpus, bool) or not cpus > 0):
        raise ConfigError(f"cpus must be a number > 0 or None, got {cpus!r}")
    budget = (plan if plan is not None else CorePlan.detect()).core_budget
    if cpus is None:
        return budget
    return max(1, min(budget, math.floor(cpus + 1e-9)))


# --------------------------------------------------------------------------------------------
# Compile-cache bundles through the object store
# --------------------------------------------------------------------------------------------


def put_bundle(path: str | os.PathLike[str]) -> Any:
    """Put a cache bundle's bytes into Ray's object store; pass the ``ObjectRef`` to replicas.

    Every node then fetches the bundle from the object store instead of needing a shared volume.
    The driver owns the object: keep the driver (or a detached actor holding the ref) alive while
    replicas may start.
    """
    ray = _ray()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"cache bundle {p} does not exist; make one with `fastinfer warm --bundle`"
        )
    return ray.put(p.read_bytes())


def import_bundle(
    bundle: str | os.PathLike[str] | bytes | Any,
    dest: str | os.PathLike[str] | None = None,
    *,
    tag: str | None = None,
) -> InductorCache:
    """Import a bundle given as a path, its bytes, or an ``ObjectRef`` to its bytes.

    ``dest`` defaults to ``$FASTINFER_CACHE_DIR``. Concurrent importers on one node are safe (the
    cache manager unpacks under a lock and publishes atomically). Raises
    :class:`fastinfer.CacheMismatchError` when the bundle was built for another environment
    (torch, CPU ISA, thread count, compiler...).
    """
    if isinstance(bundle, str | os.PathLike):
        return InductorCache.import_(bundle, dest, tag=tag)
    if not isinstance(bundle, bytes | bytearray | memoryview):
        ray = _ray()
        if not isinstance(bundle, ray.ObjectRef):
            raise ConfigError(
                "bundle must be a path, the bundle's bytes or a Ray ObjectRef from put_bundle(), "
                f"got {type(bundle).__name__}"
            )
        bundle = ray.get(bundle)
    with tempfile.TemporaryDirectory(prefix="fastinfer-bundle-") as tmp:
        path = Path(tmp) / "bundle.tar"
        path.write_bytes(bytes(bundle))
        return InductorCache.import_(path, dest, tag=tag)


# --------------------------------------------------------------------------------------------
# Metrics: one aggregator actor per cluster
# --------------------------------------------------------------------------------------------


class _Aggregator:
    """The body of the metrics actor: merges replicas' deltas into one recorder."""

    def __init__(self) -> None:
        self.recorder = MetricsRecorder()
        standard_metrics(self.recorder)

    def merge(self, delta: MetricsSnapshot, worker: str) -> bool:
        """Merge one replica's delta; a delta the recorder refuses (over ``max_series``, or
        malformed) is dropped whole, logged and counted in ``statistics().deltas_refused``, so
        the replica does not resend it forever."""
        try:
            return self.recorder.merge(delta, worker=worker)
        except (CardinalityError, ConfigError) as exc:
            logger.error("metrics delta from %s refused and dropped: %s", worker, exc)
            return False

    def forget(self, worker: str) -> None:
        self.recorder.forget_worker(worker)

    def exposition(self, openmetrics: bool = False) -> str:
        return self.recorder.exposition(openmetrics=openmetrics)

    def snapshot(self) -> dict[str, Any]:
        return self.recorder.snapshot().to_dict()

    def workers(self) -> int:
        return self.recorder.statistics().workers


def metrics_aggregator(
    name: str = AGGREGATOR_NAME, *, namespace: str = AGGREGATOR_NAMESPACE
) -> Any:
    """The cluster's metrics actor (created on first use, then shared): a detached, zero-CPU
    named actor holding the merged :class:`fastinfer.MetricsRecorder` of every replica.

    Methods (call with ``.remote()``): ``merge(delta, worker)``, ``forget(worker)``,
    ``exposition(openmetrics=False)``, ``snapshot()`` (a ``MetricsSnapshot.to_dict()``),
    ``workers()``. Detached so it outlives replica restarts; ``ray.kill`` it to drop it.
    """
    ray = _ray()
    actor = ray.remote(num_cpus=0, max_restarts=-1)(_Aggregator)
    return actor.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True
    ).remote()


def merged_exposition(name: str = AGGREGATOR_NAME, *, namespace: str = AGGREGATOR_NAMESPACE) -> str:
    """Prometheus text of every replica's merged metrics (blocking; for scripts and tests)."""
    ray = _ray()
    return str(ray.get(metrics_aggregator(name, namespace=namespace).exposition.remote()))


def metrics_app(
    name: str = AGGREGATOR_NAME, *, namespace: str = AGGREGATOR_NAMESPACE, openmetrics: bool = False
) -> Any:
    """A Serve application that answers ``GET`` with the merged metrics in Prometheus format.

        serve.run(metrics_app(), name="fastinfer-metrics", route_prefix="/fastinfer-metrics")

    Point one Prometheus scrape job at ``http://<serve-proxy>:8000/fastinfer-metrics`` (each
    series carries a ``worker`` label only where it must: per-replica gauges).
    """
    require("ray.serve", purpose="metrics_app")
    from ray import serve

    @serve.deployment(name="FastInferMetrics", ray_actor_options={"num_cpus": 0})
    class FastInferMetrics:
        def __init__(self) -> None:
            self._agg = metrics_aggregator(name, namespace=namespace)

        async def __call__(self, request: Any = None) -> Any:
            text = await self._agg.exposition.remote(openmetrics)
            if request is None:  # called through a handle
                return text
            from starlette.responses import Response

            media = (
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
                if openmetrics
                else "text/plain; version=0.0.4; charset=utf-8"
            )
            return Response(text, media_type=media)

    return FastInferMetrics.bind()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# The replica helper
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaStatistics:
    """A snapshot of a :class:`FastInferReplica`."""

    replica: str = not_exported("text: the replica's id")
    assigned_cpus: float | None = gauge()
    threads: int = gauge()
    bundle_imported: bool = gauge()
    cache_dir: str | None = not_exported("a path")
    import_seconds: float = gauge()
    deltas_shipped: int = gauge()
    deltas_pending: int = gauge()
    ship_errors: int = gauge()
    closed: bool = gauge()


def _replica_id() -> str:
    """Serve's replica id inside a replica, else ``pid<N>``."""
    try:
        if not _ray().is_initialized():
            return f"pid{os.getpid()}"
        from ray import serve

        ctx = serve.get_replica_context()
        rid = ctx.replica_id
        return f"{rid.deployment_id.app_name}/{rid.deployment_id.name}#{rid.unique_id}"
    except Exception:
        return f"pid{os.getpid()}"


class FastInferReplica:
    """fastinfer's per-replica setup for a Ray Serve deployment (build it in ``__init__``).

    Args:
        name: the model's name (in log lines and the batcher's name).
        bundle: a compile-cache bundle to import (path, bytes, or ``ObjectRef`` from
            :func:`put_bundle`); ``None`` compiles into ``cache_dir`` (or without a cache).
        cache_dir: where the bundle is unpacked / compiled into (default ``$FASTINFER_CACHE_DIR``,
            else a per-process temporary folder when a bundle is given).
        tag: the bundle's tag (checked against its manifest).
        threads: ``"ray"`` (default: from the CPUs Ray assigned, see :func:`replica_threads`),
            an int, or ``None`` to leave torch's threads alone. Set before the bundle is imported,
            because the thread count is part of a cache's manifest: build the bundle with the
            same count (``OMP_NUM_THREADS=N fastinfer warm ...``).
        aggregator: name of the metrics actor (:func:`metrics_aggregator`); ``None`` keeps metrics
            local (read them from :attr:`recorder`).
        ship_interval_seconds: how often the replica ships its metric deltas.

    Raises :class:`fastinfer.CacheMismatchError` when the bundle does not match this replica
    (a different thread count is the usual cause), and :class:`fastinfer.ConfigError` for bad
    arguments.
    """

    def __init__(
        self,
        *,
        name: str = "model",
        bundle: str | os.PathLike[str] | bytes | Any | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        tag: str | None = None,
        threads: int | str | None = "ray",
        aggregator: str | None = AGGREGATOR_NAME,
        aggregator_namespace: str = AGGREGATOR_NAMESPACE,
        ship_interval_seconds: float = 1.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        if isinstance(ship_interval_seconds, bool) or not ship_interval_seconds > 0:
            raise ConfigError(
                f"ship_interval_seconds must be > 0 seconds, got {ship_interval_seconds!r}"
            )
        self.name = name
        self.replica = _replica_id()
        self._cpus = assigned_cpus()
        self.thread_settings: ThreadSettings | None = None
        if threads == "ray":
            self.thread_settings = configure_threads(replica_threads(self._cpus))
        elif isinstance(threads, int) and not isinstance(threads, bool):
            self.thread_settings = configure_threads(threads)
        elif threads is not None:
            raise ConfigError(f"threads must be 'ray', an int or None, got {threads!r}")

        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.cache: InductorCache | None = None
        t0 = time.perf_counter()
        if bundle is not None:
            dest = cache_dir
            if dest is None and not os.environ.get("FASTINFER_CACHE_DIR"):
                self._tmp = tempfile.TemporaryDirectory(prefix="fastinfer-replica-")
                dest = Path(self._tmp.name) / "cache"
            self.cache = import_bundle(bundle, dest, tag=tag)
        elif cache_dir is not None:
            self.cache = InductorCache(cache_dir, tag=tag)
        self._import_s = time.perf_counter() - t0 if bundle is not None else 0.0

        self.recorder = MetricsRecorder()
        self.metrics = standard_metrics(self.recorder)
        self._batchers: list[DynamicBatcher[Any, Any]] = []
        self._closed = False
        self._lock = threading.Lock()
        self._pending: list[MetricsSnapshot] = []
        self._shipped = 0
        self._ship_errors = 0
        self._agg: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if aggregator is not None and _ray().is_initialized():
            self._agg = metrics_aggregator(aggregator, namespace=aggregator_namespace)
            self._interval = float(ship_interval_seconds)
            self._thread = threading.Thread(
                target=self._ship_loop, name=f"fastinfer-metrics-{name}", daemon=True
            )
            self._thread.start()

    # ------------------------------------------------------------------ building blocks

    def compile(
        self, model: Callable[..., Any], example_inputs: Any, **kwargs: Any
    ) -> CompiledModel:
        """:func:`fastinfer.compile_model` with this replica's cache; records compile time and
        cache hits/misses (``fastinfer_compile_seconds``, ``fastinfer_compile_cache_total``)."""
        if self.cache is not None:
            kwargs.setdefault("cache", self.cache)
        compiled = compile_model(model, example_inputs, **kwargs)
        st = compiled.statistics()
        self.metrics.compile_seconds.observe(st.compile_seconds)
        for result, count in (
            ("hit", st.cache_hits),
            ("miss", st.cache_misses),
            ("bypass", st.cache_bypasses),
        ):
            self.metrics.compile_cache.labels(result).inc(count)
        logger.info(
            "replica %s compiled %s: %d graphs, %d cache hits, %d misses, %.1fs",
            self.replica,
            self.name,
            st.graphs,
            st.cache_hits,
            st.cache_misses,
            st.compile_seconds,
        )
        return compiled

    def batcher(self, fn: Callable[[Any], Any], **kwargs: Any) -> DynamicBatcher[Any, Any]:
        """A :class:`fastinfer.DynamicBatcher` whose distributions (request latency, queue wait,
        batch size, batch execution time) and counts (requests by outcome, queue depth) are
        recorded and shipped. ``kwargs`` go to the batcher (``max_batch_size``, ``max_wait_ms``...).
        """
        if "on_batch" in kwargs or "on_request" in kwargs:
            raise ConfigError(
                "FastInferReplica.batcher() sets on_batch/on_request itself to record metrics; "
                "build DynamicBatcher yourself to pass your own"
            )
        kwargs.setdefault("name", f"DynamicBatcher[{self.name}]")
        b: DynamicBatcher[Any, Any] = DynamicBatcher(fn, **self.metrics.batcher_hooks(), **kwargs)
        if not self._batchers:
            self.recorder.track(b, prefix="fastinfer_batcher")
        else:  # the standard series belong to the first batcher; later ones get their own names
            self.recorder.track(
                b, prefix="fastinfer_batcher", labels={"batcher": kwargs["name"]}, standard=False
            )
        self._batchers.append(b)
        return b

    # ------------------------------------------------------------------ metrics shipping

    def _ship_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush_metrics(timeout=max(5.0, self._interval * 5), raise_errors=False)

    def flush_metrics(self, *, timeout: float = 30.0, raise_errors: bool = True) -> bool:
        """Ship what changed since the last ship now (blocking). Deltas that cannot be delivered
        are kept (up to 600) and sent in order next time, so no count is lost or doubled."""
        if self._agg is None:
            return False
        ray = _ray()
        with self._lock:
            self._pending.append(self.recorder.collect_delta())
            del self._pending[:-_MAX_PENDING]
            try:
                while self._pending:
                    ray.get(self._agg.merge.remote(self._pending[0], self.replica), timeout=timeout)
                    self._pending.pop(0)
                    self._shipped += 1
            except Exception:
                self._ship_errors += 1
                if raise_errors:
                    raise
                if self._ship_errors == 1:
                    logger.exception("shipping metrics to the aggregator failed; will retry")
                return False
        return True

    # ------------------------------------------------------------------ lifecycle

    def statistics(self) -> ReplicaStatistics:
        return ReplicaStatistics(
            replica=self.replica,
            assigned_cpus=self._cpus,
            threads=self.thread_settings.threads if self.thread_settings else _torch_threads(),
            bundle_imported=self._import_s > 0,
            cache_dir=None if self.cache is None else str(self.cache.path),
            import_seconds=self._import_s,
            deltas_shipped=self._shipped,
            deltas_pending=len(self._pending),
            ship_errors=self._ship_errors,
            closed=self._closed,
        )

    def close(self) -> None:
        """Drain the batchers, ship the last metrics, drop this replica's gauges from the
        aggregator and remove the temporary cache folder. Idempotent; call it from the
        deployment's ``__del__`` (Serve's shutdown hook)."""
        if self._closed:
            return
        self._closed = True
        for b in self._batchers:
            try:
                b.close()
            except Exception:  # a batcher bound to the replica's running loop: Serve drains it
                logger.debug("could not close %r from this thread", b, exc_info=True)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._agg is not None:
            try:
                self.flush_metrics(timeout=10)
                _ray().get(self._agg.forget.remote(self.replica), timeout=10)
            except Exception:
                logger.warning("could not ship the last metrics of %s", self.replica)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def aclose(self) -> None:
        """:meth:`close` for async code: batchers on this loop drain here, the rest in a thread."""
        for b in self._batchers:
            await b.aclose()
        await asyncio.to_thread(self.close)

    def __enter__(self) -> FastInferReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> FastInferReplica:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<FastInferReplica {self.name} {self.replica} threads={self.statistics().threads}>"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()

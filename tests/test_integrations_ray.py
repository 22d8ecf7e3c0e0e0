"""fastinfer inside Ray Serve: thread sizing, bundles, metrics shipping, and a real local cluster.

The cluster test starts Ray on this machine (2 CPUs), bakes a compile-cache bundle with the
``fastinfer warm`` CLI (1 thread, what a 0.5-CPU replica gets), hands it to 2 replicas through the
object store, sends concurrent requests through the deployment handle and checks results,
batching, the no-compile warm start and the merged metrics of both replicas. Skipped when Ray is
not installed (``pip install 'fastinfer[ray]'``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, run_python

from fastinfer import ConfigError
from fastinfer.integrations.ray import FastInferReplica, replica_threads
from fastinfer.pool import Core, CorePlan


def _plan(cores: int, quota: float | None = None) -> CorePlan:
    return CorePlan(tuple(Core((i,), i, 0, 0) for i in range(cores)), quota_cpus=quota)


@pytest.mark.parametrize(
    ("cpus", "cores", "quota", "expected"),
    [
        (2.0, 8, None, 2),
        (0.5, 8, None, 1),
        (3.7, 8, None, 3),
        (16.0, 4, None, 4),
        (4.0, 8, 1.5, 1),
        (None, 8, 2.5, 2),
        (None, 6, None, 6),
    ],
    ids=["whole", "fraction", "floor", "capped-by-cores", "capped-by-quota", "none-quota", "none"],
)
def test_replica_threads(
    cpus: float | None, cores: int, quota: float | None, expected: int
) -> None:
    assert replica_threads(cpus, plan=_plan(cores, quota)) == expected


@pytest.mark.parametrize("bad", [0, -1.0, True], ids=["zero", "negative", "bool"])
def test_replica_threads_rejects_bad_cpus(bad: Any) -> None:
    with pytest.raises(ConfigError, match="cpus must be"):
        replica_threads(bad, plan=_plan(2))


def test_replica_outside_ray_keeps_metrics_local() -> None:
    pytest.importorskip("ray")
    fi = FastInferReplica(name="echo", threads=1, aggregator=None)
    try:
        assert torch.get_num_threads() == 1
        b = fi.batcher(lambda xs: [x * 2 for x in xs], max_batch_size=4, max_wait_ms=1)
        assert [b.submit_sync(i) for i in range(3)] == [0, 2, 4]
        snap = fi.recorder.snapshot()
        assert snap.value("fastinfer_requests_total", outcome="ok") == 3
        assert snap["fastinfer_batch_size"].series[0].count == 3
        assert not fi.flush_metrics()  # no aggregator: nothing to ship
        st = fi.statistics()
        assert (st.threads, st.bundle_imported, st.deltas_shipped) == (1, False, 0)
    finally:
        fi.close()
    assert fi.statistics().closed and b.closed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": "all"}, "threads must be"),
        ({"name": ""}, "name must be"),
        ({"ship_interval_seconds": 0}, "ship_interval_seconds"),
    ],
    ids=["threads", "name", "interval"],
)
def test_replica_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match=match):
        FastInferReplica(aggregator=None, **kwargs)


def test_batcher_hooks_cannot_be_overridden() -> None:
    pytest.importorskip("ray")
    fi = FastInferReplica(threads=None, aggregator=None)
    with pytest.raises(ConfigError, match="on_batch/on_request"):
        fi.batcher(lambda xs: xs, max_batch_size=2, max_wait_ms=1, on_batch=print)
    fi.close()


def test_import_bundle_rejects_other_types(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from fastinfer.integrations.ray import import_bundle

    with pytest.raises(ConfigError, match="bundle must be a path"):
        import_bundle(12, tmp_path / "c")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample_sum(fams: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for s in fams[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_replicas_on_a_local_ray_cluster(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    pytest.importorskip("prometheus_client")
    pytest.importorskip("httpx")
    from fastinfer.integrations import ray as fray

    # The build step (Dockerfile): bake the bundle with the thread count the replicas will use.
    bundle = tmp_path / "mlp.tar"
    warm = (
        "import sys; from fastinfer.__main__ import main; sys.exit(main(['warm', "
        "'fastinfer.testing:tiny_mlp', '--input', 'float32[B,32]', '--batch-sizes', '1,8', "
        f"'--bundle', {str(bundle)!r}]))"
    )
    built = json.loads(run_python(warm, env={"OMP_NUM_THREADS": "1"}, timeout=240).stdout.strip())
    assert built["cache_misses"] >= 2 and bundle.is_file()

    ray.init(
        address="local",  # always a new local cluster, never someone else's
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # this checkout's fastinfer
    )
    try:
        ref = fray.put_bundle(bundle)  # the object-store route to every node

        @serve.deployment(
            num_replicas=2, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5}
        )
        class Mlp:
            def __init__(self, bundle: Any) -> None:
                from fastinfer import testing
                from fastinfer.integrations.ray import FastInferReplica

                self.fi = FastInferReplica(name="mlp", bundle=bundle, ship_interval_seconds=0.2)
                compiled = self.fi.compile(
                    testing.tiny_mlp(), torch.randn(8, 32), batch_sizes=(1, 8)
                )
                self.compile_stats = compiled.statistics()

                def run(x: torch.Tensor) -> torch.Tensor:  # (B, 32) -> (B, 8)
                    return compiled(x)

                self.batcher = self.fi.batcher(
                    run, max_batch_size=8, max_wait_ms=5, collate="stack"
                )

            async def __call__(self, x: list[float]) -> dict[str, Any]:
                y = await self.batcher.submit(torch.tensor(x))
                st = self.fi.statistics()
                return {
                    "y": y.tolist(),
                    "replica": st.replica,
                    "threads": st.threads,
                    "torch_threads": torch.get_num_threads(),
                    "cpus": st.assigned_cpus,
                    "misses": self.compile_stats.cache_misses,
                    "hits": self.compile_stats.cache_hits,
                }

        t0 = time.perf_counter()
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(Mlp.bind(ref), name="mlp", route_prefix=None)
        deploy_s = time.perf_counter() - t0

        n = 160
        gen = torch.Generator().manual_seed(0)
        xs = torch.randn(n, 32, generator=gen)
        responses = [handle.remote(x.tolist()) for x in xs]
        out = [r.result(timeout_s=60) for r in responses]

        from fastinfer import testing

        expected = testing.tiny_mlp()(xs).detach()
        torch.testing.assert_close(
            torch.tensor([o["y"] for o in out]), expected, rtol=1e-4, atol=1e-4
        )
        replicas = {o["replica"] for o in out}
        assert len(replicas) == 2, replicas
        for o in out:
            # 0.5 CPU -> 1 thread; the bundle was built for 1 thread, so every graph was a hit.
            assert (o["cpus"], o["threads"], o["torch_threads"]) == (0.5, 1, 1), o
            assert o["misses"] == 0 and o["hits"] == 2, o

        # Metrics: both replicas ship to the aggregator; wait until every request is counted.
        agg = fray.metrics_aggregator()
        deadline = time.monotonic() + 30
        while True:
            fams = _families(ray.get(agg.exposition.remote()))
            ok = _sample_sum(fams, "fastinfer_requests", "fastinfer_requests_total", outcome="ok")
            if ok >= n or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ok == n
        assert ray.get(agg.workers.remote()) == 2
        batches = _sample_sum(fams, "fastinfer_batch_size", "fastinfer_batch_size_count")
        items = _sample_sum(fams, "fastinfer_batch_size", "fastinfer_batch_size_sum")
        assert items == n and items / batches > 1, (items, batches)
        assert (
            _sample_sum(
                fams, "fastinfer_compile_cache", "fastinfer_compile_cache_total", result="hit"
            )
            == 4
        )
        assert (
            _sample_sum(
                fams, "fastinfer_compile_cache", "fastinfer_compile_cache_total", result="miss"
            )
            == 0
        )
        assert (
            _sample_sum(
                fams, "fastinfer_request_latency_seconds", "fastinfer_request_latency_seconds_count"
            )
            == n
        )

        # The Prometheus endpoint: a Serve app over the same aggregator, scraped over HTTP.
        serve.run(fray.metrics_app(), name="fastinfer-metrics", route_prefix="/fastinfer-metrics")
        import httpx

        scrape = httpx.get(f"http://127.0.0.1:{port}/fastinfer-metrics", timeout=30)
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = scrape.text
        fams = _families(text)
        assert _sample_sum(fams, "fastinfer_batch_size", "fastinfer_batch_size_count") == batches
        assert "fastinfer_queue_depth" in fams  # summed over replicas (merge="sum")
        per_replica = {
            s.labels["worker"]
            for s in fams["fastinfer_batcher_batch_size_mean"].samples
            if "worker" in s.labels
        }
        assert per_replica == replicas  # per-replica gauges keep a worker label
        print(f"deploy {deploy_s:.1f}s, mean batch {items / batches:.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_importing_the_integration_does_not_import_ray() -> None:
    out = run_python(
        "import sys, fastinfer.integrations.ray as r; print('ray' in sys.modules, r.AGGREGATOR_NAME)"
    )
    assert out.stdout.split() == ["False", "fastinfer-metrics"]


def test_serve_config_builds_its_applications() -> None:
    """deploy/ray/config.yaml: each import_path builds an app from its args, without a cluster."""
    pytest.importorskip("ray.serve")
    yaml = pytest.importorskip("yaml")
    import importlib.util

    folder = ROOT / "deploy" / "ray"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    spec = importlib.util.spec_from_file_location("serve_app", folder / "serve_app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = set()
    for app in config["applications"]:
        mod, _, fn = app["import_path"].partition(":")
        assert mod == "serve_app" and app["runtime_env"]["working_dir"] == "deploy/ray"
        built = getattr(module, fn)(app.get("args", {}))
        assert type(built).__name__ == "Application"
        names |= {d["name"] for d in app["deployments"]}
    assert names == {"FastInferModel", "FastInferMetrics"}
    (model,) = [a for a in config["applications"] if a["name"] == "model"]
    (dep,) = model["deployments"]
    sizes = [int(s) for s in model["args"]["batch_sizes"].split(",")]
    assert dep["max_ongoing_requests"] >= 2 * max(sizes)
    cpus = dep["ray_actor_options"]["num_cpus"]
    assert replica_threads(cpus, plan=_plan(64)) == cpus  # whole CPUs: the bundle's thread count
    assert f"OMP_NUM_THREADS={cpus} " in (folder / "config.yaml").read_text()

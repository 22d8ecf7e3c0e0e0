"""deploy/: the Dockerfile and the Kubernetes manifests, checked without Docker or a cluster.

- The manifests parse and agree with each other and with the image (probe paths and ports, CPU
  limit = the bundle's thread count, scrape annotations, an HPA on a standard fastinfer metric).
- The CPU limit -> cgroup quota -> thread plan logic picks the right numbers (fake cgroup trees).
- The Dockerfile's own warm step, run as written, makes a bundle that the image's service
  (deploy/app.py), started as a fresh process in another directory, loads with no compile, and
  only then reports ready.
- The manifests validate against the Kubernetes API schema (kubernetes-validate, strict).
- With a Docker engine: deploy/smoke.sh builds (or reuses) the image and runs it for real, cold
  and warm, with requests, /metrics and a drain under load (skipped, with the reason, without one).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT

from fastinfer import CorePlan, configure_threads
from fastinfer.metrics import STANDARD_METRICS

yaml = pytest.importorskip("yaml")

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


# --------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------


def docker_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    return out


def docker_args() -> dict[str, str]:
    args = {}
    for op, rest in docker_instructions():
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    return args


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def docker_env() -> dict[str, str]:
    args, env = docker_args(), {}
    for op, rest in docker_instructions():
        if op == "ENV":
            for part in shlex.split(rest):
                k, v = part.split("=", 1)
                env[k] = substitute(v, {**args, **env})
    return env


def docker_cmd() -> list[str]:
    cmds = [json.loads(rest) for op, rest in docker_instructions() if op == "CMD"]
    assert len(cmds) == 1
    return list(cmds[0])


def warm_command() -> str:
    runs = [rest for op, rest in docker_instructions() if op == "RUN" and "fastinfer warm" in rest]
    assert len(runs) == 1, "the Dockerfile needs exactly one `fastinfer warm` step"
    m = re.search(r"(OMP_NUM_THREADS=\S+ fastinfer warm [^;]+);", runs[0])
    assert m, f"warm step not found in {runs[0]!r}"
    cmd = substitute(m[1].strip(), docker_args())
    # The tests run this command on the host: it must never clean up outside its own folders.
    assert not re.search(r"\brm\b|/tmp|/root", cmd), f"the warm step must only warm: {cmd!r}"
    return cmd


def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(c)


def cpu_quantity(q: str) -> float:
    """A Kubernetes CPU quantity ("2", "1500m", "0.5") in CPUs."""
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def test_every_manifest_parses_and_kustomization_lists_them() -> None:
    docs = manifests()
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Kustomization",
    } <= set(docs)
    listed = set(docs["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_probes_hit_the_service_routes_on_the_image_port() -> None:
    docs = manifests()
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    cmd = docker_cmd()
    image_port = int(cmd[cmd.index("--port") + 1])
    assert ports["http"] == image_port
    assert f"EXPOSE {image_port}" in {f"{op} {rest}" for op, rest in docker_instructions()}
    probe = {k: c[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probe["readinessProbe"]["path"] == "/readyz"  # 200 only once warm
    assert probe["livenessProbe"]["path"] == "/healthz"
    assert probe["startupProbe"]["path"] == "/healthz"
    for p in probe.values():
        assert ports.get(p["port"], p["port"]) == image_port
    # the routes exist in the service the image runs
    app = (DEPLOY / "app.py").read_text()
    assert "FastInferService()" in app and "svc.install(app)" in app


def test_resources_are_guaranteed_and_cpu_limit_matches_the_bundle_threads() -> None:
    c = container(manifests())
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert req == lim, (
        "requests == limits (Guaranteed QoS: exclusive cores with a static CPU policy)"
    )
    cpus = cpu_quantity(lim["cpu"])
    assert cpus == int(cpus), "a whole-CPU limit: a fractional one wastes the remainder"
    assert int(cpus) == int(docker_args()["THREADS"]), (
        "the image's bundle is built for THREADS threads and the pod gets as many as its CPU limit"
    )
    assert "memory" in lim


def test_prometheus_scrape_annotations_point_at_metrics() -> None:
    docs = manifests()
    ann = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == container(docs)["ports"][0]["containerPort"]


def test_service_selects_the_pods() -> None:
    docs = manifests()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = docs["Service"]["spec"]
    assert svc["selector"].items() <= labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["ports"]} <= {p["name"] for p in container(docs)["ports"]}


def test_hpa_scales_the_deployment_on_a_standard_fastinfer_metric() -> None:
    docs = manifests()
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        docs["Deployment"]["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name in STANDARD_METRICS and STANDARD_METRICS[name].kind == "gauge"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    rules = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert any(name in r["seriesQuery"] and r["name"]["as"] == name for r in rules)


def test_dockerfile_bakes_a_bundle_and_sets_the_cache_variables() -> None:
    args, env = docker_args(), docker_env()
    assert args["BASE_IMAGE"].startswith("python:") and "TORCH_INDEX" in args
    assert args["TORCH_INDEX"].endswith("/cpu"), "CPU by default; CUDA through --build-arg"
    ops = [op for op, _ in docker_instructions()]
    assert ops.index("ARG") < ops.index("FROM")  # BASE_IMAGE is usable in FROM
    froms = [rest for op, rest in docker_instructions() if op == "FROM"]
    # two stages on one base: the venv is built apart, so wheels never reach the final image
    assert froms == ["${BASE_IMAGE} AS venv", "${BASE_IMAGE}"]
    assert any(
        op == "COPY" and rest.startswith("--from=venv") for op, rest in docker_instructions()
    )
    assert env["FASTINFER_CACHE_DIR"] == "/var/cache/fastinfer"
    # Inductor's own cache sits next to (not inside) the folder the bundle is imported into
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent == Path(env["FASTINFER_CACHE_DIR"]).parent
    assert not env["TORCHINDUCTOR_CACHE_DIR"].startswith(env["FASTINFER_CACHE_DIR"] + "/")
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    cmd = warm_command()
    assert cmd.startswith(f"OMP_NUM_THREADS={args['THREADS']} fastinfer warm")
    assert f"--bundle {env['APP_BUNDLE']}" in cmd
    # the warm step runs after the cache variables are set, and before the image's user switch
    runs = [i for i, (op, rest) in enumerate(docker_instructions()) if "fastinfer warm" in rest]
    envs = [
        i for i, (op, rest) in enumerate(docker_instructions()) if "FASTINFER_CACHE_DIR" in rest
    ]
    assert envs and runs and envs[0] < runs[0]


# --------------------------------------------------------------------------------------------
# CPU limit -> cgroup quota -> thread plan
# --------------------------------------------------------------------------------------------


def fake_pod(root: Path, *, cores: int, cpu_max: str) -> dict[str, Path]:
    """sys/, proc/ and a cgroup v2 tree as a container with ``cores`` cores and ``cpu.max`` sees."""
    sysfs, proc, cgroup = root / "sys", root / "proc", root / "cgroup"
    cpu_dir = sysfs / "devices/system/cpu"
    for cpu in range(cores):
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{cpu}\n")
        (topo / "physical_package_id").write_text("0\n")
        (topo / "thread_siblings_list").write_text(f"{cpu}\n")
    (cpu_dir / "online").write_text(f"0-{cores - 1}\n")
    (proc / "self").mkdir(parents=True)
    (proc / "self/status").write_text(f"Cpus_allowed_list:\t0-{cores - 1}\n")
    (proc / "self/cgroup").write_text("0::/\n")  # inside the container's cgroup namespace
    cgroup.mkdir()
    (cgroup / "cgroup.controllers").write_text("cpuset cpu memory\n")
    (cgroup / "cpu.max").write_text(cpu_max + "\n")
    return {"sysfs_root": sysfs, "proc_root": proc, "cgroup_root": cgroup}


def k8s_cpu_max(limit: str | None, period: int = 100_000) -> str:
    """What the kubelet writes to cpu.max for a container CPU limit (no limit: "max")."""
    if limit is None:
        return f"max {period}"
    return f"{round(cpu_quantity(limit) * period)} {period}"


@pytest.mark.parametrize(
    ("limit", "cores", "threads"),
    [
        ("2", 16, 2),
        ("1500m", 16, 1),
        ("500m", 16, 1),
        ("3900m", 16, 3),
        ("8", 4, 4),
        (None, 6, 6),
    ],
    ids=["2-cpus", "1.5-cpus", "half-cpu", "3.9-cpus", "limit-above-cores", "no-limit"],
)
def test_cpu_limit_drives_the_thread_plan(
    tmp_path: Path, limit: str | None, cores: int, threads: int
) -> None:
    roots = fake_pod(tmp_path, cores=cores, cpu_max=k8s_cpu_max(limit))
    plan = CorePlan.detect(**roots)
    assert plan.core_budget == threads, str(plan)
    settings = configure_threads(plan.core_budget)
    assert settings.threads == torch.get_num_threads() == threads
    assert os.environ["OMP_NUM_THREADS"] == str(threads)


def test_the_shipped_deployment_gets_the_bundle_thread_count(tmp_path: Path) -> None:
    limit = container(manifests())["resources"]["limits"]["cpu"]
    assert k8s_cpu_max(limit) == "200000 100000"
    roots = fake_pod(tmp_path, cores=32, cpu_max=k8s_cpu_max(limit))
    assert CorePlan.detect(**roots).core_budget == int(docker_args()["THREADS"])


# --------------------------------------------------------------------------------------------
# The image's flow, without Docker: build-time warm step, then a fresh pod process
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image_env(tmp_path: Path) -> dict[str, str]:
    """The Dockerfile's ENV with its absolute folders moved under ``tmp_path``."""
    env = {}
    for k, v in docker_env().items():
        if k in ("PATH", "ATEN_CPU_CAPABILITY"):  # the venv is ours; keep this machine's ISA
            continue
        env[k] = v.replace("/var/cache", str(tmp_path / "var-cache")).replace(
            "/opt/fastinfer", str(tmp_path / "opt")
        )
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
@pytest.mark.serve
@pytest.mark.timeout(400)
def test_image_flow_bundle_from_the_warm_step_serves_with_no_compile(tmp_path: Path) -> None:
    httpx = pytest.importorskip("httpx")
    env = {**os.environ, **_image_env(tmp_path)}
    threads = docker_args()["THREADS"]

    # Build step (`RUN OMP_NUM_THREADS=... fastinfer warm ... --bundle ...`), in its own folder.
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    cmd = warm_command().replace(
        "fastinfer warm", f"{shlex.quote(sys.executable)} -m fastinfer warm"
    )
    cmd = cmd.replace("/opt/fastinfer", str(tmp_path / "opt"))
    built = subprocess.run(
        ["bash", "-c", cmd], env=env, cwd=build_dir, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr[-3000:]
    summary = json.loads(built.stdout.strip().splitlines()[-1])
    bundle = Path(env["APP_BUNDLE"])
    assert summary["bundle"] == str(bundle) and bundle.is_file() and summary["cache_misses"] > 0

    # The pod: the image's CMD, a fresh process in another folder, threads from its CPU limit.
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    port = _free_port()
    cmd_args = docker_cmd()
    cmd_args[cmd_args.index("--app-dir") + 1] = str(DEPLOY)
    cmd_args[cmd_args.index("--host") + 1] = "127.0.0.1"
    cmd_args[cmd_args.index("--port") + 1] = str(port)
    assert cmd_args[0] == "uvicorn"
    proc = subprocess.Popen(
        [sys.executable, "-m", *cmd_args],
        env={**env, "APP_THREADS": threads},
        cwd=pod_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 240
            ready = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = client.get("/readyz")
                except httpx.TransportError:
                    time.sleep(0.2)
                    continue
                if ready.status_code == 200:
                    break
                assert ready.status_code == 503  # alive but not warm yet
                assert ready.json()["phase"] != "failed", ready.json().get("detail")
                assert client.get("/healthz").status_code == 200
                time.sleep(0.2)
            assert ready is not None and ready.status_code == 200, (
                proc.stdout.read() if proc.poll() is not None and proc.stdout else ready
            )
            body = ready.json()
            assert {"threads", "import", "compile"} <= set(body["phases"])

            x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
            from fastinfer import testing

            want = testing.tiny_mlp()(x).detach()
            got = [client.post("/predict", json={"x": row.tolist()}).json()["y"] for row in x]
            torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-4)
            bad = client.post("/predict", json={"x": [1.0, 2.0]})
            assert bad.status_code == 422 and "expected (32,)" in bad.text

            from prometheus_client.parser import text_string_to_metric_families

            fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
            cache = {
                s.labels["result"]: s.value
                for s in fams["fastinfer_compile_cache"].samples
                if s.name.endswith("_total")
            }
            assert cache.get("miss", 0) == 0 and cache["hit"] >= 2, cache  # no compile in the pod
            assert "fastinfer_queue_depth" in fams  # the HPA's metric is exported
        assert (tmp_path / "var-cache" / "fastinfer" / "fastinfer-cache.json").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    # uvicorn drains (lifespan shutdown closes the batcher), then re-raises the signal it caught
    assert rc in (0, -signal.SIGTERM), log[-3000:]
    assert "Application shutdown complete" in log, log[-3000:]


# --------------------------------------------------------------------------------------------
# The manifests against the Kubernetes API schema
# --------------------------------------------------------------------------------------------


def _api_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            # kustomization.yaml is kustomize's own file, not an API object (checked above)
            if doc and doc["kind"] != "Kustomization":
                out.append((path.name, doc))
    return out


@pytest.mark.parametrize("version", ["1.30", "1.37"], ids=lambda v: f"k8s-{v}")
def test_manifests_validate_against_the_kubernetes_api_schema(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (dev extra)")
    objects = _api_objects()
    assert {doc["kind"] for _, doc in objects} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    }
    for name, doc in objects:
        try:  # strict: a misspelt field (readinesProbe) is an error, not ignored
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{name}: {doc['kind']} {where}: {exc.message}") from None


def test_the_validator_rejects_what_the_api_server_would() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (dev extra)")
    deployment = next(doc for _, doc in _api_objects() if doc["kind"] == "Deployment")
    bad = json.loads(json.dumps(deployment))
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(bad, "1.37", strict=True)
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv.ValidationError, match="not of type 'integer'"):
        kv.validate(bad, "1.37", strict=True)


# --------------------------------------------------------------------------------------------
# Files baked into an image by root are readable by the image's own user
# --------------------------------------------------------------------------------------------


def test_atomic_writes_get_the_umask_mode_not_owner_only(tmp_path: Path) -> None:
    """A bundle written by ``fastinfer warm`` as root at build time must be readable by the
    service's user (uid 10001): the temp file's 0600 must not survive the rename."""
    from fastinfer._common.files import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "bundle.tar", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "bundle.tar").stat().st_mode) == 0o644


# --------------------------------------------------------------------------------------------
# The image for real (deploy/smoke.sh), where a Docker engine runs
# --------------------------------------------------------------------------------------------


def _no_docker_engine() -> str | None:
    """Why the smoke test cannot run here, or None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers (`docker info`: {last})"
    return None


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_smoke_script_builds_runs_and_drains_the_image(tmp_path: Path) -> None:
    reason = _no_docker_engine()
    if reason:
        pytest.skip(reason)
    report = tmp_path / "smoke.json"
    proc = subprocess.run(
        ["bash", str(DEPLOY / "smoke.sh")],
        env={**os.environ, "REPORT": str(report), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=2300,
    )
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads(report.read_text())
    warm, cold = r["warm_check"], r["cold_check"]
    assert warm["cache_misses"] == 0 and warm["cache_hits"] >= 1  # started warm: no compile
    assert cold["cache_misses"] >= 1  # without the bundle it compiles: the check can tell
    assert {"threads", "import", "compile"} <= set(warm["phases"])
    assert warm["predictions_ok"] == 256 and warm["mean_batch"] >= 1
    assert r["burst"]["ok"] > 0 and r["exit_code"] in (0, 143)
    assert "failed=0" in r["drained"] and "queued=0" in r["drained"]
    assert r["image_bytes"] > 0 and r["warm_start_seconds"] > 0

"""Peers side by side over HTTP: fastinfer vs TorchServe, LitServe, Ray Serve and plain FastAPI.

    python benchmarks/bench_peers.py [--quick] [--json PATH] [--stacks a,b,...] [--models a,b]
                                     [--connections 1,32,64] [--rates 50,100,200] [--seconds 15]

Issue 19. Two models, each built locally with random weights from a seed and saved once to a
checkpoint that every stack loads (``benchmarks/peers/common.py``): the issue's 4-layer
``nn.TransformerEncoder`` classifier (width 256, 4 heads, FFN 1024, 64-token requests) and the
demo's BERT-mini-shaped classifier (17..64-token requests). Every stack answers the same JSON API
(``POST {"text": ...}`` -> ``{"label", "score"}``; TorchServe on its own route
``/predictions/classifier``), tokenizes with the same ``HashTokenizer`` and gets the same request
texts. Each stack runs as its own server process on 127.0.0.1, tuned as its own docs recommend
(the tuning and its source are in each ``benchmarks/peers/serve_*.py``); the peers run in their
own venvs under ``benchmarks/.peers/``, created on first use (``python benchmarks/peers/envs.py``
makes them ahead). A peer that cannot be installed or started is reported with its reason.

For each model, stack after stack in the order ``--stacks`` gives (run it twice in opposite
orders to see the drift):

1. the stack's own offline ceiling: items/s of tokenize + forward + post-process at full batches
   of 32, no HTTP, with the processes x slots x threads the stack serves with (e.g. 2 processes
   x 1 thread for TorchServe with ``OMP_NUM_THREADS=1``), measured just before its server starts;
2. the server starts; readiness is polled, then 8 probe texts must come back with the labels and
   scores (within 0.005) that the model gives offline;
3. closed loop with wrk at 1, 32 and 64 connections (a warm-up, then the timed run): req/s,
   p50/p99, non-200s and errors (connection errors, timeouts, answers without label/score);
4. open loop: Poisson arrivals at each ``--rates`` rate (fastinfer's aiohttp ``open_loop``):
   achieved req/s, p50/p99, non-200s and failures;
5. the server stops (its whole process tree).

It prints one table per model, then the summary rows and targets of issue 19 (fastinfer "full",
the configuration the docs give, against the strongest peer). ``--quick`` is a smoke run (3 s per
point): proof that every stack installs, starts, answers and is measured, not a figure.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(PEERS))

import common
import cpu
import envs
import load
import serve_fastinfer
from _harness import Bench

from fastinfer._common.tables import render_table

TARGET_STACK = "fastinfer-full"  # the configuration the docs give a user
SCORE_TOLERANCE = 0.005


@dataclass(frozen=True)
class Shape:
    """How a stack computes: processes x slots (batches at once per process) x torch threads."""

    processes: int = 1
    slots: int | str = 1  # "auto": the service measures every split of the cores
    threads: int | str | None = None  # None: torch's default (one per physical core)

    def describe(self) -> str:
        if self.slots == "auto":
            return f"{self.processes} proc x slots x threads chosen by measurement"
        n = self.threads
        threads = "default threads" if n is None else f"{n} thread" + ("s" if n > 1 else "")
        slots = f" x {self.slots} slots" if self.slots > 1 else ""
        return f"{self.processes} proc{slots} x {threads}"


@dataclass(frozen=True)
class Stack:
    """One server configuration under test."""

    name: str
    env: str | None  # the peer venv's name; None: fastinfer's own interpreter
    script: str  # in benchmarks/peers/
    predict_path: str
    ready_path: str
    shape: Shape
    tuning: str
    args: tuple[str, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)
    prepare: str = "plain"  # how the ceiling builds the model: plain or fastinfer:<variant>
    stop_main_only: bool = False  # signal only the main process (it shuts its cluster down)
    peer: bool = True  # counts as a peer for "the strongest peer"


def _fastinfer_stack(variant: str, tuning: str) -> Stack:
    shape = serve_fastinfer.serving_shape(variant)
    return Stack(
        f"fastinfer-{variant}",
        None,
        "serve_fastinfer.py",
        "/predict",
        "/readyz",
        Shape(shape["processes"], shape["slots"], shape["threads"]),
        tuning,
        args=("--variant", variant),
        env_vars=dict(shape.get("env", {})),
        prepare=f"fastinfer:{variant}",
        peer=False,
    )


OMP1 = {"OMP_NUM_THREADS": "1"}
STACKS: dict[str, Stack] = {
    s.name: s
    for s in (
        Stack(
            "plain",
            None,
            "serve_plain.py",
            "/predict",
            "/readyz",
            Shape(1, 1, None),
            "sync FastAPI endpoint, 1 uvicorn worker, one forward pass per request",
        ),
        Stack(
            "torchserve",
            "torchserve",
            "serve_torchserve.py",
            "/predictions/classifier",
            "/ping",
            Shape(2, 1, None),
            "TorchServe 0.12, batchSize 32 / maxBatchDelay 5 ms, 2 workers, default threads",
        ),
        Stack(
            "torchserve-omp1",
            "torchserve",
            "serve_torchserve.py",
            "/predictions/classifier",
            "/ping",
            Shape(2, 1, 1),
            "same, OMP_NUM_THREADS=1",
            env_vars=OMP1,
        ),
        Stack(
            "litserve",
            "litserve",
            "serve_litserve.py",
            "/predict",
            "/health",
            Shape(2, 1, 1),
            "LitServe 0.2.19, cpu, 2 workers/device, batch 32 / 5 ms, fast_queue, OMP=1",
            env_vars=OMP1,
        ),
        Stack(
            "ray",
            "ray",
            "serve_ray.py",
            "/predict",
            "/-/healthz",
            Shape(2, 1, 1),
            "Ray Serve 2.60, @serve.batch 32 / 5 ms, 2 replicas x 1 CPU, max_ongoing 64",
            stop_main_only=True,
        ),
        _fastinfer_stack("batching", "FastInferService + DynamicBatcher(32, 5 ms), no swap"),
        _fastinfer_stack(
            "inprocess", "load_model + swap_attention_ + batcher, in the server process"
        ),
        _fastinfer_stack(
            "full",
            "as docs/fastapi.md: load_model + swap_attention_ in PinnedPool workers, fed by the "
            "batcher (adaptive)",
        ),
    )
}


@dataclass(frozen=True)
class Plan:
    connections: tuple[int, ...]
    rates: tuple[float, ...]
    seconds: float
    warmup_seconds: float
    ceiling_seconds: float
    texts: int = 512


@dataclass
class StackResult:
    stack: str
    model: str
    status: str = "ok"  # ok | not installed | failed to start | failed
    reason: str = ""
    shape: str = ""
    ceiling: float | None = None  # items/s
    startup_seconds: float | None = None
    answers: str = ""
    points: list[load.PointResult] = field(default_factory=list)

    def point(self, kind: str, level: float) -> load.PointResult | None:
        for p in self.points:
            if p.kind == kind and p.level == level:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [p.to_dict() for p in self.points]
        return d


# --- processes --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(stack: Stack) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(ROOT), str(PEERS), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env.update(stack.env_vars)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-800:]


def _stop(proc: subprocess.Popen[Any], *, main_only: bool, grace: float = 60.0) -> None:
    """Stop the server and everything it started (found before signalling, killed by pid)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        try:
            if main_only:
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@contextmanager
def _server(stack: Stack, python: Path, cmd_tail: list[str], log: Path) -> Iterator[Any]:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(python), str(PEERS / stack.script), *cmd_tail],
            env=_env(stack),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so it can be stopped as a whole
            cwd=str(log.parent),
        )
    try:
        yield proc
    finally:
        _stop(proc, main_only=stack.stop_main_only)


def _post(url: str, text: str, timeout: float = 30.0) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps({"text": text}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:200]


def _wait_ready(
    base: str, stack: Stack, proc: subprocess.Popen[Any], probe: str, timeout: float
) -> None:
    """Poll the stack's readiness route, then a real request, until both answer 200."""
    deadline = time.monotonic() + timeout
    ready = False
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} during startup")
        try:
            if not ready:
                with urllib.request.urlopen(base + stack.ready_path, timeout=5) as resp:
                    ready = resp.status == 200
            if ready:
                status, body = _post(base + stack.predict_path, probe, timeout=30)
                if status == 200:
                    return
                last = f"probe answered {status}: {body!r}"
                if 400 <= status < 500 and status not in (404, 429):
                    raise RuntimeError(last)  # the request itself is wrong: waiting won't help
        except (OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    raise RuntimeError(f"not ready after {timeout:.0f} s ({last})")


def _check_answers(url: str, texts: Sequence[str], expected: Sequence[dict[str, Any]]) -> str:
    """'ok', or what differs from the offline answers (label, score within SCORE_TOLERANCE)."""
    bad = []
    for text, want in zip(texts, expected):
        status, got = _post(url, text)
        if status != 200 or not isinstance(got, dict):
            bad.append(f"HTTP {status}: {got!r}"[:120])
        elif got.get("label") != want["label"] or not isinstance(got.get("score"), (int, float)):
            bad.append(f"got {got}, expected {want}")
        elif abs(float(got["score"]) - want["score"]) > SCORE_TOLERANCE:
            bad.append(f"score {got['score']} vs {want['score']}")
    return "ok" if not bad else f"{len(bad)} of {len(texts)} differ: {bad[0]}"


# --- the offline ceiling ----------------------------------------------------------------------


def measure_ceiling(
    stack: Stack, spec: common.ModelSpec, checkpoint: Path, seconds: float, logdir: Path
) -> float:
    """Items/s of all the stack's processes running full batches together (no HTTP).

    A stack that sizes itself (``slots="auto"``) gets the best split of the cores."""
    sh = stack.shape
    if sh.slots == "auto":
        from fastinfer.integrations._sizing import splits
        from fastinfer.pool import CorePlan

        return max(
            measure_ceiling(
                replace(stack, shape=Shape(sh.processes, s, t)), spec, checkpoint, seconds, logdir
            )
            for s, t in splits(CorePlan.detect().core_budget)
        )
    cmd = [sys.executable, str(PEERS / "ceiling.py"), "--model", spec.name,
           "--checkpoint", str(checkpoint), "--prepare", stack.prepare,
           "--slots", str(sh.slots), "--seconds", str(seconds)]  # fmt: skip
    if sh.threads:
        cmd += ["--threads", str(sh.threads)]
    procs = []
    try:
        for i in range(sh.processes):
            with open(logdir / f"ceiling-{stack.name}-{i}.log", "w") as err:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=_env(stack),
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                    )
                )
        for p in procs:  # every process warmed up before any starts
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"ceiling process failed: {line!r}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 120)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return sum(r["items"] for r in results) / max(r["seconds"] for r in results)


# --- one stack --------------------------------------------------------------------------------


def run_stack(
    stack: Stack,
    spec: common.ModelSpec,
    checkpoint: Path,
    python: Path,
    plan: Plan,
    workdir: Path,
    probes: tuple[list[str], list[dict[str, Any]]],
    script: Path,
) -> StackResult:
    res = StackResult(stack.name, spec.name, shape=stack.shape.describe())
    wd = workdir / f"{spec.name}-{stack.name}"
    wd.mkdir(parents=True, exist_ok=True)
    bodies = [{"text": t} for t in spec.texts(plan.texts, seed=11)]
    try:
        res.ceiling = measure_ceiling(stack, spec, checkpoint, plan.ceiling_seconds, wd)
    except Exception as exc:
        res.status, res.reason = "failed", f"offline ceiling: {exc}"
        return res
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    url = base + stack.predict_path
    log = wd / "server.log"
    tail = ["--model", spec.name, "--checkpoint", str(checkpoint), "--port", str(port),
            "--workdir", str(wd), *stack.args]  # fmt: skip
    t0 = time.perf_counter()
    with _server(stack, python, tail, log) as proc:
        try:
            _wait_ready(base, stack, proc, probes[0][0], timeout=300)
        except Exception as exc:
            res.status, res.reason = "failed to start", f"{exc}; log: {_tail(log)}"
            return res
        res.startup_seconds = time.perf_counter() - t0
        res.answers = _check_answers(url, *probes)

        def drain() -> None:
            # wrk stops with requests in flight, and a server that does not cancel them works
            # on; one request queued behind them returns once it is through, so every point
            # starts from an idle server
            try:
                _post(url, probes[0][0], timeout=120)
            except OSError:
                pass  # a server that cannot drain shows it in the next point's figures

        try:
            for conc in plan.connections:
                load.run_wrk(url, script, connections=conc, seconds=plan.warmup_seconds)
                drain()
                before = cpu.snapshot(proc.pid)
                point = load.run_wrk(url, script, connections=conc, seconds=plan.seconds)
                point.detail["cpu"] = cpu.between(before, cpu.snapshot(proc.pid))
                res.points.append(point)
                drain()
            for rate in plan.rates:
                res.points.append(load.run_open(url, bodies, rate=rate, seconds=plan.seconds))
                drain()
        except Exception as exc:
            res.status, res.reason = "failed", f"{type(exc).__name__}: {exc}; log: {_tail(log)}"
        if proc.poll() is not None and res.status == "ok":
            res.status, res.reason = "failed", f"server exited ({proc.returncode}) during load"
    return res


# --- report -----------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return "-" if math.isnan(s) else f"{s * 1e3:.0f}"


def _cell(p: load.PointResult | None) -> str:
    if p is None:
        return "-"
    few = f" n={p.ok}" if p.ok < 50 else ""  # a percentile from a handful of answers
    return f"{p.rps:.0f} ({_ms(p.p50_s)}/{_ms(p.p99_s)}){few}"


def _cpu_cell(p: load.PointResult | None) -> str:
    c = None if p is None else p.detail.get("cpu")
    if not c:
        return "-"
    return (
        f"{c['server']:.2f} ({c['root']:.2f} + {c['workers']:.2f}) / "
        f"{c['load_generator']:.2f} / {c['machine']:.2f}"
    )


def model_table(results: Sequence[StackResult], plan: Plan) -> str:
    """One row per stack: ceiling, each load point as 'req/s (p50/p99 ms)', share, errors."""
    top = max(plan.connections)
    head = ["stack", "ceiling items/s (shape)"]
    head += [f"c={c} req/s (p50/p99 ms)" for c in plan.connections]
    head += [f"c={top} / ceiling"]
    head += [f"open {r:g}/s: req/s (p50/p99)" for r in plan.rates]
    head += [f"CPU at c={top}: server (root + rest) / wrk / machine, cores"]
    head += ["non-200 / errors", "answers", "status"]
    rows = []
    for r in results:
        row = [r.stack, "-" if r.ceiling is None else f"{r.ceiling:.0f} ({r.shape})"]
        row += [_cell(r.point("closed", c)) for c in plan.connections]
        p = r.point("closed", top)
        row.append(f"{p.rps / r.ceiling:.0%}" if p and r.ceiling else "-")
        row += [_cell(r.point("open", rate)) for rate in plan.rates]
        row.append(_cpu_cell(p))
        non200 = sum(p.non_200 for p in r.points)
        errors = sum(p.errors for p in r.points)
        row += [f"{non200} / {errors}" if r.points else "-", r.answers or "-"]
        row.append(r.status if r.status == "ok" else f"{r.status}: {r.reason}"[:160])
        rows.append(row)
    return render_table(head, rows)


def add_targets(bench: Bench, spec: common.ModelSpec, results: Sequence[StackResult]) -> None:
    """Issue 19's targets for the docs' configuration against the strongest peer."""
    by = {r.stack: r for r in results if r.status == "ok"}
    fast = by.get(TARGET_STACK)
    m = spec.name
    for conc in (32, 64):
        rows: dict[str, load.PointResult] = {}
        for r in by.values():
            p = r.point("closed", conc)
            if p is not None and p.ok and p.p99_s > 0:  # answers came back and were timed
                rows[r.stack] = p
        peer_points = [q for s, q in rows.items() if STACKS[s].peer]
        best_rps = max((q.rps for q in peer_points), default=0.0)
        for name, p in rows.items():  # ratio: of the strongest peer's req/s
            ratio = p.rps / best_rps if best_rps else None
            bench.add_value(f"{m} c={conc}", f"{name} req/s", p.rps, unit="req/s", ratio=ratio)
        fp = rows.get(TARGET_STACK)
        if fast is None or fp is None or not peer_points:
            continue
        best = max(peer_points, key=lambda q: q.rps)
        bench.add_value(
            f"{m} c={conc}", f"{TARGET_STACK} / strongest peer req/s", fp.rps / best.rps,
            unit="x", target=(">=", 1.3),
        )  # fmt: skip
        low = min(q.p99_s for q in peer_points)
        bench.add_value(
            f"{m} c={conc}", f"{TARGET_STACK} p99 / lowest peer p99", fp.p99_s / low,
            unit="x", target=("<", 1.0),
        )  # fmt: skip
        if fast.ceiling:
            bench.add_value(
                f"{m} c={conc}", f"{TARGET_STACK} / its own ceiling", fp.rps / fast.ceiling,
                unit="x", target=(">=", 0.9),
            )  # fmt: skip
        used = fp.detail.get("cpu")
        if used:  # what bounds the ceiling share: the cores the model's workers got
            bench.add_value(
                f"{m} c={conc}", f"{TARGET_STACK} cores left to the model (of {used['cpus']:g})",
                used["workers"], unit="cores",
            )  # fmt: skip
            bench.add_value(
                f"{m} c={conc}", f"{TARGET_STACK} front end + load generator, cores",
                used["root"] + used["load_generator"], unit="cores",
            )  # fmt: skip
    plain = by.get("plain")
    if fast and plain:
        fp, pp = fast.point("closed", 1), plain.point("closed", 1)
        if fp and pp and fp.ok and pp.ok:
            bench.add_value(
                f"{m} c=1", f"{TARGET_STACK} p50 / plain p50", fp.p50_s / pp.p50_s,
                unit="x", target=("<=", 1.0),
            )  # fmt: skip


# --- main -------------------------------------------------------------------------------------


def _csv(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(known)}")
    return names


def main() -> None:
    bench = Bench(
        "bench_peers", description="fastinfer vs TorchServe, LitServe, Ray Serve, FastAPI"
    )
    bench.add_argument("--stacks", default=",".join(STACKS), help="stacks to run, in this order")
    bench.add_argument("--models", default=",".join(common.MODELS), help="models to run")
    bench.add_argument("--connections", default="1,32,64", help="closed-loop connections")
    bench.add_argument("--rates", default="50,100,200", help="open-loop rates, requests/s")
    bench.add_argument("--seconds", type=float, default=None, help="per point (15; quick: 3)")
    bench.add_argument("--no-install", action="store_true", help="use existing peer venvs only")
    bench.add_argument("--keep", action="store_true", help="keep the work folder (server logs)")
    args = bench.args
    stacks = [STACKS[n] for n in _csv(args.stacks, list(STACKS), "stacks")]
    models = [common.MODELS[n] for n in _csv(args.models, list(common.MODELS), "models")]
    seconds = args.seconds or (3.0 if bench.quick else 15.0)
    plan = Plan(
        connections=tuple(int(c) for c in args.connections.split(",")),
        rates=tuple(float(r) for r in args.rates.split(",")) if args.rates else (),
        seconds=seconds,
        warmup_seconds=1.0 if bench.quick else 3.0,
        ceiling_seconds=2.0 if bench.quick else 8.0,
    )
    if load.wrk_available() is None:
        raise SystemExit("wrk is needed for the closed loop: apt-get install -y wrk")

    pythons: dict[str, Path | None] = {}
    reasons: dict[str, str] = {}
    for name in sorted({s.env for s in stacks if s.env}):
        stamp = envs.PEERS_DIR / name / ".installed"
        if args.no_install and not stamp.exists():
            pythons[name], reasons[name] = None, "not installed (--no-install)"
            continue
        env = envs.ensure(name)
        pythons[name], reasons[name] = env.python, env.reason or ""

    workdir = Path(tempfile.mkdtemp(prefix="fi-peers-"))  # short: Ray's socket paths live here
    all_results: dict[str, list[StackResult]] = {}
    try:
        for spec in models:
            ckpt = common.save_checkpoint(spec, workdir / f"{spec.name}.pt")
            reference = common.load_plain(spec, ckpt)
            tok = spec.tokenizer()
            probe_texts = spec.texts(8, seed=5)
            expected = [common.predict(reference, tok, spec, [t])[0] for t in probe_texts]
            script = workdir / f"{spec.name}.lua"
            script.write_text(
                load.wrk_script([json.dumps({"text": t}) for t in spec.texts(plan.texts, seed=11)])
            )
            print(f"\n== model {spec.name}: {spec.description}", flush=True)
            results = []
            for stack in stacks:
                python = pythons[stack.env] if stack.env else envs.main_python()
                if python is None:
                    assert stack.env is not None
                    r = StackResult(stack.name, spec.name, "not installed", reasons[stack.env])
                    r.shape = stack.shape.describe()
                else:
                    print(f"- {stack.name}: {stack.tuning}", flush=True)
                    r = run_stack(
                        stack, spec, ckpt, python, plan, workdir, (probe_texts, expected), script
                    )
                print(f"  {stack.name}: {r.status} {r.reason}".rstrip(), flush=True)
                results.append(r)
            all_results[spec.name] = results
            print(f"\n{spec.name}: {spec.description}; '(p50/p99)' in ms")
            print(model_table(results, plan))
            add_targets(bench, spec, results)
    finally:
        if args.keep:
            print(f"\nwork folder kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    for spec_name, results in all_results.items():
        for r in results:
            if r.status != "ok":
                bench.note(f"{spec_name} {r.stack}: {r.status}: {r.reason}")
            elif r.answers != "ok":
                bench.note(f"{spec_name} {r.stack}: answers {r.answers}")
            for p in r.points:
                if p.non_200 or p.errors:
                    bench.note(
                        f"{spec_name} {r.stack} {p.kind} {p.level:g}: {p.non_200} non-200, "
                        f"{p.errors} errors of {p.requests} ({p.detail})"
                    )
    if bench.quick:
        bench.note("--quick: a smoke run (3 s per point), proof of function, not figures")
    bench.note(
        "closed loop: wrk, 1 thread; open loop: Poisson arrivals (aiohttp) in this process; "
        "ceiling: tokenize + forward + post-process, batch 32, the stack's procs x threads"
    )
    doc = bench.finish()
    doc["plan"] = asdict(plan)
    doc["stacks"] = {s.name: {**asdict(s), "shape": s.shape.describe()} for s in stacks}
    doc["models"] = {m.name: m.description for m in models}
    doc["results"] = {k: [r.to_dict() for r in v] for k, v in all_results.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()

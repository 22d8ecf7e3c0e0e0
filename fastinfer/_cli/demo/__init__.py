"""``fastinfer demo``: the plain FastAPI endpoint users write today vs the fastinfer stack.

It saves a small BERT-like text classifier (built locally, random weights), starts each service in
its own process on localhost, drives the same closed-loop load at both with a real HTTP client
(a concurrency ramp), and prints throughput, p50/p99 latency and mean batch size side by side,
plus what each primitive contributes measured on the model itself. It writes ``report.json`` and
``report.png`` into ``--out``. ``--serve`` then keeps the fastinfer service running for curl, with
its live dashboard at ``/dashboard``.

Progress bars draw only on a terminal (or with ``FASTINFER_PROGRESS=1``); written to a file or a
pipe, each stage prints one line when it ends.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fastinfer import _env
from fastinfer._cli.demo import model as demo_model
from fastinfer._common.tables import render_table
from fastinfer._optional import require

LEVELS = (1, 8, 32, 64)


class _Stage:
    """One stage of the demo: a progress bar on a terminal, else one line when it ends."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "req") -> None:
        self.desc, self.unit, self.done, self.postfix = desc, unit, 0, ""
        self.t0 = time.perf_counter()
        self.bar: Any = None
        if _env.progress_wanted():
            tqdm = require("tqdm.auto", purpose="the demo's progress bars").tqdm
            if total is None:
                self.bar = tqdm(desc=desc, bar_format="{desc}: {postfix} [{elapsed}]", leave=False)
            else:
                self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self, summary: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
            return
        took = time.perf_counter() - self.t0
        done = f"{self.done} {self.unit} in " if self.done else ""
        print(f"  {self.desc}: {done}{took:.1f} s{(' ' + summary) if summary else ''}", flush=True)


def _progress(total: int, desc: str) -> _Stage:
    return _Stage(desc, total)


@contextmanager
def _service(
    mode: str, checkpoint: Path, *, extra: tuple[str, ...] = (), port: int = 0
) -> Iterator[str]:
    cmd = [sys.executable, "-m", "fastinfer._cli.demo.server", "--mode", mode]
    cmd += ["--checkpoint", str(checkpoint), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("FASTINFER_DEMO_PORT"):
            raise RuntimeError(f"the {mode} service did not start (exit code {proc.poll()})")
        url = f"http://127.0.0.1:{line.split()[1]}"
        _wait_ready(url, proc, mode)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn drains and runs the lifespan shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen[str], mode: str, timeout: float = 300) -> None:
    """Poll /readyz, showing the service's current setup phase (load, swap, compile...)."""
    httpx = require("httpx")
    deadline = time.monotonic() + timeout
    stage = _Stage(f"starting {mode:<9}", unit="phase")
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the {mode} service exited with {proc.returncode} during startup"
                )
            try:
                resp = httpx.get(f"{url}/readyz", timeout=2)
                if resp.status_code == 200:
                    phases = resp.json().get("phases") or {}
                    stage.close(", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
                    return
                stage.set_postfix_str(str(resp.json().get("phase", "")))
            except (httpx.HTTPError, ValueError):
                stage.set_postfix_str("booting")
            time.sleep(0.1)
    except BaseException:
        if stage.bar is not None:
            stage.bar.close()
        raise
    if stage.bar is not None:
        stage.bar.close()
    raise RuntimeError(f"the {mode} service was not ready after {timeout:.0f} s")


def _batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of ``fastinfer_batch_size`` from the service's /metrics (0, 0 if absent)."""
    httpx = require("httpx")
    parser = require("prometheus_client.parser")
    resp = httpx.get(f"{url}/metrics", timeout=10)
    if resp.status_code != 200:
        return 0.0, 0.0
    total = count = 0.0
    for family in parser.text_string_to_metric_families(resp.text):
        if family.name == "fastinfer_batch_size":
            for s in family.samples:
                if s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
    return total, count


def _drive(url: str, mode: str, levels: tuple[int, ...], per_level: int) -> list[dict[str, Any]]:
    from fastinfer._cli.loadgen import closed_loop

    bodies = [{"text": t} for t in demo_model.texts(512, seed=7)]
    rows = []
    for conc in levels:
        n = max(per_level, conc * 4)
        # warm the connection pool and the model's shapes at this concurrency, untimed
        asyncio.run(
            closed_loop(
                f"{url}/predict", lambda i: bodies[i % 512], concurrency=conc, requests=conc
            )
        )
        before = _batch_totals(url) if mode == "fastinfer" else (0.0, 0.0)
        bar = _progress(n, f"{mode:>9} c={conc:<3}")
        res = asyncio.run(
            closed_loop(
                f"{url}/predict",
                lambda i: bodies[i % 512],
                concurrency=conc,
                requests=n,
                label=f"{mode}@{conc}",
                on_done=functools.partial(bar.update, 1),
            )
        )
        bar.close(f"({res.throughput:.0f} req/s)")
        after = _batch_totals(url) if mode == "fastinfer" else (0.0, 0.0)
        batches = after[1] - before[1]
        row = res.to_dict()
        row.update(
            mode=mode,
            concurrency=conc,
            mean_batch=(after[0] - before[0]) / batches if batches else 1.0,
        )
        rows.append(row)
    return rows


def _contributions(quick: bool, compile: bool) -> list[dict[str, Any]]:
    """What each primitive buys on the model itself: same inputs, in this process, interleaved."""
    import copy

    import fastinfer

    repeat = 3 if quick else 7
    tok = demo_model.tokenizer()
    model = demo_model.build_model()
    texts = demo_model.texts(32, seed=3)
    enc = tok(texts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    singles = [tok([t]) for t in texts]
    rows: list[dict[str, Any]] = []

    with torch.inference_mode():

        def one_by_one() -> None:
            for e in singles:
                model(e["input_ids"], e["attention_mask"])

        def batched() -> None:
            model(ids, mask)

        swapped = copy.deepcopy(model)
        report = fastinfer.swap_attention_(swapped, example_inputs=(ids, mask))

        def swapped_batch() -> None:
            swapped(ids, mask)

        variants = {"one_by_one": one_by_one, "batched": batched, "swapped": swapped_batch}
        compiled = None
        if compile:
            compiled = fastinfer.compile_model(swapped, (ids, mask), batch_sizes=(1, 8, 32))
            variants["compiled"] = lambda: compiled(ids, mask)
        for fn in variants.values():
            fn()  # warm-up
        t: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeat):  # interleaved trials: drift hits every variant alike
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                t[name].append(time.perf_counter() - t0)
        med = {name: sorted(v)[len(v) // 2] for name, v in t.items()}

    pad = 1 - mask.float().mean().item()
    rows.append(
        {
            "primitive": "dynamic batching",
            "what": "32 requests as one batch vs one forward each",
            "speedup": med["one_by_one"] / med["batched"],
        }
    )
    rows.append(
        {
            "primitive": "attention swap",
            "what": f"path '{report.chosen}' vs as built, batch 32 ({pad:.0%} padding)",
            "speedup": med["batched"] / med["swapped"],
        }
    )
    if compiled is not None:
        rows.append(
            {
                "primitive": "compile",
                "what": "compile_model (warmed for 1, 8, 32) vs the swapped model",
                "speedup": med["swapped"] / med["compiled"],
            }
        )
    else:
        rows.append(
            {"primitive": "compile", "what": "skipped (run with --compile)", "speedup": None}
        )
    plan = fastinfer.CorePlan.detect()
    rows.append(
        {
            "primitive": "core plan",
            "what": f"{plan.core_budget} physical core(s): the service runs the model in "
            + (
                f"{plan.core_budget} pinned worker processes x 1 thread"
                if plan.core_budget > 1
                else "the server process"
            )
            + ", fed by the batcher",
            "speedup": None,
        }
    )
    return rows


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _table(rows: list[dict[str, Any]]) -> str:
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    head = ["clients", "plain req/s", "fastinfer req/s", "speed-up", "plain p50 / p99",
            "fastinfer p50 / p99", "mean batch"]  # fmt: skip
    body = []
    for conc in sorted({r["concurrency"] for r in rows}):
        p, f = by[("plain", conc)], by[("fastinfer", conc)]
        body.append(
            [
                str(conc),
                f"{p['throughput_rps']:.0f}",
                f"{f['throughput_rps']:.0f}",
                f"{f['throughput_rps'] / p['throughput_rps']:.2f}x" if p["throughput_rps"] else "-",
                f"{_fmt_ms(p['p50_s'])} / {_fmt_ms(p['p99_s'])}",
                f"{_fmt_ms(f['p50_s'])} / {_fmt_ms(f['p99_s'])}",
                f"{f['mean_batch']:.1f}",
            ]
        )
    return render_table(head, body, align="right")


def _plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style, color in (("plain", "o--", "tab:gray"), ("fastinfer", "s-", "tab:orange")):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rs]
        ax1.plot(xs, [r["throughput_rps"] for r in rs], style, color=color, label=mode)
        ax2.plot(xs, [r["p99_s"] * 1e3 for r in rs], style, color=color, label=f"{mode} p99")
        ax2.plot(xs, [r["p50_s"] * 1e3 for r in rs], style, color=color, alpha=0.4,
                 label=f"{mode} p50")  # fmt: skip
    ax1.set(xlabel="concurrent clients", ylabel="requests / s", title="throughput", xscale="log")
    ax2.set(xlabel="concurrent clients", ylabel="latency (ms)", title="latency", xscale="log")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("plain FastAPI endpoint vs fastinfer (same model, same machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(
    *,
    quick: bool = False,
    serve: bool = False,
    out: str | os.PathLike[str] = "fastinfer-demo",
    compile: bool = False,
    port: int = 8000,
) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = (1, 16, 64) if quick else LEVELS
    per_level = 64 if quick else 256
    print(
        f"fastinfer demo: plain FastAPI endpoint vs the fastinfer stack "
        f"(torch {torch.__version__}, {os.cpu_count()} CPUs)"
    )
    with tempfile.TemporaryDirectory(prefix="fastinfer-demo-") as tmp:
        ckpt = demo_model.save(Path(tmp) / "classifier.pt")
        extra = ("--compile",) if compile else ()
        rows: list[dict[str, Any]] = []
        for mode in ("plain", "fastinfer"):
            print(f"- starting the {mode} service and driving load: clients {levels}")
            with _service(mode, ckpt, extra=extra if mode == "fastinfer" else ()) as url:
                rows += _drive(url, mode, levels, per_level)
        print()
        print(_table(rows))
        print("\n- what each primitive contributes, measured on the model itself:")
        contributions = _contributions(quick, compile)
        for c in contributions:
            ratio = f"{c['speedup']:.2f}x" if c["speedup"] else "   - "
            print(f"  {c['primitive']:<17} {ratio:>7}  {c['what']}")
        report = {
            "levels": list(levels),
            "rows": rows,
            "contributions": contributions,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        }
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        png = _plot(rows, out_dir / "report.png")
        print(f"\nwrote {out_dir / 'report.json'}" + (f" and {png}" if png else ""))
        if serve:
            print(f"\nserving the fastinfer stack on http://127.0.0.1:{port} (Ctrl-C stops it):")
            print(f"  dashboard: http://127.0.0.1:{port}/dashboard  (live, open it in a browser)")
            print(
                f"  curl -s -X POST http://127.0.0.1:{port}/predict "
                """-H 'content-type: application/json' -d '{"text": "hello world"}'"""
            )
            print(f"  curl -s http://127.0.0.1:{port}/metrics | grep fastinfer_batch_size")
            try:
                with _service("fastinfer", ckpt, extra=(*extra, "--dashboard"), port=port):
                    signal.pause()
            except KeyboardInterrupt:
                pass
    return 0

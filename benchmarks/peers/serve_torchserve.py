"""TorchServe: archive the model with a custom handler, write its configuration, start it.

Runs in the TorchServe venv (``benchmarks/.peers/torchserve``) and then runs the ``torchserve``
command in the foreground, so that stopping this process group stops TorchServe.

Tuning (from TorchServe's docs, "Batch Inference with TorchServe" and the "Performance Guide"):
server-side batching with ``batchSize: 32`` and ``maxBatchDelay: 5`` (ms) in the archive's
``model-config.yaml``; ``minWorkers = maxWorkers = 2`` (one backend worker process per core);
threads are left at torch's default, or ``OMP_NUM_THREADS=1`` in the second configuration (the
guide's advice for several workers on a CPU: workers x threads should not exceed the cores). Core
pinning through ``cpu_launcher_enable`` is not used: it needs Intel's launcher setup, which the
guide presents as an Intel-CPU extra. ``async_logging=true`` (the logging docs' advice for a
lightweight model at high throughput). Token authorisation is off (localhost only); config
snapshots off (``--ncs``); the job queue keeps its default (100: beyond it TorchServe answers
503).

    python benchmarks/peers/serve_torchserve.py --model bert-mini --checkpoint CKPT --port 8080 --workdir DIR
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
WORKERS = 2
MODEL_NAME = "classifier"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    args = common.server_args(__doc__.splitlines()[0])
    work: Path = args.workdir.resolve()
    store = work / "model-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    (work / "spec.json").write_text(json.dumps({"model": args.model}))
    (work / "model-config.yaml").write_text(
        f"minWorkers: {WORKERS}\n"
        f"maxWorkers: {WORKERS}\n"
        f"batchSize: {common.MAX_BATCH_SIZE}\n"
        f"maxBatchDelay: {int(common.MAX_WAIT_MS)}\n"
        "responseTimeout: 120\n"
    )
    bindir = Path(sys.executable).parent
    subprocess.run(
        [
            str(bindir / "torch-model-archiver"),
            "--model-name", MODEL_NAME,
            "--version", "1.0",
            "--serialized-file", str(args.checkpoint.resolve()),
            "--handler", str(HERE / "ts_handler.py"),
            "--extra-files", str(work / "spec.json"),
            "--config-file", str(work / "model-config.yaml"),
            "--export-path", str(store),
            "--force",
        ],
        check=True,
    )  # fmt: skip
    (work / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{args.port}\n"
        f"management_address=http://127.0.0.1:{_free_port()}\n"
        f"metrics_address=http://127.0.0.1:{_free_port()}\n"
        f"model_store={store}\n"
        f"load_models={MODEL_NAME}.mar\n"
        "disable_token_authorization=true\n"
        "enable_envvars_config=false\n"
        "install_py_dep_per_model=false\n"
        # docs/logging.md, "Enable asynchronous logging": for a lightweight model and high
        # throughput (every request writes access and metrics lines)
        "async_logging=true\n"
        f"default_workers_per_model={WORKERS}\n"
    )
    env = dict(os.environ)
    # TorchServe starts its workers with the `python` found on PATH: this venv's. Its pid file
    # goes to the temp folder, so a TorchServe someone else runs on this machine is not ours.
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = env["TEMP"] = str(work)
    os.chdir(work)  # logs/ go here
    cmd = [
        str(bindir / "torchserve"),
        "--start",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--model-store", str(store),
        "--ts-config", str(work / "config.properties"),
    ]  # fmt: skip
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()

"""Ray Serve with ``@serve.batch``, tuned as Ray Serve's docs say.

Runs in the Ray venv (``benchmarks/.peers/ray``): starts its own local Ray cluster (never joins
another one on this machine), deploys the classifier and serves until SIGTERM/SIGINT, then shuts
Serve and Ray down. Tuning, from Ray Serve's docs ("Dynamic Request Batching", "Performance
Tuning", "Configure Ray Serve deployments"):

- ``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)`` on an async method that runs the
  model on the whole batch, as the batching guide's example does;
- ``max_ongoing_requests=64``: the batching guide says to set it at least as large as
  ``max_batch_size`` (the default of 5 never lets a batch fill);
- ``num_replicas=2`` with ``num_cpus=1`` each: one replica per core (Ray then sets
  ``OMP_NUM_THREADS=1`` in each replica, so 2 x 1 thread);
- the HTTP proxy on 127.0.0.1 only; logging at WARNING, the dashboard off.

    python benchmarks/peers/serve_ray.py --model bert-mini --checkpoint CKPT --port 8000 --workdir DIR
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import common
import ray
from ray import serve
from starlette.requests import Request

REPLICAS = 2


@serve.deployment(
    num_replicas=REPLICAS,
    max_ongoing_requests=2 * common.MAX_BATCH_SIZE,
    ray_actor_options={"num_cpus": 1},
)
class Classifier:
    def __init__(self, model: str, checkpoint: str) -> None:
        self.spec = common.MODELS[model]
        self.model = common.load_plain(self.spec, checkpoint)
        self.tok = self.spec.tokenizer()
        print(f"ray replica ready: {common.threads_report()}", flush=True)

    @serve.batch(
        max_batch_size=common.MAX_BATCH_SIZE, batch_wait_timeout_s=common.MAX_WAIT_MS / 1000
    )
    async def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        return common.predict(self.model, self.tok, self.spec, texts)

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return await self.classify(body["text"])


def _ray_temp(workdir: Path | None) -> Path | None:
    """Ray's temp folder: the work folder, unless its path is too long for the Unix sockets Ray
    creates about 60 characters below it (AF_UNIX paths stop at 107 bytes; a long $TMPDIR made
    Ray fail to start), then a short folder under /tmp, removed at exit."""
    if workdir is None:
        return None
    if len(str(workdir.resolve())) <= 40:
        return workdir.resolve()
    short = Path(tempfile.mkdtemp(prefix="fi-ray-", dir="/tmp"))
    atexit.register(shutil.rmtree, short, True)
    return short


def main() -> None:
    args = common.server_args(__doc__.splitlines()[0])
    temp = _ray_temp(args.workdir)
    ray.init(
        address="local",  # a new cluster of our own, never someone else's
        _node_ip_address="127.0.0.1",  # Ray's own traffic stays on loopback too
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        _temp_dir=str(temp) if temp else None,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    serve.start(
        http_options={"host": "127.0.0.1", "port": args.port},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    serve.run(
        Classifier.bind(args.model, str(args.checkpoint.resolve())),  # type: ignore[attr-defined]
        name="classifier",
        route_prefix="/predict",
    )
    print("RAY_SERVE_READY", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

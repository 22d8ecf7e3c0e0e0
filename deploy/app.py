"""The service the Docker image runs: warm start from the baked compile-cache bundle.

    uvicorn app:app --app-dir deploy --host 0.0.0.0 --port 8000

Startup (in the background; ``/healthz`` answers at once, ``/readyz`` says 503 until the end):

1. threads: ``configure_threads()`` sizes torch to the container's CPU limit (the cgroup quota,
   read by :class:`fastinfer.CorePlan`), or to ``APP_THREADS``;
2. import: the bundle ``APP_BUNDLE`` (baked into the image by ``fastinfer warm``, or mounted) is
   unpacked into ``$FASTINFER_CACHE_DIR``;
3. compile: the model is compiled for ``APP_BATCH_SIZES`` from that cache: every graph is a cache
   hit, no compile runs in the pod;
4. ready: the batcher starts and ``/readyz`` turns 200.

``POST /predict`` takes ``{"x": [...]}`` (one input of the ``APP_INPUT`` shape without the batch
dimension) and returns ``{"y": [...]}``. ``GET /metrics`` is the Prometheus text, with
``fastinfer_queue_depth`` (the HPA's metric) and ``fastinfer_compile_cache_total{result}``.

Variables (read here, by this application; fastinfer's own are in docs/environment-variables.md):

- ``APP_MODEL``: ``module:factory`` of the model (default ``fastinfer.testing:tiny_mlp``);
- ``APP_INPUT``: the ``fastinfer warm`` input spec (default ``float32[B,32]``);
- ``APP_BATCH_SIZES``: warmed batch sizes, the largest is the batcher's maximum (default 1,8,32);
- ``APP_BUNDLE``: the bundle to import (default ``/opt/fastinfer/model.tar``; missing: compile
  cold into ``$FASTINFER_CACHE_DIR`` and log it);
- ``APP_THREADS``: intra-op threads (default: the CPU limit's core budget);
- ``APP_MAX_WAIT_MS``: the batcher's wait (default 5);
- ``APP_LATENCY_TARGET_MS``: the latency an admitted request must meet (default 500): the queue
  is sized from the batch cost measured at start-up, and a request beyond it gets a fast 503
  with ``Retry-After`` (:meth:`FastInferService.admission`).

At shutdown (SIGTERM) uvicorn stops accepting, finishes the requests in flight, then the batcher
drains and the service logs one line, ``drained: ...``, with the batcher's request counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel

import fastinfer
from fastinfer._cli.warm import load_factory, parse_input
from fastinfer.errors import InvalidInput
from fastinfer.integrations.fastapi import FastInferService

# This is the application: it may configure logging (fastinfer, a library, never does).
logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
logger = logging.getLogger("fastinfer.deploy")

MODEL = os.environ.get("APP_MODEL", "fastinfer.testing:tiny_mlp")
INPUT = os.environ.get("APP_INPUT", "float32[B,32]")
SIZES = tuple(int(s) for s in os.environ.get("APP_BATCH_SIZES", "1,8,32").split(","))
BUNDLE = os.environ.get("APP_BUNDLE", "/opt/fastinfer/model.tar")
THREADS = os.environ.get("APP_THREADS")
MAX_WAIT_MS = float(os.environ.get("APP_MAX_WAIT_MS", "5"))
LATENCY_TARGET_MS = float(os.environ.get("APP_LATENCY_TARGET_MS", "500"))

svc = FastInferService()


@svc.setup
def build(svc: FastInferService) -> None:
    with svc.phase("threads"):
        settings = fastinfer.configure_threads(int(THREADS) if THREADS else None)
        logger.info("threads: %d (%s)", settings.threads, fastinfer.CorePlan.detect().sources)
    with svc.phase("import"):
        if Path(BUNDLE).is_file():
            cache = fastinfer.InductorCache.import_(BUNDLE)
        else:
            logger.warning("no bundle at %s: compiling cold into $FASTINFER_CACHE_DIR", BUNDLE)
            cache = fastinfer.InductorCache()
    name, example = parse_input(INPUT, max(SIZES))
    if name is not None:
        raise fastinfer.ConfigError(f"APP_INPUT must be one positional input spec, got {INPUT!r}")
    with svc.phase("compile"):
        compiled = fastinfer.compile_model(
            load_factory(MODEL), example, batch_sizes=SIZES, cache=cache
        )
    st = compiled.statistics()
    svc.metrics.compile_seconds.observe(st.compile_seconds)
    for result, n in (("hit", st.cache_hits), ("miss", st.cache_misses)):
        svc.metrics.compile_cache.labels(result).inc(n)
    svc.state.item_shape, svc.state.dtype = tuple(example.shape[1:]), example.dtype

    def predict(batch: torch.Tensor) -> torch.Tensor:  # (B, *item_shape) -> (B, ...)
        return compiled(batch)

    limits = svc.admission(predict, example, latency_target_ms=LATENCY_TARGET_MS)
    svc.state.batcher = svc.manage(
        fastinfer.DynamicBatcher(
            predict,
            max_batch_size=max(SIZES),
            max_wait_ms=MAX_WAIT_MS,
            collate="stack",
            **limits,
            **svc.batcher_hooks(),
        ),
        name="model",
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with svc.lifespan(app):
        yield
    batcher = vars(svc.state).get("batcher")
    if batcher is not None:  # after the drain: what every accepted request came to
        st = batcher.statistics()
        logger.info(
            "drained: submitted=%d ok=%d failed=%d rejected=%d expired=%d cancelled=%d queued=%d",
            st.requests_submitted,
            st.requests_ok,
            st.requests_failed,
            st.requests_rejected,
            st.requests_expired,
            st.requests_cancelled,
            st.queue_depth,
        )


app = FastAPI(lifespan=lifespan)
svc.install(app)


class Item(BaseModel):
    x: list[Any]


@app.post("/predict")
async def predict(item: Item, request: Request) -> dict[str, Any]:
    svc.check_ready()
    x = torch.tensor(item.x, dtype=svc.state.dtype)
    if tuple(x.shape) != svc.state.item_shape:
        raise InvalidInput(
            f"x has shape {tuple(x.shape)}, expected {svc.state.item_shape} (one item, no batch "
            "dimension)"
        )
    y = await svc.submit(svc.state.batcher, x, request)
    return {"y": y.tolist()}

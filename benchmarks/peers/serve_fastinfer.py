"""fastinfer as ``docs/fastapi.md`` tells a user to write it, in three variants.

- ``batching``: ``FastInferService`` + ``DynamicBatcher`` (32 items, 5 ms), the model loaded by
  ``fastinfer.load_model``, no attention swap, in the server process (slots x threads sized by
  ``svc.admission``);
- ``inprocess``: the same plus ``swap_attention_`` at startup: loader + attention swap + batcher;
- ``full``: what the docs lead with, ``svc.serve_model``: on a multi-core machine the loaded,
  swapped model in ``PinnedPool`` worker processes (one per physical core, pinned, one thread
  each, each holding its next batch ready), fed by an adaptive batcher sized through the pool.
  The server process only parses, batches and answers.

Everything the lead changes when the serving path changes lives here: :func:`fastinfer_app`
(the service), :func:`prepare_model` (the model as the service runs it, which the offline ceiling
also uses) and :func:`serving_shape` (how the service computes: processes x slots x threads,
for the ceiling measured with the same shape).

    python benchmarks/peers/serve_fastinfer.py --variant full --model bert-mini --checkpoint CKPT --port 8000
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import _uvicorn
import common
import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel

VARIANTS = ("batching", "inprocess", "full")


class TextRequest(BaseModel):
    text: str


def serving_shape(variant: str) -> dict[str, Any]:
    """How the service computes: ``processes`` x ``slots`` (batches at once in one process) x
    ``threads`` (torch threads). In-process, ``svc.admission`` chooses slots x threads by
    measuring every split of the cores (``"auto"``; the offline ceiling is then the best split,
    measured the same way); with the pool, one single-thread process per physical core."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "full":
        from fastinfer import CorePlan

        return {"processes": CorePlan.detect().default_workers(), "slots": 1, "threads": 1}
    return {"processes": 1, "slots": "auto", "threads": "auto", "env": {}}


def prepare_model(
    variant: str,
    spec: common.ModelSpec,
    checkpoint: str | Path,
    *,
    phase: Callable[[str], AbstractContextManager[Any]] = lambda name: nullcontext(),
) -> Any:
    """The model as the service runs it: loaded, and for ``full`` attention-swapped.

    The service passes ``phase=svc.phase`` (so /readyz shows each step); the offline ceiling
    calls it as it is, so both always run the same model."""
    import fastinfer

    with phase("load"):
        model = fastinfer.load_model(spec.factory, checkpoint)
    if variant != "batching":
        with phase("swap_attention"):
            enc = spec.tokenizer()(spec.texts(8, seed=1))
            fastinfer.swap_attention_(
                model, example_inputs=(enc["input_ids"], enc["attention_mask"])
            )
    return model


def worker_init(model_name: str, checkpoint: str) -> Any:
    """Runs once in each pool worker, pinned, its threads set: the model as the service runs it."""
    spec = common.MODELS[model_name]
    return spec.tokenizer(), prepare_model("full", spec, checkpoint), spec.labels


def worker_classify(state: Any, texts: list[str]) -> list[dict[str, Any]]:
    """One batch, in a pool worker: tokenize, forward, post-process."""
    tok, model, labels = state
    enc = tok(texts)
    with torch.inference_mode():
        logits = model(enc["input_ids"], enc["attention_mask"])
    return common.postprocess(logits, labels)


def pool_app(spec: common.ModelSpec, checkpoint: str | Path) -> FastAPI:
    """The ``full`` variant, as docs/fastapi.md leads: ``svc.serve_model`` (on this machine, the
    model in pinned worker processes, fed by the batcher)."""
    from fastinfer.integrations.fastapi import FastInferService

    svc = FastInferService()

    @svc.setup
    def build(svc: FastInferService) -> None:
        svc.state.batcher = svc.serve_model(
            functools.partial(worker_init, spec.name, str(checkpoint)),
            worker_classify,
            spec.texts(common.MAX_BATCH_SIZE, seed=2),
            latency_target_ms=500,
            max_wait_ms=common.MAX_WAIT_MS,
            name="classifier",
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(query: TextRequest, request: Request) -> Any:
        return await svc.submit(svc.state.batcher, query.text, request)

    return app


def fastinfer_app(variant: str, spec: common.ModelSpec, checkpoint: str | Path) -> FastAPI:
    """The FastAPI app for ``variant``, written as ``docs/fastapi.md`` shows it."""
    import fastinfer
    from fastinfer.integrations.fastapi import FastInferService

    svc = FastInferService()
    tok = spec.tokenizer()

    @svc.setup  # in the background: /readyz says 503 until it is done
    def build(svc: FastInferService) -> None:
        model = prepare_model(variant, spec, checkpoint, phase=svc.phase)

        def classify(texts: list[str]) -> list[dict[str, Any]]:
            enc = tok(texts)
            with torch.inference_mode():
                logits = model(enc["input_ids"], enc["attention_mask"])
            return common.postprocess(logits, spec.labels)

        # slots x threads and the queue, measured on a full batch (docs/fastapi.md)
        with svc.phase("measure"):
            limits = svc.admission(
                classify, spec.texts(common.MAX_BATCH_SIZE, seed=2), latency_target_ms=500
            )
        svc.state.batcher = svc.manage(
            fastinfer.DynamicBatcher(
                classify,
                max_batch_size=common.MAX_BATCH_SIZE,
                max_wait_ms=common.MAX_WAIT_MS,
                **limits,
                **svc.batcher_hooks(),
            ),
            name="classifier",
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)  # /healthz, /readyz, /metrics, error handlers

    @app.post("/predict")
    async def predict(query: TextRequest, request: Request) -> Any:
        return await svc.submit(svc.state.batcher, query.text, request)

    return app


if __name__ == "__main__":
    args = common.server_args(__doc__.splitlines()[0], VARIANTS)
    spec = common.MODELS[args.model]
    if args.variant == "full":
        app = pool_app(spec, args.checkpoint)
    else:
        app = fastinfer_app(args.variant, spec, args.checkpoint)
    _uvicorn.serve(app, args.port)

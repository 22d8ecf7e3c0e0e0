"""fastinfer as ``docs/fastapi.md`` tells a user to write it, in two variants.

- ``batching``: ``FastInferService`` + ``DynamicBatcher`` (32 items, 5 ms), the model loaded by
  ``fastinfer.load_model``, no attention swap;
- ``full``: the same plus ``swap_attention_`` at startup: loader + attention swap + batcher,
  exactly the sequence of the docs' example.

Everything the lead changes when the serving path changes lives here: :func:`fastinfer_app`
(the service), :func:`prepare_model` (the model as the service runs it, which the offline ceiling
also uses) and :func:`serving_shape` (how the service computes: processes x slots x threads,
for the ceiling measured with the same shape).

    python benchmarks/peers/serve_fastinfer.py --variant full --model bert-mini --checkpoint CKPT --port 8000
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import _uvicorn
import common
import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel

VARIANTS = ("batching", "full")


class TextRequest(BaseModel):
    text: str


def serving_shape(variant: str) -> dict[str, Any]:
    """How the service computes: ``processes`` x ``slots`` (batches at once in one process) x
    ``threads`` (torch threads). The docs' example lets ``svc.admission`` choose slots x threads
    by measuring every split of the cores (``"auto"``); the offline ceiling is then the best
    split, measured the same way."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
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
    if variant == "full":
        with phase("swap_attention"):
            enc = spec.tokenizer()(spec.texts(8, seed=1))
            fastinfer.swap_attention_(
                model, example_inputs=(enc["input_ids"], enc["attention_mask"])
            )
    return model


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
    _uvicorn.serve(fastinfer_app(args.variant, spec, args.checkpoint), args.port)

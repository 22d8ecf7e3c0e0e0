"""The two services the demo compares, each run in its own process by ``run_demo``:

- ``plain``: what users write today: a sync FastAPI endpoint that tokenizes and runs the model for
  each request (FastAPI runs it in its thread pool, so requests fight over the cores);
- ``fastinfer``: the same model and tokenizer through fastinfer: fast loader, attention swap,
  optional compile, a dynamic batcher, readiness, metrics and cancel-on-disconnect.

    python -m fastinfer._cli.demo.server --mode fastinfer --checkpoint CKPT [--port 8000]

It prints ``FASTINFER_DEMO_PORT <port>`` once it listens (on 127.0.0.1 unless --host says more).
"""

import argparse
import functools
import socket
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel

from fastinfer import _torch_compat
from fastinfer._cli.demo import model as demo_model
from fastinfer._optional import require

#: the fastinfer service admits what finishes within this (its queue is sized from the batch cost)
LATENCY_TARGET_MS = 1000.0


class TextRequest(BaseModel):
    text: str


def plain_app(checkpoint: Path) -> Any:
    # the model as built runs nn.TransformerEncoder's nested-tensor fastpath: torch's one-time
    # "prototype stage" warning is nothing a demo user can act on
    _torch_compat.spend_nested_prototype_warning()
    model = demo_model.build_model()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    tok = demo_model.tokenizer()
    app = FastAPI()

    @app.post("/predict")
    def predict(req: TextRequest) -> dict[str, Any]:
        enc = tok([req.text])
        with torch.no_grad():
            logits = model(enc["input_ids"], enc["attention_mask"])
        return demo_model.postprocess(logits)[0]

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    return app


def load_model(checkpoint: Path, swap: bool, compile: bool, max_batch_size: int) -> Any:
    """The tokenizer and the model as the fastinfer service runs them: once in each worker
    process (or in the server process)."""
    import fastinfer

    tok = demo_model.tokenizer()
    model: Any = fastinfer.load_model(demo_model.build_model, checkpoint)
    example = tok(demo_model.texts(max_batch_size, seed=1))
    example_inputs = (example["input_ids"], example["attention_mask"])
    if swap:
        fastinfer.swap_attention_(model, example_inputs=example_inputs)
    if compile:
        model = fastinfer.compile_model(
            model, example_inputs, batch_sizes=(1, 8, max_batch_size), fallback="eager"
        )
    return tok, model


def predict_batch(state: Any, texts: list[str]) -> list[dict[str, Any]]:
    """One batch: tokenize, one forward pass, label and score per text."""
    tok, model = state
    enc = tok(texts)
    with torch.inference_mode():
        logits = model(enc["input_ids"], enc["attention_mask"])
    return demo_model.postprocess(logits)


def fastinfer_app(
    checkpoint: Path,
    *,
    compile: bool = False,
    swap: bool = True,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    workers: int | Literal["auto"] = "auto",
    dashboard: bool = False,
    latency_target_ms: float = LATENCY_TARGET_MS,
) -> Any:
    from fastinfer.integrations.fastapi import FastInferService

    svc = FastInferService(dashboard=dashboard)

    @svc.setup
    def build(svc: FastInferService) -> None:
        # Where the model runs is measured, not assumed (docs/fastapi.md): with workers="auto",
        # one pinned single-thread worker process per physical core, fed by the batcher; the
        # queue is sized from a full batch's cost through them (also the warm-up).
        svc.state.batcher = svc.serve_model(
            functools.partial(load_model, checkpoint, swap, compile, max_batch_size),
            predict_batch,
            demo_model.texts(max_batch_size, seed=2),
            latency_target_ms=latency_target_ms,
            workers=workers,
            max_wait_ms=max_wait_ms,
            name="batcher",
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(req: TextRequest, request: Request) -> Any:
        return await svc.submit(svc.state.batcher, req.text, request)

    return app


def _workers(value: str) -> int | Literal["auto"]:
    return "auto" if value == "auto" else int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["plain", "fastinfer"], required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-swap", action="store_true")
    parser.add_argument(
        "--workers", type=_workers, default="auto", help="model processes (0: in the server)"
    )
    parser.add_argument("--dashboard", action="store_true", help="serve /dashboard")
    parser.add_argument(
        "--latency-target-ms", type=float, default=LATENCY_TARGET_MS, help="admission target"
    )
    args = parser.parse_args(argv)
    uvicorn = require("uvicorn")
    if args.mode == "plain":
        app = plain_app(args.checkpoint)
    else:
        app = fastinfer_app(
            args.checkpoint,
            compile=args.compile,
            swap=not args.no_swap,
            workers=args.workers,
            dashboard=args.dashboard,
            latency_target_ms=args.latency_target_ms,
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit TCP_NODELAY from the listener; without it, a response written
    # as headers + body waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((args.host, args.port))
    print(f"FASTINFER_DEMO_PORT {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

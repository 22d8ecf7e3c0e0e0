"""The two services the demo compares, each run in its own process by ``run_demo``:

- ``plain``: what users write today: a sync FastAPI endpoint that tokenizes and runs the model for
  each request (FastAPI runs it in its thread pool, so requests fight over the cores);
- ``fastinfer``: the same model and tokenizer through fastinfer: fast loader, attention swap,
  optional compile, a dynamic batcher, readiness, metrics and cancel-on-disconnect.

    python -m fastinfer._cli.demo.server --mode fastinfer --checkpoint CKPT [--port 8000]

It prints ``FASTINFER_DEMO_PORT <port>`` once it listens (on 127.0.0.1 unless --host says more).
"""

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

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


def fastinfer_app(
    checkpoint: Path,
    *,
    compile: bool = False,
    swap: bool = True,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    slots: int | None = None,
    threads: int | None = None,
    dashboard: bool = False,
    latency_target_ms: float = LATENCY_TARGET_MS,
) -> Any:

    import fastinfer
    from fastinfer.integrations.fastapi import FastInferService

    svc = FastInferService(dashboard=dashboard)
    tok = demo_model.tokenizer()

    @svc.setup
    def build(svc: FastInferService) -> None:
        with svc.phase("load"):
            model = fastinfer.load_model(demo_model.build_model, checkpoint)
        example = tok(demo_model.texts(max_batch_size, seed=1))
        example_inputs = (example["input_ids"], example["attention_mask"])
        if swap:
            with svc.phase("swap_attention"):
                svc.state.attention = fastinfer.swap_attention_(
                    model, example_inputs=example_inputs
                )
        run_model: Any = model
        if compile:
            with svc.phase("compile"):
                run_model = fastinfer.compile_model(
                    model, example_inputs, batch_sizes=(1, 8, max_batch_size), fallback="eager"
                )

        def predict_batch(texts: list[str]) -> list[dict[str, Any]]:
            enc = tok(texts)
            with torch.inference_mode():
                logits = run_model(enc["input_ids"], enc["attention_mask"])
            return demo_model.postprocess(logits)

        # How many batches run at once, with how many torch threads, and how long the queue may
        # be: measured on a full batch (these runs are also the warm-up). "auto" tries every
        # split of the cores and keeps the fastest; --slots fixes it.
        with svc.phase("measure"):
            limits = svc.admission(
                predict_batch,
                demo_model.texts(max_batch_size, seed=2),
                latency_target_ms=latency_target_ms,
                max_concurrent_batches=slots if slots is not None else "auto",
            )
        if threads is not None:
            fastinfer.configure_threads(threads)
        svc.state.batcher = svc.manage(
            fastinfer.DynamicBatcher(
                predict_batch,
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                policy="adaptive",
                **limits,
                **svc.batcher_hooks(),
            ),
            name="batcher",
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(req: TextRequest, request: Request) -> Any:
        return await svc.submit(svc.state.batcher, req.text, request)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["plain", "fastinfer"], required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-swap", action="store_true")
    parser.add_argument("--slots", type=int, default=None, help="batches run at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
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
            slots=args.slots,
            threads=args.threads,
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

"""The plain FastAPI endpoint users write today: a sync endpoint, one request, one forward pass.

Tuning, from FastAPI's docs ("Concurrency and async / await"): a ``def`` (not ``async def``)
endpoint for blocking work, so FastAPI runs it in its thread pool and the event loop stays free;
one uvicorn worker (``uvicorn main:app``, the documented start); torch's default threads.
Runs in fastinfer's own venv (FastAPI and uvicorn are there already).

    python benchmarks/peers/serve_plain.py --model bert-mini --checkpoint CKPT --port 8000
"""

from __future__ import annotations

from typing import Any

import _uvicorn
import common
from fastapi import FastAPI
from pydantic import BaseModel


class TextRequest(BaseModel):
    text: str


def plain_app(spec: common.ModelSpec, checkpoint: Any) -> FastAPI:
    model = common.load_plain(spec, checkpoint)
    tok = spec.tokenizer()
    app = FastAPI()

    @app.post("/predict")
    def predict(req: TextRequest) -> dict[str, Any]:
        return common.predict(model, tok, spec, [req.text])[0]

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"ready": True}

    return app


if __name__ == "__main__":
    args = common.server_args(__doc__.splitlines()[0])
    _uvicorn.serve(plain_app(common.MODELS[args.model], args.checkpoint), args.port)

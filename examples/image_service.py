"""An image-style service: fixed-size tensors, stacked into batches, compiled with no
recompilation at serve time.

    uvicorn examples.image_service:app
    python examples/image_service.py      # start it, send requests, stop it

The model is compiled for the batch sizes the batcher will send (``preferred_batch_sizes`` with
padding up to the next one), so a request never waits for a compile. The queue is sized from the
measured cost of a full batch, so an admitted request is answered within LATENCY_TARGET_MS (503
with Retry-After beyond). Malformed input (wrong number of pixels) is a 422 that says what was
expected.
"""

from __future__ import annotations

from typing import Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel
from torch import nn

import fastinfer
from fastinfer.integrations.fastapi import FastInferService

SHAPE = (3, 16, 16)
SIZES = (1, 4, 8)
LATENCY_TARGET_MS = 250


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    ).eval()


svc = FastInferService()


@svc.setup
def build(svc: FastInferService) -> None:
    model = tiny_cnn()
    with svc.phase("compile"):
        compiled = fastinfer.compile_model(
            model, torch.randn(SIZES[-1], *SHAPE), batch_sizes=SIZES, fallback="eager"
        )
    svc.state.compiled = compiled
    svc.state.graphs_after_warmup = compiled.statistics().graphs

    def predict(batch: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) -> (B, 10)
        with torch.inference_mode():
            return compiled(batch)

    limits = svc.admission(
        predict, torch.randn(SIZES[-1], *SHAPE), latency_target_ms=LATENCY_TARGET_MS
    )
    svc.state.batcher = svc.manage(
        fastinfer.DynamicBatcher(
            predict,
            max_batch_size=SIZES[-1],
            max_wait_ms=2,
            collate="stack",
            preferred_batch_sizes=SIZES,
            pad_to_preferred=True,
            **limits,
            **svc.batcher_hooks(),
        ),
        name="images",
    )


app = FastAPI(lifespan=svc.lifespan)
svc.install(app)


class Image(BaseModel):
    pixels: list[float]


@app.post("/predict")
async def predict(image: Image, request: Request) -> Any:
    expected = SHAPE[0] * SHAPE[1] * SHAPE[2]
    if len(image.pixels) != expected:
        raise fastinfer.InvalidInput(
            f"pixels has {len(image.pixels)} values; expected {expected} (a {SHAPE} image, flattened)"
        )
    x = torch.tensor(image.pixels).view(SHAPE)
    logits = await svc.submit(svc.state.batcher, x, request)
    return {"class": int(logits.argmax()), "logits": [round(v, 4) for v in logits.tolist()]}


if __name__ == "__main__":
    import asyncio

    import httpx

    from fastinfer.integrations.fastapi import run_server

    async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
        """What a good client does with a 503: wait as long as Retry-After says, then retry."""
        for _ in range(10):
            answer = await client.post("/predict", json=body)
            if answer.status_code != 503:
                return answer
            await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
        return answer

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.1)
            n = SHAPE[0] * SHAPE[1] * SHAPE[2]
            bodies = [{"pixels": torch.rand(n).tolist()} for _ in range(20)]
            answers = await asyncio.gather(*(post(client, b) for b in bodies))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            print("classes:", [a.json()["class"] for a in answers])
            bad = await client.post("/predict", json={"pixels": [0.0] * 5})
            print("5 pixels ->", bad.status_code, bad.json()["detail"])
        stats = svc.state.compiled.statistics()
        print("graphs compiled while serving:", stats.graphs - svc.state.graphs_after_warmup)
        print("recompiles refused:", stats.recompiles_refused, "| fallback:", stats.fallback)

    with run_server(app) as url:
        asyncio.run(main(url))

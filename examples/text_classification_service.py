"""A text-classification service: tokenizer + small BERT-like model, batched, with metrics.

    uvicorn examples.text_classification_service:app      # serve it (from the repository root)
    python examples/text_classification_service.py        # start it, send requests, stop it

``svc.serve_model`` runs the model where it serves fastest: on a machine with two or more physical
cores, one pinned single-thread worker process per core, each loading it with the fast loader and
swapping its attention; on one core, in the server process. Startup runs in phases (start the
workers, measure a full batch through them), then /readyz turns 200 and says what was chosen;
until then /predict answers 503. Requests are batched by a DynamicBatcher whose
queue is sized from the measured batch cost, so that an admitted request is answered within
LATENCY_TARGET_MS; beyond that the service answers 503 with Retry-After at once (and a flood is
shed before its requests are even parsed). A client that disconnects cancels its queued request;
/metrics serves Prometheus text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

import fastinfer
from fastinfer import testing
from fastinfer.integrations.fastapi import FastInferService

CHECKPOINT = Path(tempfile.gettempdir()) / "fastinfer-example-classifier.pt"
LABELS = ("negative", "positive")
MAX_BATCH = 32
LATENCY_TARGET_MS = 500  # what an admitted request must meet: the queue is sized for it
tokenizer = testing.HashTokenizer(vocab_size=1000, max_length=128)
svc = FastInferService()


def load() -> torch.nn.Module:
    """Build the model: once in each worker process (or here, on one core)."""
    model = fastinfer.load_model(testing.bert_like_classifier, CHECKPOINT)
    warm = tokenizer(["a short warm up text", "and a somewhat longer one " * 6])
    fastinfer.swap_attention_(model, example_inputs=(warm["input_ids"], warm["attention_mask"]))
    return model


def classify(model: torch.nn.Module, texts: list[str]) -> list[dict[str, Any]]:
    """One batch: tokenize, one forward pass, the label and its probability per text."""
    enc = tokenizer(texts)
    with torch.inference_mode():
        probs = model(enc["input_ids"], enc["attention_mask"]).softmax(-1)
    return [{"label": LABELS[int(p.argmax())], "score": round(float(p.max()), 4)} for p in probs]


@svc.setup
def build(svc: FastInferService) -> None:
    if not CHECKPOINT.exists():  # stands in for your trained weights
        testing.save_checkpoint(testing.bert_like_classifier(), CHECKPOINT)
    # a full batch of representative texts: the cost measured on it sizes the queue
    texts = [f"request text number {i} " + "quite good " * (i % 9) for i in range(MAX_BATCH)]
    svc.state.batcher = svc.serve_model(
        load, classify, texts, latency_target_ms=LATENCY_TARGET_MS, name="classifier"
    )


app = FastAPI(lifespan=svc.lifespan)
svc.install(app)


class Query(BaseModel):
    text: str = Field(min_length=1, max_length=5000)


@app.post("/predict")
async def predict(query: Query, request: Request) -> Any:
    return await svc.submit(svc.state.batcher, query.text, request)


if __name__ == "__main__":
    import asyncio

    import httpx

    from fastinfer.integrations.fastapi import run_server

    async def post(client: httpx.AsyncClient, body: dict[str, str]) -> httpx.Response:
        """What a good client does with a 503: wait as long as Retry-After says, then retry."""
        for _ in range(10):
            answer = await client.post("/predict", json=body)
            if answer.status_code != 503:
                return answer
            await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
        return answer

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)
            ready = (await client.get("/readyz")).json()
            print("serving:", ready["serving"]["classifier"]["choice"])
            print("admission:", ready["admission"])
            texts = [f"review number {i} " + "good " * (i % 7) for i in range(64)]
            answers = await asyncio.gather(*(post(client, {"text": t}) for t in texts))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            print("first answer:", answers[0].json())
            bad = await client.post("/predict", json={"text": ""})
            print("empty text ->", bad.status_code, bad.json()["detail"])
            metrics = (await client.get("/metrics")).text
            sizes = [
                line
                for line in metrics.splitlines()
                if line.startswith("fastinfer_batch_size_count")
            ]
            print("batches run:", sizes)

    with run_server(app) as url:
        asyncio.run(main(url))

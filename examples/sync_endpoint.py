"""A sync (``def``) FastAPI endpoint that still batches: ``submit_sync`` from FastAPI's threads.

    python examples/sync_endpoint.py

FastAPI runs ``def`` endpoints in a thread pool. Each thread calls ``batcher.submit_sync(item)``,
which hands the item to the batcher's own event-loop thread and blocks only that request's thread,
so concurrent requests are still served by one forward pass. The queue is sized from the measured
cost of a full batch (``measure_admission``), so an admitted request is answered within
LATENCY_TARGET_MS; beyond that, ``FastInferService``'s error mapping answers 503 with Retry-After.
"""

from __future__ import annotations

import torch
from fastapi import FastAPI
from pydantic import BaseModel

import fastinfer
from fastinfer import testing
from fastinfer.integrations.fastapi import FastInferService, measure_admission

model = testing.tiny_mlp(in_features=4, out_features=2)
LATENCY_TARGET_MS = 100


def forward(rows: list[list[float]]) -> list[list[float]]:
    with torch.inference_mode():
        return model(torch.tensor(rows)).tolist()


admission = measure_admission(forward, [[0.0] * 4] * 16, latency_target_ms=LATENCY_TARGET_MS)
batcher = fastinfer.DynamicBatcher(
    forward,
    max_batch_size=16,
    max_wait_ms=5,
    max_queue_size=admission.max_queue_size,
    own_loop=True,
)
svc = FastInferService()  # error mapping (QueueFull -> 503 + Retry-After), /healthz, /metrics
svc.manage(batcher, name="rows")  # drained at shutdown
app = FastAPI(lifespan=svc.lifespan)
svc.install(app)


class Row(BaseModel):
    x: list[float]


@app.post("/predict")
def predict(row: Row) -> dict[str, list[float]]:
    if len(row.x) != 4:
        raise fastinfer.InvalidInput(f"x has {len(row.x)} values; expected 4")
    return {"y": batcher.submit_sync(row.x, timeout=10)}


if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from fastinfer.integrations.fastapi import run_server

    with run_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with ThreadPoolExecutor(16) as threads:
            answers = list(
                threads.map(lambda i: client.post("/predict", json={"x": [i, 1, 2, 3]}), range(48))
            )
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        stats = batcher.statistics()
        print(
            f"{stats.requests_ok} requests in {stats.batches_run} batches (mean {stats.batch_size_mean:.1f})"
        )
    batcher.close()

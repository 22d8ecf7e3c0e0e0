"""Pinned worker processes fed by the batcher: every core busy, one batch per worker.

    python examples/pool_service.py

A ``PinnedPool`` starts one process per group of physical cores, pins it, sizes its threads
before torch is imported, and loads the model once per worker. A ``DynamicBatcher`` with
``max_concurrent_batches = pool.workers`` keeps every worker busy: while the workers run batches,
the next batches keep growing.
"""

from __future__ import annotations

import asyncio

import torch

import fastinfer


def init() -> torch.nn.Module:  # runs once in each worker, after pinning
    from fastinfer import testing

    return testing.tiny_mlp(in_features=64, hidden=256, out_features=4, layers=4)


def run(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:  # in the worker
    with torch.inference_mode():
        return model(batch)


async def main() -> None:
    with fastinfer.PinnedPool(init, run, workers=2) as pool:
        print(pool.split)  # which cores each worker owns, and its threads
        batcher = fastinfer.DynamicBatcher(
            pool.run, max_batch_size=32, max_wait_ms=2, collate="stack",
            max_concurrent_batches=pool.workers,
        )  # fmt: skip
        async with batcher:
            outputs = await asyncio.gather(*(batcher.submit(torch.randn(64)) for _ in range(256)))
        print(f"{len(outputs)} results; batcher: {batcher.statistics().batches_run} batches")
        print(pool.statistics())


if __name__ == "__main__":
    asyncio.run(main())

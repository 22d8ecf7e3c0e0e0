# %% [markdown]
# # Batching in a notebook
# Jupyter runs an event loop in the kernel's thread, so a cell can use top-level `await`.
# A `DynamicBatcher` lives in that loop: no server, no thread juggling. (Run this file as a
# notebook with jupytext, or cell by cell in VS Code; `tests/test_examples.py` runs it the same
# way, with top-level await.)

# %%
import asyncio

import torch

import fastinfer
from fastinfer import testing

model = testing.tiny_mlp()


def forward(batch: torch.Tensor) -> torch.Tensor:  # (B, 32) -> (B, 8)
    with torch.inference_mode():
        return model(batch)


batcher = fastinfer.DynamicBatcher(forward, max_batch_size=16, max_wait_ms=2, collate="stack")

# %%
outputs = await asyncio.gather(*(batcher.submit(torch.randn(32)) for _ in range(100)))  # noqa: F704
stats = batcher.statistics()
print(
    f"{len(outputs)} results from {stats.batches_run} batches, mean size {stats.batch_size_mean:.1f}"
)

# %%
# A plain (non-async) call from a cell works too: submit_sync does not deadlock although this
# thread is running the notebook's event loop.
print(batcher.submit_sync(torch.randn(32)).shape)

# %%
await batcher.aclose()  # noqa: F704

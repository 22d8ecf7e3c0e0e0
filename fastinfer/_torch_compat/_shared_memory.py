"""Shared-memory tensors (used by fastinfer.pool)."""

from __future__ import annotations

from typing import Any

import torch

from fastinfer._torch_compat._registry import entry

# --------------------------------------------------------------------------------------------
# Shared-memory tensors (pool)
# --------------------------------------------------------------------------------------------


def shared_tensor_reducer() -> Any:
    """The reduction ``torch.multiprocessing`` registers for tensors (shared-memory handles)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing

    return ForkingPickler._extra_reducers[torch.Tensor]  # type: ignore[attr-defined]


@entry(
    "shared_tensor_reducer",
    "multiprocessing.reduction.ForkingPickler._extra_reducers[torch.Tensor] "
    "(registered by torch.multiprocessing)",
    "pool: tensors larger than 256 KiB travel to workers through shared memory",
    "1.0 - 2.13",
)
def _probe_reducer() -> str:
    reduce = shared_tensor_reducer()
    if not callable(reduce):
        return "no tensor reduction registered by torch.multiprocessing"
    rebuild, args = reduce(torch.ones(4))
    return "" if callable(rebuild) and isinstance(args, tuple) else "unexpected reduction shape"

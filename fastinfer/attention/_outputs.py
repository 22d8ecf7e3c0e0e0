"""Calling a model with example inputs and comparing a path's outputs with the original's.

Comparisons use the shared per-dtype tolerance table (:mod:`fastinfer._common.tolerances`,
``(rtol, atol)``) on valid positions only: padded positions are zeroed first, so paths that leave
different values in padding compare equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastinfer._common.padding import valid_mask, zero_padded
from fastinfer._common.tolerances import tolerance_for

__all__ = ["call", "compare", "output_tensors", "sync", "valid_mask"]


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.to_padded_tensor(0.0) if out.is_nested else out]
    if hasattr(out, "to_tuple"):
        return output_tensors(out.to_tuple())
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in output_tensors(v)]
    return []


def compare(
    ref: list[torch.Tensor],
    out: list[torch.Tensor],
    valid: torch.Tensor | None,
    rtol: float | None = None,
    atol: float | None = None,
    original: str = "the original",
) -> tuple[float, str]:
    """Max abs error on valid positions and a mismatch message ("" if within tolerance);
    ``original`` names what ``ref`` is in the message."""
    if len(ref) != len(out):
        return float("inf"), f"returned {len(out)} tensors, {original} {len(ref)}"
    worst = 0.0
    problem = ""
    for i, (r, o) in enumerate(zip(ref, out)):
        if r.shape != o.shape:
            return float(
                "inf"
            ), f"output {i} has shape {tuple(o.shape)}, {original} {tuple(r.shape)}"
        if not r.is_floating_point():
            if not torch.equal(r, o):
                return float("inf"), f"output {i} ({r.dtype}) differs"
            continue
        rn, on = zero_padded(r, valid).float(), zero_padded(o, valid).float()
        both_nan = rn.isnan() & on.isnan()
        diff = (rn - on).abs().masked_fill(both_nan, 0)
        err = float(diff.max()) if diff.numel() else 0.0
        if err != err:  # NaN where the original has a number
            err = float("inf")
        worst = max(worst, err)
        tol = tolerance_for(r.dtype, rtol=rtol, atol=atol)
        bad = diff > tol.atol + tol.rtol * rn.abs().masked_fill(both_nan, 0)
        if bool(bad.any()) and not problem:
            problem = (
                f"output {i} differs from {original} on {int(bad.sum())} valid elements "
                f"(max abs error {err:.3g}, tolerance rtol={tol.rtol:g} atol={tol.atol:g} for {r.dtype})"
            )
    return worst, problem


def sync(model: nn.Module) -> None:
    try:
        p = next(model.parameters())
    except StopIteration:
        return
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)

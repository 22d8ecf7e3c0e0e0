"""Example inputs: one request batch, resized along dim 0 to every batch size a service sends."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastinfer.errors import ConfigError

__all__ = [
    "Inputs",
    "batch_of",
    "check_batch_sizes",
    "cpu_inputs",
    "inputs_for",
    "split",
    "tensors",
]

Inputs = Any  # a tensor, a tuple/list of positional args, or a dict of keyword args


def split(example_inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ConfigError(
        "example_inputs must be a tensor, a tuple/list of positional arguments or a dict of "
        f"keyword arguments, got {type(example_inputs).__name__}"
    )


def tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    ts = [t for t in tensors(args, kwargs) if t.dim() > 0]
    return int(ts[0].shape[0]) if ts else None


def _resize(value: Any, batch: int) -> Any:
    """``value`` with ``batch`` rows along dim 0 (rows repeated cyclically), others unchanged."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    n = value.shape[0]
    if n == 0:
        raise ConfigError("example inputs have an empty batch dimension; give at least one row")
    reps = math.ceil(batch / n)
    return torch.cat([value] * reps)[:batch].clone()  # (batch, ...)


def inputs_for(example_inputs: Inputs, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = split(example_inputs)
    return (
        tuple(_resize(a, batch) for a in args),
        {k: _resize(v, batch) for k, v in kwargs.items()},
    )


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    sizes = tuple(sorted(set(batch_sizes)))
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    return sizes


def cpu_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return all(t.device.type == "cpu" for t in tensors(args, kwargs))

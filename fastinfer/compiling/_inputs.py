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
    "normal_inputs",
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
    """``value`` with ``batch`` rows along dim 0 (rows repeated cyclically), others unchanged.

    Always a normal tensor (never an inference tensor), whatever mode the caller is in: the
    graphs are traced on normal tensors, and :func:`normal_inputs` makes serve-time inputs so.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0:
        return _normal(value)
    n = value.shape[0]
    if n == 0:
        raise ConfigError("example inputs have an empty batch dimension; give at least one row")
    reps = math.ceil(batch / n)
    with torch.inference_mode(False):
        return torch.cat([value] * reps)[:batch].clone().detach()  # (batch, ...)


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` as dynamo saw tensors at warm-up: not an inference tensor, not requiring grad."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()  # a normal tensor (the only copy: an inference tensor has no twin)
    return t.detach() if t.requires_grad else t


def normal_inputs(value: Any) -> Any:
    """``value`` (args, kwargs, nested lists/tuples/dicts) with every tensor made normal.

    Tensors created under ``torch.inference_mode()`` have other dispatch keys than normal ones,
    and dynamo guards on them: a graph traced on one kind recompiles for the other. Calls are
    normalised to the kind that was warmed (normal tensors) instead of warming every graph twice:
    inference tensors are copied (inputs only, a small cost next to a forward pass), tensors that
    require grad are detached (no copy), everything else is passed through untouched.
    """
    if isinstance(value, torch.Tensor):
        return _normal(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(normal_inputs(v) for v in value)
    if isinstance(value, list):
        return [normal_inputs(v) for v in value]
    if isinstance(value, dict):
        return {k: normal_inputs(v) for k, v in value.items()}
    return value


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

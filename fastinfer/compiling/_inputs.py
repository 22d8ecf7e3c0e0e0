"""Example inputs: one request batch, resized along dim 0 to every batch size a service sends.

The example's batch size is the leading dimension of its first tensor that has one. Only tensors
with that leading dimension are batched inputs and resized; any other tensor (a ``(1, D)`` or
``(D,)`` broadcast tensor, a scalar) is passed as is at every size. With an example batch of 1
every tensor with a leading 1 counts as batched (a tokenizer's ``(1, T)`` output is the common
case): give an example batch above 1 to pass a ``(1, D)`` tensor as is.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fastinfer.errors import ConfigError

__all__ = [
    "CallBinder",
    "Inputs",
    "batch_of",
    "batched_keys",
    "check_batch_sizes",
    "cpu_inputs",
    "inputs_for",
    "non_batch_hint",
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


def _resize(value: Any, batch: int, example_batch: int | None) -> Any:
    """``value`` with ``batch`` rows along dim 0 (rows repeated cyclically) when it is a batched
    input (its leading dimension is ``example_batch``), else unchanged.

    Always a normal tensor (never an inference tensor), whatever mode the caller is in: the
    graphs are traced on normal tensors, and :func:`normal_inputs` makes serve-time inputs so.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0 or value.shape[0] != example_batch:
        return _normal(value)  # not batched: the same tensor at every size
    n = value.shape[0]
    if n == 0:
        raise ConfigError("example inputs have an empty batch dimension; give at least one row")
    reps = math.ceil(batch / n)
    with torch.inference_mode(False):
        return torch.cat([value] * reps)[:batch].clone().detach()  # (batch, ...)


def _items(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[int | str, Any]]:
    return [*enumerate(args), *kwargs.items()]


def batched_keys(example_inputs: Inputs) -> frozenset[int | str]:
    """Positions and names of the example's batched tensors (the ones :func:`inputs_for`
    resizes): a tensor whose leading dimension is the example's batch size."""
    args, kwargs = split(example_inputs)
    b0 = batch_of(args, kwargs)
    return frozenset(
        k
        for k, v in _items(args, kwargs)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b0
    )


def non_batch_hint(example_inputs: Inputs) -> str:
    """A hint for a model that fails on the resized example inputs: the tensors that were resized
    only because their leading dimension happens to equal the batch size (they have another rank
    than the first tensor, e.g. a ``(D,)`` bias with ``D`` equal to the batch), else ""."""
    args, kwargs = split(example_inputs)
    items = [(k, v) for k, v in _items(args, kwargs) if isinstance(v, torch.Tensor)]
    first = next(((k, v) for k, v in items if v.dim() > 0), None)
    if first is None:
        return ""
    keys = batched_keys(example_inputs)
    odd = [
        f"{_name(k)} (shape {tuple(v.shape)})"
        for k, v in items
        if k in keys and k != first[0] and v.dim() != first[1].dim()
    ]
    if not odd:
        return ""
    b0 = int(first[1].shape[0])
    return (
        f". Note: {', '.join(odd[:4])} was resized along dim 0 like a batched input because its "
        f"leading dimension equals the example's batch size {b0} (the leading dimension of the "
        f"first tensor, {_name(first[0])} of shape {tuple(first[1].shape)}); if it has no batch "
        f"dimension, give example inputs with another batch size (e.g. {b0 + 1}) so it is "
        "passed as is at every size"
    )


def _name(key: int | str) -> str:
    return f"argument {key}" if isinstance(key, int) else repr(key)


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` as dynamo saw tensors at warm-up: not an inference tensor, not requiring grad, and
    a contiguous one with the standard strides."""
    if t.is_inference():
        with torch.inference_mode(False):
            t = t.clone()  # a normal tensor (the only copy: an inference tensor has no twin)
    elif t.requires_grad:
        t = t.detach()
    return _standard_strides(t)


def _standard_strides(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``t`` viewed with the standard strides. A size-1 dim's stride never matters
    for addressing, so ``full[:, :5]`` of a ``(1, 12)`` tensor is contiguous with strides
    ``(12, 1)``; dynamo guards on them all the same, and neither ``.contiguous()`` nor ``.clone()``
    changes them. The view shares the memory (no copy)."""
    if t.dim() == 0 or not t.is_contiguous():
        return t
    want, step = [], 1
    for n in reversed(t.shape):
        want.append(step)
        step *= max(int(n), 1)
    want.reverse()
    if list(t.stride()) == want:
        return t
    return t.as_strided(t.shape, want)


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
    """The example inputs at ``batch`` rows: batched tensors resized, the rest as they are."""
    args, kwargs = split(example_inputs)
    b0 = batch_of(args, kwargs)
    return (
        tuple(_resize(a, batch, b0) for a in args),
        {k: _resize(v, batch, b0) for k, v in kwargs.items()},
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


def _signature(model: Callable[..., Any]) -> inspect.Signature | None:
    """The signature calls are bound to: ``forward``'s for a module (transformers' decorated
    forwards unwrap to the real parameters), the callable's own otherwise."""
    target = getattr(model, "forward", model) if isinstance(model, torch.nn.Module) else model
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class CallBinder:
    """Puts a call's arguments in the form the model was warmed up with.

    Dynamo guards on how arguments arrive (``not args``, ``len(kwargs) == 2`` in a wrapper that
    takes ``*args, **kwargs``), so ``model(ids, attention_mask=m)`` would recompile a graph warmed
    with ``model(input_ids=ids, attention_mask=m)``. The call is bound to the model's signature
    and passed on as it was warmed: the same parameters positionally, the rest as keywords in
    the warmed order.
    """

    def __init__(
        self, model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.positional = len(args)
        self.keywords = tuple(kwargs)
        sig = _signature(model)
        names = (
            []
            if sig is None
            else [p.name for p in sig.parameters.values() if p.kind in _POSITIONAL]
        )
        # A warm-up that filled *args, or a signature we cannot read: calls are passed as they are.
        self.signature = sig if len(args) <= len(names) else None
        self.names = tuple(names[: len(args)])

    def matches(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the call already has the warmed form (the fast path: no binding)."""
        return len(args) == self.positional and tuple(kwargs) == self.keywords

    def bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The call in the warmed form, or None when it cannot be bound to the signature."""
        sig = self.signature
        if sig is None:
            return None
        try:
            bound = sig.bind(*args, **kwargs).arguments
        except TypeError:
            return None
        params = sig.parameters
        rest = dict(bound)
        new_args: list[Any] = []
        for name in self.names:
            if name not in rest:
                break
            new_args.append(rest.pop(name))
        new_kwargs: dict[str, Any] = {}
        for name, value in rest.items():
            kind = params[name].kind
            if kind == inspect.Parameter.VAR_POSITIONAL:
                if value:
                    return None  # extra positional arguments: nothing to rearrange
            elif kind == inspect.Parameter.VAR_KEYWORD:
                new_kwargs.update(value)
            elif kind == inspect.Parameter.POSITIONAL_ONLY:
                return None
            else:
                new_kwargs[name] = value
        order = {k: i for i, k in enumerate(self.keywords)}
        ordered = dict(sorted(new_kwargs.items(), key=lambda kv: order.get(kv[0], len(order))))
        return tuple(new_args), ordered

    def prepare(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], tuple[str, str] | None]:
        """The call in the warmed form where it can be bound, and a note for a
        :class:`RecompileError` saying how it still differs from the warm-up: ``("arguments",
        text)`` when it passes other arguments (a detail: the guards on them say what changed),
        ``("call style", text)`` when it could not be bound (the cause, with the fix)."""
        if self.matches(args, kwargs):
            return args, kwargs, None
        bound = self.bind(args, kwargs)
        if bound is not None:
            if self.matches(*bound):
                return bound[0], bound[1], None
            called = [*self.names[: len(bound[0])], *bound[1]]
            warmed = [*self.names, *self.keywords]
            text = (
                f"called with the arguments {called}, warmed up with {warmed}: an argument "
                "left out or added changes what the graphs were traced for"
            )
            return bound[0], bound[1], ("arguments", text)
        if len(args) > self.positional:
            style = "called positionally, warmed with keywords"
        elif len(args) < self.positional:
            style = "called with keywords, warmed positionally"
        else:
            style = "called with other keywords than at warm-up"
        why = (
            " (the model's signature takes *args/**kwargs or cannot be read, so the call cannot "
            "be bound to the warmed form)"
        )
        if self.signature is not None:
            try:
                self.signature.bind(*args, **kwargs)
            except TypeError as exc:
                why = f" (the call does not fit the model's signature: {exc})"
        return (
            args,
            kwargs,
            (
                "call style",
                f"{style}{why}: the call has {len(args)} positional argument(s) and keywords "
                f"{list(kwargs)}, the warm-up had {self.positional} and {list(self.keywords)}; "
                "call it the way it was warmed up (a tuple of example inputs is passed "
                "positionally, a dict as keywords), or compile with example inputs in the form you "
                "serve",
            ),
        )

"""Admission sized from the measured batch cost: a service admits only what can finish in time.

:meth:`FastInferService.admission` runs the batch function on a full example batch a few times
(the runs double as warm-up), takes the median, and turns a latency target into the batcher's
``max_queue_size``: a queue no longer than what the batch slots drain within the target. A
request beyond it gets ``QueueFull`` (503 with ``Retry-After``) at once instead of waiting for
seconds. The limit holds from the first request on, whatever the batcher has seen so far; the
batcher's own ``latency_target_ms`` can be added for shedding that follows the cost as it changes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

from fastinfer._common.quantiles import quantile
from fastinfer.errors import ConfigError

__all__ = [
    "AdmissionLimits",
    "AdmissionReport",
    "batch_len",
    "fill_batch",
    "measure_admission",
    "warn_if_miscounted",
]

logger = logging.getLogger("fastinfer.integrations.fastapi")


class AdmissionLimits(TypedDict):
    """Keyword arguments for ``DynamicBatcher(..., **svc.admission(...))``."""

    max_concurrent_batches: int
    prefetch_batches: int
    max_queue_size: int


@dataclass(frozen=True)
class AdmissionReport:
    """What the measurement found (shown in ``/readyz`` under ``"admission"``)."""

    batch_size: int
    batch_seconds: float
    latency_target_ms: float
    max_concurrent_batches: int
    max_queue_size: int
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_admission(
    fn: Callable[[Any], Any],
    example_batch: Any,
    *,
    latency_target_ms: float,
    max_concurrent_batches: int = 1,
    batch_size: int | None = None,
    repeat: int = 3,
    batch_seconds: float | None = None,
) -> AdmissionReport:
    """Time ``fn(example_batch)`` (one untimed run, then the median of ``repeat``) and size the
    queue for the target.

    A request queued at position ``p`` finishes after the batch running now and
    ``ceil(p / (batch_size * max_concurrent_batches))`` more rounds, so the queue holds
    ``(rounds - 1) * batch_size * max_concurrent_batches`` requests, where ``rounds`` is how many
    batch times fit in 95% of the target (the batcher's own headroom). At least one full batch
    per slot is always admitted; a target below two batch times is logged as unreachable.
    Only ``fn``'s cost is counted: where a request's HTTP handling costs as much as its share
    of the batch (a tiny model), pass a lower target or set ``max_queue_size`` yourself.
    ``batch_seconds`` given (a batch's time with every slot busy, as :func:`measure_serving`
    found it): nothing is timed.
    """
    if isinstance(latency_target_ms, bool) or not (
        isinstance(latency_target_ms, int | float) and 0 < latency_target_ms < math.inf
    ):
        raise ConfigError(
            f"latency_target_ms must be a number of milliseconds > 0, got {latency_target_ms!r}"
        )
    if isinstance(max_concurrent_batches, bool) or not (
        isinstance(max_concurrent_batches, int) and max_concurrent_batches >= 1
    ):
        raise ConfigError(
            f"max_concurrent_batches must be an int >= 1, got {max_concurrent_batches!r}"
        )
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"repeat must be an int >= 1, got {repeat!r}")
    size = batch_size if batch_size is not None else batch_len(example_batch)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {size!r}")
    if batch_seconds is None:
        warn_if_miscounted(example_batch, size)
        fn(example_batch)  # first calls pay one-time costs (lazy kernel loads, allocator growth)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(example_batch)
            times.append(time.perf_counter() - t0)
        batch_seconds = max(quantile(sorted(times), 0.5), 1e-6)
    rounds = math.floor(latency_target_ms / 1000 * 0.95 / batch_seconds)
    per_round = size * max_concurrent_batches
    queue = max(per_round, (rounds - 1) * per_round)
    if rounds < 2:
        logger.warning(
            "latency_target_ms=%g is below two batch times (%.1f ms per batch of %d measured): "
            "admitted requests may miss it; raise the target or lower the batch size",
            latency_target_ms,
            batch_seconds * 1000,
            size,
        )
    return AdmissionReport(
        batch_size=size,
        batch_seconds=batch_seconds,
        latency_target_ms=float(latency_target_ms),
        max_concurrent_batches=max_concurrent_batches,
        max_queue_size=queue,
        rounds=rounds,
    )


def batch_len(batch: Any) -> int:
    if isinstance(batch, Mapping):  # e.g. tokenizer output: its len() counts keys, not items
        raise ConfigError("cannot tell the batch size of a mapping: pass batch_size=")
    if hasattr(batch, "shape") and len(batch.shape) > 0:
        return int(batch.shape[0])
    try:
        return len(batch)
    except TypeError:
        raise ConfigError(
            f"cannot tell the batch size of a {type(batch).__name__}: pass batch_size="
        ) from None


def warn_if_miscounted(example_batch: Any, batch_size: int) -> None:
    """Log when a timed example holds another number of items than the batch size it counts as
    (the measured cost per item, and so the queue sized from it, would be off by that ratio)."""
    try:
        n = batch_len(example_batch)
    except ConfigError:  # a mapping or an opaque batch: its items cannot be counted
        return
    if n != batch_size:
        logger.warning(
            "the example batch has %d item(s) but is counted as a batch of batch_size=%d: the "
            "cost per item and the queue sized from it are off by %.3gx; pass an example of "
            "batch_size items",
            n,
            batch_size,
            batch_size / n if n else float("inf"),
        )


def fill_batch(batch: Any, size: int) -> Any:
    """``batch`` with exactly ``size`` items: its items cycled to fill it, or its first ``size``.

    Works on a list, a tuple, a tensor or array (indexed along its first dimension) and a mapping
    of those that all hold the same number of items (tokenizer output). Raises
    :class:`~fastinfer.ConfigError` on anything else."""
    if isinstance(batch, Mapping):
        filled = {k: fill_batch(v, size) for k, v in batch.items()}
        try:  # a tokenizer's BatchEncoding stays one
            return type(batch)(filled)  # type: ignore[call-arg]
        except Exception:
            return filled
    n = batch_len(batch)
    if n < 1:
        raise ConfigError("cannot fill a batch of no items")
    if n == size:
        return batch
    index = [i % n for i in range(size)]
    if isinstance(batch, list | tuple):
        items = [batch[i] for i in index]
        return tuple(items) if type(batch) is tuple else items
    if hasattr(batch, "shape") and hasattr(batch, "__getitem__"):
        return batch[index]  # (size, ...): advanced indexing along the first dimension
    raise ConfigError(
        f"cannot resize a batch of type {type(batch).__name__} to {size} items; pass one of "
        f"exactly {size} items"
    )

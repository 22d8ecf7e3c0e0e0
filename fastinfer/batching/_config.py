"""BatcherConfig: the batcher's data options, frozen and validated in one place.

``DynamicBatcher(fn, max_batch_size=32, max_wait_ms=5)`` and
``DynamicBatcher(fn, config=BatcherConfig(max_batch_size=32, max_wait_ms=5))`` are the same batcher.
The config holds what is plain data (sizes, times, policies), so it can be written in a settings
file, printed, compared and round-tripped through a dict (``to_dict`` / ``from_dict``); the
callables (``cost_fn``, ``length_fn``, ``collate`` objects, ``clock``, callbacks) stay keyword
arguments of the batcher. ``configure()`` changes a running batcher through ``replace()``, so a
value is validated by the same code whichever way it arrives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastinfer.errors import ConfigError

__all__ = ["BatcherConfig"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _non_negative(name: str, value: Any, unit: str = "") -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value >= 0
        or math.isinf(value)
    ):
        raise ConfigError(f"{name} must be a number >= 0{unit} and finite, got {value!r}")
    return float(value)


def optional_positive(name: str, value: Any, unit: str = "") -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or math.isinf(value)
    ):
        raise ConfigError(f"{name} must be None or a number > 0{unit} and finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class BatcherConfig:
    """The options of a :class:`DynamicBatcher` that are plain data (see its docstring for each).

    Validated when built: a bad value raises :class:`~fastinfer.ConfigError` naming it.
    """

    max_batch_size: int
    max_wait_ms: float
    max_concurrent_batches: int = 1
    prefetch_batches: int = 0
    max_queue_size: int | None = None
    timeout: float | None = None
    batch_timeout: float | None = None
    policy: Literal["fixed", "adaptive"] = "fixed"
    latency_target_ms: float | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    pad_to_preferred: bool = False
    max_batch_cost: float | None = None
    bucket_window: int | None = None
    on_error: Literal["isolate", "fail_batch"] = "isolate"
    run_in_thread: bool = True
    own_loop: bool = False
    name: str = "DynamicBatcher"

    def __post_init__(self) -> None:
        _positive_int("max_batch_size", self.max_batch_size)
        _non_negative("max_wait_ms", self.max_wait_ms, " (milliseconds)")
        _positive_int("max_concurrent_batches", self.max_concurrent_batches)
        p = self.prefetch_batches
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ConfigError(
                f"prefetch_batches must be an int >= 0 (batches fn queues behind the ones it "
                f"runs, such as a PinnedPool's workers x prefetch), got {p!r}"
            )
        if self.max_queue_size is not None:
            _positive_int("max_queue_size", self.max_queue_size)
        optional_positive("timeout", self.timeout, " (seconds)")
        optional_positive("batch_timeout", self.batch_timeout, " (seconds)")
        if self.policy not in ("fixed", "adaptive"):
            raise ConfigError(f"policy must be 'fixed' or 'adaptive', got {self.policy!r}")
        optional_positive("latency_target_ms", self.latency_target_ms, " (milliseconds)")
        if self.preferred_batch_sizes is not None:
            given: Sequence[Any] = self.preferred_batch_sizes
            if isinstance(given, int | str):
                raise ConfigError(
                    f"preferred_batch_sizes must be a sequence of ints, got {given!r}"
                )
            sizes = tuple(sorted({_positive_int("preferred_batch_sizes[i]", s) for s in given}))
            if not sizes:
                raise ConfigError("preferred_batch_sizes must not be empty (or pass None)")
            if sizes[-1] > self.max_batch_size:
                raise ConfigError(
                    f"preferred_batch_sizes {list(sizes)} has sizes above max_batch_size="
                    f"{self.max_batch_size}; drop them or raise max_batch_size"
                )
            object.__setattr__(self, "preferred_batch_sizes", sizes)
        if self.pad_to_preferred and not self.preferred_batch_sizes:
            raise ConfigError("pad_to_preferred=True needs preferred_batch_sizes")
        optional_positive("max_batch_cost", self.max_batch_cost)
        if (
            self.bucket_window is not None
            and _positive_int("bucket_window", self.bucket_window) < 2
        ):
            raise ConfigError(f"bucket_window must be >= 2 items, got {self.bucket_window!r}")
        if self.on_error not in ("isolate", "fail_batch"):
            raise ConfigError(f"on_error must be 'isolate' or 'fail_batch', got {self.on_error!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")

    # -- convenience in seconds (what the batcher computes with) ------------------------------

    @property
    def max_wait_seconds(self) -> float:
        return float(self.max_wait_ms) / 1000.0

    @property
    def latency_target_seconds(self) -> float | None:
        t = self.latency_target_ms
        return None if t is None else float(t) / 1000.0

    # -- plain data -----------------------------------------------------------------------------

    def replace(self, **changes: Any) -> BatcherConfig:
        """A copy with ``changes`` applied, validated like a new config."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"BatcherConfig has no option(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["preferred_batch_sizes"] is not None:
            d["preferred_batch_sizes"] = list(d["preferred_batch_sizes"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatcherConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"BatcherConfig has no option(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        if values.get("preferred_batch_sizes") is not None:
            values["preferred_batch_sizes"] = tuple(values["preferred_batch_sizes"])
        return cls(**values)

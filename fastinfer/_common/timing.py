"""Interleaved timing of alternatives: round-robin trials, so drift hits every candidate alike.

On a shared, noisy machine the time of one call moves by tens of percent between seconds; timing
candidate A for a while and then candidate B measures the machine as much as the code. Here each
round runs every candidate once (a fixed number of calls each), and the caller compares medians.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["calls_per_sample", "interleaved_samples", "median"]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def calls_per_sample(
    fn: Callable[[], Any],
    *,
    target_seconds: float,
    limit: int = 1000,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """How many calls of ``fn`` fill about ``target_seconds`` (one timed call decides)."""
    t0 = clock()
    fn()
    one = max(clock() - t0, 1e-6)
    return max(1, min(limit, int(target_seconds / one)))


def interleaved_samples(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    number: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
    around: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
    names: list[str] | None = None,
    into: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample per round, rounds interleaved round-robin.

    ``around(name)`` is entered before and left after each sample outside the timed region (to
    install and remove a candidate); ``sync()`` runs before each clock read (a device sync);
    ``names`` limits the rounds to some of ``fns``; ``into`` adds to existing samples.
    """
    samples = into if into is not None else {k: [] for k in fns}
    order = list(fns) if names is None else names
    for _ in range(rounds):
        for name in order:
            fn = fns[name]
            with around(name) if around is not None else contextlib.nullcontext():
                if sync is not None:
                    sync()
                t0 = clock()
                for _ in range(number):
                    fn()
                if sync is not None:
                    sync()
                samples.setdefault(name, []).append((clock() - t0) / number)
    return samples

"""Interleaved timing of alternatives: round-robin trials, so drift hits every candidate alike.

On a shared, noisy machine the time of one call moves by tens of percent between seconds; timing
candidate A for a while and then candidate B measures the machine as much as the code. Here each
round runs every candidate once (a fixed number of calls each), and the caller compares medians.

:func:`race` adds a time budget and early elimination on top: a round starts only if its expected
cost (each candidate's last sample) still fits before the deadline, and after every round a
candidate whose *fastest* sample is slower than the best candidate's median by more than noise
explains (``1 + ELIMINATE_MARGIN / sqrt(samples)``: 1.5x after one sample, 1.25x after four) is
dropped, so clearly slower paths stop costing time after one round.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ELIMINATE_MARGIN",
    "Race",
    "calls_per_sample",
    "elimination_threshold",
    "interleaved_samples",
    "median",
    "race",
]

#: How much slower than the best a candidate's fastest sample must be to be dropped after one
#: sample; the margin shrinks with the square root of the number of samples.
ELIMINATE_MARGIN = 0.5


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


def elimination_threshold(samples: int) -> float:
    """The ratio to the best median beyond which a candidate with ``samples`` samples is dropped."""
    return 1.0 + ELIMINATE_MARGIN / math.sqrt(max(1, samples))


@dataclass
class Race:
    """What :func:`race` measured: samples per candidate (seconds per call), the candidates it
    dropped early and why, how many rounds ran, and why it stopped early ("" when it ran them all)."""

    samples: dict[str, list[float]]
    dropped: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    stopped: str = ""


def race(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
    deadline: float | None = None,
    estimate: Mapping[str, float] | None = None,
    number: int = 1,
    sync: Callable[[], None] | None = None,
    around: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
    eliminate: bool = True,
) -> Race:
    """Interleaved rounds of ``fns`` within a deadline, dropping clearly slower candidates.

    ``deadline`` is a ``clock()`` value: a round starts only when ``clock() + cost <= deadline``,
    where ``cost`` sums each remaining candidate's last sample (or ``estimate[name]`` before its
    first), times ``number``. Rounds stop when ``rounds`` ran, when one candidate is left (after at
    least one round), or when the next round would not fit (``stopped="budget"``).
    """
    result = Race({k: [] for k in fns})
    alive = list(fns)
    est = dict(estimate or {})
    for r in range(rounds):
        if r and len(alive) <= 1:
            result.stopped = "one candidate left"
            break
        cost = number * sum(
            result.samples[n][-1] if result.samples[n] else est.get(n, 0.0) for n in alive
        )
        if deadline is not None and clock() + cost > deadline:
            result.stopped = "budget"
            break
        interleaved_samples(
            fns,
            rounds=1,
            number=number,
            clock=clock,
            sync=sync,
            around=around,
            names=alive,
            into=result.samples,
        )
        result.rounds += 1
        if not eliminate or len(alive) < 2:
            continue
        best = min(alive, key=lambda n: median(result.samples[n]))
        bar = median(result.samples[best])
        for n in list(alive):
            ts = result.samples[n]
            limit = elimination_threshold(len(ts))
            if n != best and bar > 0 and min(ts) > bar * limit:
                alive.remove(n)
                result.dropped[n] = (
                    f"dropped after {len(ts)} sample(s): {min(ts) / bar:.2f}x slower than "
                    f"{best} at best (more than the {limit:.2f}x noise allows)"
                )
    return result

"""Online models behind the adaptive policy: batch cost ``t ≈ a·n + b`` and the arrival rate."""

from __future__ import annotations

import math

__all__ = ["FORGET", "OUTLIER", "ArrivalRate", "CostModel", "wait_threshold"]

#: An observation more than this factor above the prediction is capped at it, unless three come
#: in a row (the model really got slower); one more than this factor below it says the history is
#: stale (a cold first call, a machine that was loaded) and the history is mostly forgotten.
OUTLIER = 4.0
FORGET = 0.1  # weight left to the history when it is found stale


class CostModel:
    """Exponentially weighted least squares fit of batch time against batch size.

    ``decay`` < 1 forgets old batches so the fit follows a model that warms up or a machine whose
    load changes. With a single distinct size seen so far, the slope is 0 and ``b`` is the mean.

    The fit recovers from outliers (:data:`OUTLIER`): one slow batch (a cold first call, a GC
    pause, a recompile) moves it a bounded step, and the first batch that runs at normal speed
    after an inflated estimate brings it down at once, so an estimate can never hold the batcher
    in shedding everything (the batcher also lets a probe request through; see ``_forming``).
    """

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self._w = self._sn = self._snn = self._st = self._snt = 0.0
        self.observations = 0
        self.a = 0.0
        self.b = 0.0
        self.error = 0.0  # EWMA of |observed - predicted|, for safety margins
        self._high = 0  # consecutive observations above OUTLIER x the prediction

    @property
    def ready(self) -> bool:
        return self.observations > 0

    def observe(self, n: int, seconds: float) -> None:
        d = self.decay
        predicted = self.predict(n) if self.observations else 0.0
        if predicted > 0 and seconds > OUTLIER * predicted:
            self._high += 1
            if self._high < 3:
                seconds = OUTLIER * predicted  # capped: one slow batch moves the fit a step
            else:
                d = FORGET  # slower three times in a row: the model did get slower
        else:
            self._high = 0
        if predicted > 0 and seconds * OUTLIER < predicted:
            d = FORGET  # far faster than predicted: the history over-estimates, forget it
            self.error *= FORGET
        elif self.observations:
            self.error += 0.1 * (abs(seconds - predicted) - self.error)
        self._w = self._w * d + 1.0
        self._sn = self._sn * d + n
        self._snn = self._snn * d + n * n
        self._st = self._st * d + seconds
        self._snt = self._snt * d + n * seconds
        self.observations += 1
        det = self._w * self._snn - self._sn * self._sn
        mean_t = self._st / self._w
        if det <= 1e-9 * max(1.0, self._w * self._snn):
            self.a, self.b = 0.0, mean_t
            return
        a = (self._w * self._snt - self._sn * self._st) / det
        b = (self._st - a * self._sn) / self._w
        if a < 0:  # noise: cost never falls with size
            a, b = 0.0, mean_t
        elif b < 0:
            a, b = self._snt / self._snn, 0.0
        self.a, self.b = a, b

    def predict(self, n: int) -> float:
        return self.a * n + self.b

    def upper(self, n: int) -> float:
        """A pessimistic estimate (prediction plus twice the typical miss), for deadlines."""
        return self.predict(n) + 2.0 * self.error


class ArrivalRate:
    """Arrival rate (requests/s) from an EWMA of inter-arrival gaps.

    A long silence lowers the estimate at once: the gap used is at least the time since the last
    arrival, so an idle batcher never waits for arrivals that stopped coming.
    """

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self._gap: float | None = None
        self._last: float | None = None

    def observe(self, now: float) -> None:
        if self._last is not None:
            gap = max(now - self._last, 0.0)
            self._gap = gap if self._gap is None else self._gap + self.alpha * (gap - self._gap)
        self._last = now

    def overdue_at(self) -> float | None:
        """When the next arrival is clearly late (two mean gaps after the last one)."""
        if self._gap is None or self._last is None:
            return None
        return self._last + 2.0 * self._gap

    def rate(self, now: float) -> float:
        if self._gap is None or self._last is None:
            return 0.0
        gap = max(self._gap, now - self._last)
        return math.inf if gap <= 0 else 1.0 / gap


def wait_threshold(rate: float, a: float, b: float) -> float:
    """Queue length below which waiting for more items lowers the mean latency.

    Compare dispatching ``n`` queued items now with waiting ``Δ`` for ``k = λΔ`` more: now, the
    newcomers run in a second batch after this one; waiting, everyone shares one batch. The total
    latency difference is ``Δ·(n + λΔ + a·n·λ − λ·b)``, negative (waiting helps) only while
    ``n < λ·b / (1 + a·λ)``: the fixed cost ``b`` is worth sharing only when items arrive faster
    than the batch grows its own cost.
    """
    if rate <= 0 or b <= 0:
        return 0.0
    if math.isinf(rate):
        return math.inf
    return rate * b / (1.0 + a * rate)

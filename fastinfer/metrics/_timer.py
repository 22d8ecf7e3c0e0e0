"""Timer: times a block or a function into a histogram, optionally synchronising CUDA."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from fastinfer.errors import ConfigError

if TYPE_CHECKING:
    from fastinfer.metrics._series import _HistogramSeries

__all__ = ["Timer"]

_F = TypeVar("_F", bound=Callable[..., Any])


class Timer:
    """Times a block or every call of a function and observes the seconds into a histogram.

    ``cuda_sync=True`` synchronizes the CUDA device before both clock reads, so queued kernels are
    counted; ``cuda_sync="events"`` records CUDA events around the block instead and waits only for
    the end event (device time on the current stream). Both are no-ops without CUDA.

        with rec.timer("app_step_seconds"):
            model(x)

        @rec.timer("app_handler_seconds")
        def handler(x): ...
    """

    __slots__ = ("_cuda", "_series", "_starts", "elapsed")

    def __init__(
        self, series: _HistogramSeries, *, cuda_sync: bool | Literal["events"] = False
    ) -> None:
        if cuda_sync not in (False, True, "events"):
            raise ConfigError(f"cuda_sync must be False, True or 'events', got {cuda_sync!r}")
        self._series = series
        self._cuda: str | None = None
        if cuda_sync:
            import torch

            if torch.cuda.is_available():
                self._cuda = "events" if cuda_sync == "events" else "sync"
        self._starts: dict[int, list[Any]] = {}
        #: seconds measured by the last completed block or call
        self.elapsed: float | None = None

    def _start(self) -> Any:
        if self._cuda is None:
            return time.perf_counter()
        import torch

        if self._cuda == "sync":
            torch.cuda.synchronize()
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def _stop(self, start: Any) -> float:
        if self._cuda is None:
            elapsed = time.perf_counter() - start
        elif self._cuda == "sync":
            import torch

            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        else:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1000.0  # ms -> s
        self.elapsed = elapsed
        self._series.observe(elapsed)
        return elapsed

    def __enter__(self) -> Timer:
        self._starts.setdefault(threading.get_ident(), []).append(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        ident = threading.get_ident()
        stack = self._starts[ident]
        start = stack.pop()
        if not stack:
            del self._starts[ident]
        self._stop(start)

    def __call__(self, fn: _F) -> _F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                start = self._start()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self._stop(start)

            return cast("_F", awrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self._start()
            try:
                return fn(*args, **kwargs)
            finally:
                self._stop(start)

        return cast("_F", wrapper)

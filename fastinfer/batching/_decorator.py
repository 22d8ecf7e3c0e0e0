"""``@fastinfer.batch``: a function on lists becomes ``await f(item)`` through a DynamicBatcher."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fastinfer.batching._batcher import DynamicBatcher

__all__ = ["BatchedFunction", "batch"]

T = TypeVar("T")
R = TypeVar("R")


class BatchedFunction(Generic[T, R]):
    """What :func:`batch` returns: ``await f(item)`` submits one item to a :class:`DynamicBatcher`.

    ``f.batcher`` is the batcher (statistics, configure, close); ``f.submit_sync(item)`` blocks.
    On a method, each instance gets its own batcher.
    """

    def __init__(self, fn: Callable[[list[T]], Any], options: dict[str, Any]) -> None:
        self.__wrapped__ = fn
        self._options = options
        self.batcher: DynamicBatcher[T, R] = DynamicBatcher(fn, **options)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]
        self._attr = f"_fastinfer_batched_{getattr(fn, '__name__', 'fn')}"

    async def __call__(self, item: T, *, timeout: float | None = None, priority: int = 0) -> R:
        return await self.batcher.submit(item, timeout=timeout, priority=priority)

    def submit_sync(self, item: T, *, timeout: float | None = None, priority: int = 0) -> R:
        return self.batcher.submit_sync(item, timeout=timeout, priority=priority)

    def __get__(self, instance: Any, owner: type | None = None) -> BatchedFunction[T, R]:
        if instance is None:
            return self
        bound = instance.__dict__.get(self._attr)
        if bound is None:
            bound = BatchedFunction(
                functools.partial(self.__wrapped__, instance),  # type: ignore[arg-type]
                self._options,
            )
            instance.__dict__[self._attr] = bound
        return bound


def batch(
    fn: Callable[[list[Any]], Any] | None = None,
    /,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    **options: Any,
) -> Any:
    """Decorator: turn ``def f(items: list) -> list`` (sync or async) into ``await f(item)``.

    ::

        @fastinfer.batch(max_batch_size=32, max_wait_ms=5)
        def classify(texts: list[str]) -> list[int]: ...

        label = await classify("hello")      # e.g. inside a FastAPI endpoint

    Every :class:`DynamicBatcher` option is accepted.
    """
    opts = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, **options}

    def wrap(f: Callable[[list[Any]], Any]) -> BatchedFunction[Any, Any]:
        return BatchedFunction(f, opts)

    return wrap if fn is None else wrap(fn)

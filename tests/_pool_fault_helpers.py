"""Worker-side functions for tests/test_faults_pool.py (importable by the pool's worker processes).

Kept apart from the test module so a worker does not import pytest and the tests.
"""

from __future__ import annotations

import os
import sys
from typing import Any


class NeedsTwo(Exception):
    """Pickles in the worker, but unpickling calls ``NeedsTwo('a/b')``: a TypeError."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


class Stop(BaseException):
    """A BaseException that is not an Exception, like SystemExit or KeyboardInterrupt."""


def _explode() -> None:
    raise RuntimeError("this object cannot be rebuilt outside its worker")


class OnlyHere:
    """A result that pickles in the worker and fails to unpickle anywhere else."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def init() -> dict[str, int]:
    return {"calls": 0}


def serve(state: dict[str, int], item: Any) -> Any:
    state["calls"] += 1
    kind = item[0] if isinstance(item, tuple) else item
    if kind == "sys.exit":
        sys.exit(item[1])
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "Stop":
        raise Stop("stop here")
    if kind == "NeedsTwo":
        raise NeedsTwo("a", "b")
    if kind == "OnlyHere":
        return OnlyHere()
    if kind == "who":
        return os.getpid(), state["calls"]
    return item

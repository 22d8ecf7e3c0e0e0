"""Worker-side functions for tests/test_faults_pool.py (importable by the pool's worker processes).

Kept apart from the test module so a worker does not import pytest and the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


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
    if kind == "scale-in-place":  # (kind, x[, marker]): fn changes its input, then crashes once
        x = item[1]
        x.mul_(2)
        if len(item) > 2 and not Path(item[2]).exists():
            Path(item[2]).write_text("crashed")
            os._exit(9)
        return x
    if kind == "table":  # a tensor the worker keeps, returned as is
        return state.setdefault("table", torch.arange(1 << 17, dtype=torch.float32))
    if kind in ("fork-then-die", "fork-then-hang"):  # (kind, pidfile, how)
        start_child_holding_the_socket(Path(item[1]), item[2])
        if kind == "fork-then-die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    return item


def start_child_holding_the_socket(pidfile: Path, how: str) -> None:
    """Start a long-lived child that inherits this worker's socket; write its pid to ``pidfile``."""
    if how == "fork":
        pid = os.fork()
        if pid == 0:  # the child: lives until killed
            try:
                time.sleep(3600)
            finally:
                os._exit(0)
    else:  # a subprocess that inherits the descriptors
        pid = subprocess.Popen(["sleep", "3600"], close_fds=False).pid
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(str(pid))
    tmp.rename(pidfile)  # whole or absent


# ---------------------------------------------------------------- replacements (after a crash)


def _first_start(marker: str) -> bool:
    """True in the first worker to start (it writes ``marker``); False in every later one."""
    try:
        with open(marker, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return False
    return True


def init_slow_replacement(marker: str, pidfile: str) -> dict[str, int]:
    """The first worker starts at once; a replacement starts a child (in its process group),
    writes both pids to ``pidfile`` and sleeps in init far past any test's patience."""
    if not _first_start(marker):
        child = subprocess.Popen(["sleep", "3600"])
        tmp = Path(pidfile).with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()} {child.pid}")
        tmp.rename(pidfile)  # whole or absent
        time.sleep(3600)
    return init()


def init_fails_in_replacements(marker: str) -> dict[str, int]:
    """The first worker starts; every replacement's init raises."""
    if not _first_start(marker):
        raise RuntimeError(f"model.bin vanished (replacement pid {os.getpid()})")
    return init()


def crash(state: dict[str, int], item: Any) -> Any:
    """``fn`` that kills its worker on "die" and serves everything else."""
    if item == "die":
        os._exit(3)
    return serve(state, item)

"""configure_threads: torch's thread pools and the OMP/MKL variables, set together."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from fastinfer.errors import ConfigError
from fastinfer.pool._plan import CorePlan

__all__ = ["THREAD_VARS", "ThreadSettings", "configure_threads"]


# --------------------------------------------------------------------------------------------
# Single-process thread configuration
# --------------------------------------------------------------------------------------------

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`configure_threads` set."""

    threads: int
    interop: int
    env: Mapping[str, str]


def configure_threads(threads: int | None = None, *, interop: int | None = None) -> ThreadSettings:
    """Set torch's intra-op threads, OMP/MKL/OpenBLAS variables and (optionally) inter-op threads.

    ``threads`` defaults to the physical cores this process may use, capped by the cgroup quota
    (:attr:`CorePlan.core_budget`), which is what torch gets wrong in containers and with SMT.

    Ordering caveat: torch sizes its pools when it is imported and OpenMP reads OMP_NUM_THREADS
    once, so for the *environment variables* to matter to this process set them (or call this)
    before ``import torch``; ``torch.set_num_threads`` still takes effect afterwards, and the
    variables reach child processes. Inter-op threads can be set only once per process, before
    any inter-op work: a later attempt raises :class:`ConfigError`.

        >>> configure_threads(4, interop=1)   # at the top of the service
    """
    import torch

    if threads is None:
        threads = CorePlan.detect().core_budget
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    if interop is not None and (
        not isinstance(interop, int) or isinstance(interop, bool) or interop < 1
    ):
        raise ConfigError(f"interop must be an int >= 1 or None, got {interop!r}")
    if interop is not None and torch.get_num_interop_threads() != interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot set inter-op threads to {interop} (now {torch.get_num_interop_threads()}): "
                "torch allows it only once per process, before any inter-op work has started. "
                "Call configure_threads(interop=...) at the very start of the program, or leave "
                f"interop=None. ({exc})"
            ) from exc
    env = {name: str(threads) for name in THREAD_VARS}
    os.environ.update(env)
    torch.set_num_threads(threads)
    return ThreadSettings(threads, torch.get_num_interop_threads(), env)

"""The environment a compiled artifact depends on (defined in :mod:`fastinfer._common.manifest`,
shared with the attention decisions), and the compile-cache counters.

Kept as the compiling package's import point: ``fastinfer.compiling.environment_manifest`` and
``manifest_diff`` are public names.
"""

from __future__ import annotations

from fastinfer import _torch_compat
from fastinfer._common.manifest import (
    FORMAT,
    compiler_path,
    environment_manifest,
    manifest_diff,
    mismatch_message,
)

__all__ = [
    "FORMAT",
    "cache_counters",
    "compiler_path",
    "environment_manifest",
    "manifest_diff",
    "mismatch_message",
]


def cache_counters() -> tuple[int, int, int, int, int]:
    """FX-graph hits/misses/bypasses and AOTAutograd hits/misses counted in this process so far."""
    return _torch_compat.compile_cache_counts()

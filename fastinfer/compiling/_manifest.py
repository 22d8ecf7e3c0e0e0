"""The environment a compiled artifact depends on (defined in :mod:`fastinfer._common.manifest`,
shared with the attention decisions), and the compile-cache counters.

Kept as the compiling package's import point: ``fastinfer.compiling.environment_manifest`` and
``manifest_diff`` are public names.
"""

from __future__ import annotations

import json
from typing import Any

from fastinfer import _torch_compat
from fastinfer._common.manifest import (
    FORMAT,
    compiler_path,
    environment_manifest,
    manifest_diff,
    mismatch_message,
)

__all__ = [
    "FIELDS",
    "FORMAT",
    "cache_counters",
    "compiler_path",
    "environment_manifest",
    "manifest_diff",
    "manifest_problem",
    "mismatch_message",
]

# Every field of a format-1 compile-cache manifest (environment_manifest() with the compiler
# scope returns exactly these; a test checks).
FIELDS = (
    "format",
    "torch",
    "python",
    "machine",
    "cpu_capability",
    "threads",
    "compiler",
    "gpu",
    "cuda",
    "triton",
    "inductor",
    "tag",
)


def manifest_problem(text: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` for a well-formed manifest, else ``(None, what is wrong with it)``.

    A manifest is written atomically, so an empty, cut-short, ``null`` or wrongly shaped one was
    damaged from outside (a full disk, a copy cut short, a hand edit): the cache is corrupt.
    """
    if not text.strip():
        return None, "is empty"
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return None, f"is not valid JSON, probably cut short ({type(exc).__name__}: {exc})"
    if not isinstance(doc, dict):
        kind = "null" if doc is None else f"a JSON {type(doc).__name__}"
        return None, f"holds {kind}, not an object"
    fmt = doc.get("format")
    if type(fmt) is not int:
        return None, f"has no integer 'format' field (got {fmt!r})"
    if fmt == FORMAT:
        missing = [k for k in FIELDS if k not in doc]
        if missing:
            return None, f"lacks the field(s) {', '.join(missing)}"
        if not isinstance(doc["inductor"], dict):
            return None, f"has an 'inductor' field that is not an object ({doc['inductor']!r})"
    return doc, None


def cache_counters() -> tuple[int, int, int, int, int]:
    """FX-graph hits/misses/bypasses and AOTAutograd hits/misses counted in this process so far."""
    return _torch_compat.compile_cache_counts()

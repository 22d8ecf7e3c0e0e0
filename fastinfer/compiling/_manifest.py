"""The environment a compiled artifact depends on, and how two environments differ.

A compile cache, an AOTInductor package or a backend decision is only valid where everything in
:func:`environment_manifest` matches: torch, exact Python, CPU ISA, threads, C++ compiler,
GPU/CUDA/Triton and the inductor settings that change generated code. A CPU cache reused on a
machine with another vector ISA is a silent cache hit with wrong outputs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fastinfer import _env, _torch_compat

__all__ = [
    "FIELDS",
    "cache_counters",
    "compiler_path",
    "environment_manifest",
    "manifest_diff",
    "manifest_problem",
    "mismatch_message",
]

FORMAT = 1
# Every field of a format-1 manifest (environment_manifest returns exactly these; a test checks).
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

# Inductor settings that change generated code (and so must match between build and use).
_INDUCTOR_SETTINGS = (
    "freezing",
    "max_autotune",
    "max_autotune_gemm",
    "cpp_wrapper",
    "fallback_random",
    "cpp.simdlen",
    "cpp.vec_isa_ok",
    "cpp.enable_kernel_profile",
)


def compiler_path() -> str | None:
    """The C++ compiler inductor would use (``CXX`` or g++/c++/clang++ on PATH), or None."""
    for name in (_env.get("CXX"), "g++", "c++", "clang++"):
        if name and (found := shutil.which(name)):
            return found
    return None


@functools.lru_cache(maxsize=8)
def _compiler_version(path: str) -> str:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{path} (unusable)"
    return out.splitlines()[0].strip() if out else path


def _cpu_capability() -> str:
    # ATEN_CPU_CAPABILITY overrides what ATen and inductor vectorise for, so it is what counts.
    override = (_env.get("ATEN_CPU_CAPABILITY") or "").strip().lower()
    return override or str(torch.backends.cpu.get_cpu_capability()).lower()


def _inductor_settings() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _INDUCTOR_SETTINGS:
        obj: Any = _torch_compat.inductor_config()
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        out[name] = obj if isinstance(obj, (bool, int, float, str, type(None))) else repr(obj)
    return out


def environment_manifest(*, tag: str | None = None) -> dict[str, Any]:
    """What a compile cache depends on: a compiled artifact is only valid where all of it matches."""
    cxx = compiler_path()
    gpu: dict[str, Any] = {"gpu": None, "cuda": torch.version.cuda, "triton": None}
    if torch.cuda.is_available():
        gpu["gpu"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            gpu["triton"] = version("triton")
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "python": platform.python_version() + f" ({sys.implementation.name})",
        "machine": platform.machine(),
        "cpu_capability": _cpu_capability(),
        "threads": torch.get_num_threads(),
        "compiler": _compiler_version(cxx) if cxx else None,
        **gpu,
        "inductor": _inductor_settings(),
        "tag": tag,
    }


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


def manifest_diff(built: Mapping[str, Any], here: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields that differ: ``{field: (built_for, here)}``."""
    keys = sorted(set(built) | set(here))
    return {k: (built.get(k), here.get(k)) for k in keys if built.get(k) != here.get(k)}


def mismatch_message(what: str, diff: Mapping[str, tuple[Any, Any]]) -> str:
    lines = "; ".join(f"{k}: built for {a!r}, here {b!r}" for k, a, b in _flat(diff))
    return (
        f"{what} was built for another environment and would give wrong results or miss: {lines}. "
        "Fix: rebuild it here (fastinfer warm, or compile with a new cache path), use a cache built "
        "on a matching machine, or pass on_mismatch='replace' to wipe it and rebuild"
    )


def _flat(diff: Mapping[str, tuple[Any, Any]]) -> Iterator[tuple[str, Any, Any]]:
    for key, (a, b) in diff.items():
        if isinstance(a, dict) and isinstance(b, dict):
            for sub, (x, y) in manifest_diff(a, b).items():
                yield f"{key}.{sub}", x, y
        else:
            yield key, a, b


def cache_counters() -> tuple[int, int, int, int, int]:
    """FX-graph hits/misses/bypasses and AOTAutograd hits/misses counted in this process so far."""
    return _torch_compat.compile_cache_counts()

"""The environment a compiled artifact or a measured decision depends on, and how two differ.

A compile cache, an AOTInductor package, an exported ONNX/OpenVINO model or a measured decision
(which backend, which attention path) is only valid where everything in
:func:`environment_manifest` matches: torch, exact Python, CPU ISA, threads, C++ compiler,
GPU/CUDA/Triton and the inductor settings that change generated code. A CPU cache reused on a
machine with another vector ISA is a silent cache hit with wrong outputs; a decision timed with 2
threads is not the right one with 16.

Shared by :mod:`fastinfer.compiling` (caches, packages, backend decisions) and
:mod:`fastinfer.attention` (attention-path decisions). ``compiler=False`` leaves out what only
compiled code depends on (the C++ compiler and inductor settings): reading the inductor settings
imports ``torch._inductor`` (about a second), which an eager-only decision does not need.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fastinfer import _env, _torch_compat

__all__ = [
    "FORMAT",
    "compiler_path",
    "compiler_version",
    "environment_manifest",
    "manifest_diff",
    "mismatch_message",
]

FORMAT = 1

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
def compiler_version(path: str) -> str:
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


def environment_manifest(*, tag: str | None = None, compiler: bool = True) -> dict[str, Any]:
    """What a compiled artifact (or a measured decision) depends on; valid only where all matches.

    ``compiler=False``: without the C++ compiler and the inductor settings (for decisions about
    eager code, which neither changes); such a manifest says ``"scope": "eager"``.
    """
    gpu: dict[str, Any] = {"gpu": None, "cuda": torch.version.cuda, "triton": None}
    if torch.cuda.is_available():
        gpu["gpu"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            gpu["triton"] = version("triton")
    doc: dict[str, Any] = {
        "format": FORMAT,
        "torch": torch.__version__,
        "python": platform.python_version() + f" ({sys.implementation.name})",
        "machine": platform.machine(),
        "cpu_capability": _cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if compiler:
        cxx = compiler_path()
        doc["compiler"] = compiler_version(cxx) if cxx else None
    doc.update(gpu)
    if compiler:
        doc["inductor"] = _inductor_settings()
    else:
        doc["scope"] = "eager"
    doc["tag"] = tag
    return doc


def manifest_diff(built: Mapping[str, Any], here: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields that differ: ``{field: (built_for, here)}``."""
    keys = sorted(set(built) | set(here))
    return {k: (built.get(k), here.get(k)) for k in keys if built.get(k) != here.get(k)}


def mismatch_message(what: str, diff: Mapping[str, tuple[Any, Any]]) -> str:
    lines = "; ".join(f"{k}: built for {a!r}, here {b!r}" for k, a, b in flat_diff(diff))
    return (
        f"{what} was built for another environment and would give wrong results or miss: {lines}. "
        "Fix: rebuild it here (fastinfer warm, or compile with a new cache path), use a cache built "
        "on a matching machine, or pass on_mismatch='replace' to wipe it and rebuild"
    )


def flat_diff(diff: Mapping[str, tuple[Any, Any]]) -> Iterator[tuple[str, Any, Any]]:
    """``(dotted field, built_for, here)`` for every differing leaf field."""
    for key, (a, b) in diff.items():
        if isinstance(a, dict) and isinstance(b, dict):
            for sub, (x, y) in manifest_diff(a, b).items():
                yield f"{key}.{sub}", x, y
        else:
            yield key, a, b

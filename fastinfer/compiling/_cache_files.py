"""What is on disk in an :class:`~fastinfer.InductorCache` folder, and repairing it (private).

- :func:`build_overlay`: a read-only cache folder (a prebuilt cache baked into an image) cannot be
  handed to inductor as is, because inductor takes lock files inside it even for a pure cache hit.
  The overlay is a scratch folder that mirrors it: real folders, a symbolic link per cached file, and
  empty ``locks`` folders. Hits read the prebuilt files through the links; anything compiled anew
  goes to the scratch folder (and is dropped when the ``with`` block ends).
- :func:`call_repairing`: a cached module that is corrupt (a ``.py`` cut short, a ``.so`` overwritten)
  fails every compile that hits it, on every restart. When a compile fails on a file that was in the
  cache before the call, that file is removed (inductor writes it again from its cache entry or
  compiles it afresh) and the call is made again; at most :data:`MAX_REPAIRS` times per call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastinfer import _torch_compat
from fastinfer.errors import CacheLockTimeout, CompileError, ConfigError

if TYPE_CHECKING:
    from fastinfer.compiling._cache import InductorCache

__all__ = [
    "MANIFEST",
    "MAX_REPAIRS",
    "build_overlay",
    "call_repairing",
    "causes",
    "compiler_failure",
    "disk_full",
    "flock",
    "wipe",
    "writable",
]

logger = logging.getLogger("fastinfer.compiling")

MAX_REPAIRS = 8
T = TypeVar("T")

MANIFEST = "fastinfer-cache.json"
LOCK_FILE = ".fastinfer.lock"
COMPILE_LOCK_FILE = ".compile.lock"

# Subfolders of a cache folder that hold compiled artifacts (removed by clear / replace).
ARTIFACTS = ("inductor", "triton")


@contextlib.contextmanager
def flock(path: Path, *, timeout: float | None, what: str) -> Iterator[float]:
    """An exclusive ``flock`` on ``path``; yields how long it waited.

    Raises :class:`ConfigError` naming the lock file when it cannot be opened (it is a folder,
    the disk is full).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # another user's lock file: flock works on a read-only descriptor
            fd = os.open(path, os.O_RDONLY)
    except IsADirectoryError:
        raise ConfigError(
            f"cannot lock {what}: the lock file {path} is a folder, not a file. Fix: remove it "
            f"(rm -r {str(path)!r}); fastinfer creates the file again"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot lock {what}: the lock file {path} cannot be created ({exc.strerror or exc}). "
            "Fix: free space on that filesystem or make the folder writable, or pass another path"
        ) from None
    t0 = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - t0
                if timeout is not None and waited >= timeout:
                    raise CacheLockTimeout(
                        f"waited {waited:.1f}s for another process to finish with {what} "
                        f"(lock file {path}); raise the timeout or check for a stuck process"
                    ) from None
                time.sleep(0.05)
        yield time.monotonic() - t0
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def writable(path: Path) -> bool:
    """Whether this process may create files in ``path`` (False on a read-only mount, too)."""
    return os.access(path, os.W_OK | os.X_OK)


def wipe(path: Path, extra_files: tuple[str, ...] = ()) -> None:
    """Remove the compiled artifacts under ``path`` (not the manifest, not the lock files)."""
    for name in ARTIFACTS:
        shutil.rmtree(path / name, ignore_errors=True)
    for name in extra_files:
        try:
            (path / name).unlink()
        except FileNotFoundError:
            pass


def build_overlay(source: Path, overlay: Path) -> int:
    """Mirror ``source``'s artifact folders into ``overlay`` with one symlink per file; returns
    the number of files linked. ``locks`` folders are created empty: inductor locks there."""
    linked = 0
    for name in ARTIFACTS:
        top = source / name
        (overlay / name).mkdir(parents=True, exist_ok=True)
        if not top.is_dir():
            continue
        for root, _dirs, files in os.walk(top):
            rel = os.path.relpath(root, source)
            target = overlay / rel
            target.mkdir(parents=True, exist_ok=True)
            if os.path.basename(root) == "locks":
                continue
            for f in files:
                os.symlink(os.path.join(root, f), target / f)
                linked += 1
    return linked


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception in its ``__cause__`` / ``__context__`` chain, once each."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = getattr(e, "inner_exception", None)  # inductor's InductorError wraps one
        todo += [e.__cause__, e.__context__, inner if isinstance(inner, BaseException) else None]


_MODULE = re.compile(r"module '([\w.]+)' has no attribute")
_FULL = ("no space left on device", "disk quota exceeded")


def compiler_failure(exc: BaseException) -> tuple[str, str] | None:
    """``(command, output)`` of the C++ compile error in ``exc``'s chain (inductor's
    ``CppCompileError``: "C++ compile error / Command: ... / Output: ..."), else None."""
    found = [e for e in causes(exc) if type(e).__name__ == "CppCompileError"]
    found += [e for e in causes(exc) if "C++ compile error" in str(e)]
    if not found:
        return None
    cmd, output = getattr(found[0], "cmd", None), getattr(found[0], "output", None)
    if isinstance(cmd, list) and isinstance(output, str):
        return " ".join(map(str, cmd)), output.strip()
    text = str(found[0])
    command = re.search(r"Command:\n(.*?)(?:\n|$)", text)
    _, sep, output = text.partition("\nOutput:\n")
    output = output.split("\n\nSet TORCHDYNAMO_VERBOSE")[0].strip() if sep else ""
    return (command.group(1).strip() if command else ""), output


def disk_full(exc: BaseException) -> str | None:
    """The folder a compile could not write because its disk is full ("" when no folder is
    named), or None when ``exc`` is not about a full disk."""
    full = False
    for e in causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            if e.filename:
                return os.path.dirname(os.fsdecode(e.filename))
            full = True
        elif any(m in str(e).lower() for m in _FULL):
            full = True
    if not full:
        return None
    failure = compiler_failure(exc)
    out = re.search(r"\s-o\s+(\S+)", f" {failure[0]}") if failure else None
    if out:
        return os.path.dirname(out.group(1))
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")


def _under(name: str, roots: list[str]) -> bool:
    name = os.path.abspath(name)
    return any(name.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _module_files(e: BaseException, roots: list[str]) -> list[str]:
    """Cached files behind the modules an error names: "module 'torch._inductor...ckey' has no
    attribute 'call'" is a generated ``.py`` cut short but still valid Python."""
    files: list[str] = []
    obj = getattr(e, "obj", None) if isinstance(e, AttributeError) else None
    if isinstance(getattr(obj, "__file__", None), str):
        files.append(obj.__file__)  # type: ignore[union-attr]
    for name in _MODULE.findall(str(e)):
        path = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(path, str):
            files.append(path)
        key = name.rsplit(".", 1)[-1]  # inductor keeps <key>.py in <cache>/<key[1:3]>/
        for root in roots:
            files += glob.glob(os.path.join(glob.escape(root), "*", glob.escape(key) + ".py"))
    return [os.path.abspath(f) for f in files if _under(f, roots)]


def _named_files(exc: BaseException, roots: list[str]) -> list[str]:
    """Files under ``roots`` that the exception (or its causes) names as failing to load.

    A C++ compile error names its own command's files (the source it compiles, the library it
    writes), so only a file the compiler complains about (``file.cpp:12:3: error``) counts.
    """
    found: dict[str, None] = {}
    pattern = re.compile(
        "|".join(re.escape(r.rstrip(os.sep) + os.sep) + r"[^\s'\"():,;\]\[]+" for r in roots)
    )
    failure = compiler_failure(exc)
    if failure is not None:
        for m in re.finditer(f"({pattern.pattern}):\\d+", failure[1]):
            found[m.group(1).rstrip(".")] = None
        return list(found)
    for e in causes(exc):
        texts = [str(e), *(str(a) for a in getattr(e, "args", ()) if isinstance(a, str))]
        texts += [str(v) for v in (getattr(e, "filename", None), getattr(e, "path", None)) if v]
        for text in texts:
            for m in pattern.finditer(text):
                found[m.group(0).rstrip(".")] = None
        for name in _module_files(e, roots):
            found[name] = None
    return list(found)


def summary(exc: BaseException) -> str:
    """The informative lines of a (dynamo-wrapped) exception's message, joined."""
    lines = [
        line.strip()
        for line in str(exc).splitlines()
        if line.strip() and "TORCHDYNAMO_VERBOSE" not in line and "TORCH_LOGS" not in line
    ]
    return " / ".join(lines[-3:])[:400]


def call_repairing(
    cache: InductorCache | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)``, repairing ``cache`` when a corrupt cached module makes it fail.

    A failure that names a file which was in the active cache folder before this call (not one
    written by this compile) removes that file and calls again. A failure that still names such a
    file after :data:`MAX_REPAIRS` repairs, or that names one that cannot be removed, raises
    :class:`CompileError` naming the cache folder and how to repair it; any other failure (a
    full disk, a compiler error about anything but a cached file) is raised unchanged.
    """
    if cache is None or not cache.active:
        return fn(*args, **kwargs)
    roots = [r for r in cache.effective_dirs() if r]
    # Files older than this were in the cache before the call (the kernel's file clock is coarse:
    # a file written just now may carry a time a few milliseconds in the past).
    started = time.time() - 1.0
    removed: list[str] = []
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if disk_full(exc) is not None:  # files cut short by a full disk are this compile's
                raise
            stale = []
            for name in _named_files(exc, roots):
                try:
                    if os.lstat(name).st_mtime < started and name not in removed:
                        stale.append(name)
                except OSError:
                    continue
            if not stale:
                raise
            if len(removed) >= MAX_REPAIRS:
                raise CompileError(cache.repair_advice(stale[0], exc, tried=removed)) from exc
            for name in stale:
                try:
                    os.unlink(name)
                except OSError as err:
                    raise CompileError(
                        cache.repair_advice(name, exc, tried=removed, why=str(err))
                    ) from exc
                removed.append(name)
                cache._record_repair()
                logger.warning(
                    "compile cache %s: removed the cached file %s, which failed to load (%s: %s); "
                    "compiling again%s",
                    cache.path,
                    name,
                    type(exc).__name__,
                    summary(exc),
                    " (this read-only prebuilt cache still holds the corrupt file: rebuild it)"
                    if cache.read_only
                    else "",
                )
            _torch_compat.inductor_clear_caches()

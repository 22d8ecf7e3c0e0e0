"""Atomic file writes: write beside the target, then rename over it; never leave a temp file.

A reader (another worker, a replica mmapping a checkpoint) sees either the old file or the new one,
never half of one: the new content goes to a temp file in the target's own folder (a rename is
atomic only within one filesystem) and is renamed over the target when complete. If writing fails
the temp file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fastinfer.errors import ConfigError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "decision_not_stored",
    "writable_target",
]


@contextlib.contextmanager
def atomic_path(
    target: str | os.PathLike[str], *, suffix: str = ".tmp", replace: bool = True
) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on a clean exit it is renamed to ``target``.

    ``suffix`` matters to writers that check the name (AOTInductor wants ``.pt2``). With
    ``replace=False`` an existing ``target`` is kept (``FileExistsError``), for publish-once files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    try:
        # mkstemp makes the file owner-only (0600); the result must carry the mode a plain
        # open() would give it (0666 less the umask), or a bundle baked into an image by root
        # cannot be read by the service's own user.
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if replace:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if target exists: first writer wins
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on a clean exit it is renamed to ``target``.

    For artefacts made of several files (an OpenVINO IR is ``.xml`` + ``.bin``): a reader sees the
    whole folder or none of it. Publish-once: if another writer published ``target`` first, its
    copy is kept and this one discarded. On error the temp folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it, which would
    race with threads creating files); 0o022 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode())


def atomic_write_json(target: str | os.PathLike[str], doc: Mapping[str, Any] | Any) -> None:
    atomic_write_text(target, json.dumps(doc, indent=2, sort_keys=True, default=str))


def writable_target(path: str | os.PathLike[str], *, what: str, example: str) -> Path:
    """``path`` resolved, once a file can be written there: checked before any long work.

    Raises :class:`ConfigError` naming the path and the fix when ``path`` is a folder or its
    folder cannot be created or written (read-only, another user's, a pseudo filesystem such as
    ``/proc``). ``example`` is a file name to suggest inside a folder.
    """
    try:
        target = Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # "~nouser/x"
        raise ConfigError(
            f"cannot use {what} path {os.fspath(path)!r} ({exc}); pass an absolute path"
        ) from None
    if target.is_dir():
        raise ConfigError(
            f"the {what} path {target} is a folder; pass a file path, e.g. {target / example}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the {what} {target}: its folder {target.parent} is not writable here "
            f"({exc.strerror or exc}). Fix: pass a path in a folder this process can write"
        ) from None
    return target


def decision_not_stored(folder: str | os.PathLike[str], exc: OSError) -> str:
    """The note (report and log) for a measured decision that could not be written: the
    measurement stands, the next start measures again."""
    return (
        f"the decision was not stored in {folder} ({type(exc).__name__}: {exc}): "
        "the next start measures again; point cache_dir (FASTINFER_CACHE_DIR) at a "
        "writable folder"
    )

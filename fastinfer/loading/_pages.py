"""The pages behind a mapped checkpoint: are they still there, and fault them in without SIGBUS.

A tensor loaded with ``mmap=True`` *is* the file's pages. If the file shrinks while a process maps
it (a deploy rewriting it in place), the kernel drops every page past the new end from every
mapping, and the next access to one kills the process with SIGBUS: Python cannot catch it. So the
loader records each file as it maps it (:class:`Source`), checks that nothing changed before it
touches a page (:func:`check_unchanged`), and faults pages in with
``madvise(MADV_POPULATE_READ)`` (:func:`populate`), which fails with ``EFAULT`` where an access would
raise SIGBUS: the loader turns that into :class:`~fastinfer.CheckpointError`, never a touch.

What this cannot cover: a file truncated *after* the last check (between the check and the touch,
or after the load returned) still takes the pages away; only writing a new file and renaming it over
the old one (readers keep the old inode) is safe. See docs/loading.md, "Under faults".
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastinfer.errors import CheckpointError

__all__ = ["Source", "changed_error", "check_unchanged", "memory", "populate", "snapshot"]

_FIX = (
    "load it again once the file is complete; to update a checkpoint that running processes map, "
    "write the new file beside it and rename it over the old one (fastinfer.save_weights does), "
    "never rewrite it in place"
)


@dataclass(frozen=True)
class Source:
    """One checkpoint file as it was when it was read or mapped."""

    path: Path
    size: int  # bytes when mapped
    needed: int  # bytes its header (or zip directory) says the tensors need
    dev: int
    ino: int
    mtime_ns: int


def snapshot(path: Path, st: os.stat_result, *, needed: int | None = None) -> Source:
    return Source(
        path=path,
        size=st.st_size,
        needed=st.st_size if needed is None else needed,
        dev=st.st_dev,
        ino=st.st_ino,
        mtime_ns=st.st_mtime_ns,
    )


def what_changed(src: Source) -> str | None:
    """How ``src``'s file differs from when it was mapped, or None if it looks the same."""
    try:
        st = os.stat(src.path)
    except FileNotFoundError:
        return "was removed"
    except OSError as exc:
        return f"can no longer be read ({exc.strerror or exc})"
    if (st.st_dev, st.st_ino) != (src.dev, src.ino):
        return "was replaced by another file"
    if st.st_size < src.needed:
        return f"was truncated from {src.size} to {st.st_size} bytes ({src.needed} are needed)"
    if st.st_size != src.size:
        return f"changed size from {src.size} to {st.st_size} bytes"
    if st.st_mtime_ns != src.mtime_ns:
        return "was rewritten in place (same size, new modification time)"
    return None


def changed_error(src: Source, change: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {str(src.path)!r} {change} while it was being loaded, so the pages "
        f"mapped from it can no longer be trusted. Fix: {_FIX}"
    )


def check_unchanged(sources: Sequence[Source]) -> None:
    """Raise :class:`CheckpointError` naming the first file that changed since it was mapped."""
    for src in sources:
        change = what_changed(src)
        if change is not None:
            raise changed_error(src, change)


# --------------------------------------------------------------------------------------------
# Page population
# --------------------------------------------------------------------------------------------

_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+
_GONE = (errno.EFAULT, getattr(errno, "EHWPOISON", 133))  # an access would raise SIGBUS
_libc: Any = None


def _madvise(addr: int, length: int, advice: int) -> int:
    """0 on success, else the errno (``ENOSYS`` where madvise is not available)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return errno.ENOSYS
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.madvise(addr, length, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def _byte_range(t: torch.Tensor, whole_storage: bool) -> tuple[int, int] | None:
    if whole_storage:
        st = t.untyped_storage()
        return (st.data_ptr(), st.nbytes()) if st.nbytes() else None
    if t.numel() == 0:
        return None
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), span * t.element_size()


def populate(
    tensors: Sequence[torch.Tensor],
    *,
    sources: Sequence[Source] = (),
    whole_storage: bool = True,
) -> None:
    """Fault in the pages behind ``tensors`` (file mappings) in bulk, so the first forward does not.

    One ``madvise(MADV_POPULATE_READ)`` per mapped range (Linux 5.14+) builds the page tables without a
    fault per page; elsewhere one byte per page is read, after checking ``sources`` once more.
    ``EFAULT`` from the kernel means a page is gone (the file shrank): :class:`CheckpointError`
    naming the file that changed, never a touch (which would be SIGBUS). Reading file pages adds no
    private memory. ``whole_storage=False`` covers only the bytes each tensor views.
    """
    page = _mmap.PAGESIZE
    ranges: dict[int, int] = {}
    for t in tensors:
        r = _byte_range(t, whole_storage)
        if r is not None:
            ranges[r[0]] = max(ranges.get(r[0], 0), r[1])
    merged: list[list[int]] = []
    for start, nbytes in sorted(ranges.items()):
        lo, hi = start - start % page, start + nbytes
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    for lo, hi in merged:
        _madvise(lo, hi - lo, _MADV_WILLNEED)
    for lo, hi in merged:
        err = errno.EINTR
        for _ in range(8):  # EINTR / EAGAIN: interrupted or transient, try again
            err = _madvise(lo, hi - lo, _MADV_POPULATE_READ)
            if err not in (errno.EINTR, errno.EAGAIN):
                break
        if err == 0:
            continue
        check_unchanged(sources)
        if err in _GONE:
            names = ", ".join(repr(str(s.path)) for s in sources) or "the checkpoint"
            raise CheckpointError(
                f"pages mapped from {names} are gone (madvise(MADV_POPULATE_READ) failed with "
                f"{errno.errorcode.get(err, err)}: an access would kill the process with SIGBUS); "
                f"the file was truncated while it was being loaded. Fix: {_FIX}"
            )
        # Not supported here (old kernel, another OS): touch one byte per page instead.
        buf = (ctypes.c_char * (hi - lo)).from_address(lo)  # type: ignore[operator]
        flat = torch.frombuffer(memoryview(buf), dtype=torch.uint8)
        flat[::page].max()


def memory() -> dict[str, int]:
    """This process's resident memory split into private anonymous, file-backed and PSS bytes."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        import psutil

        info = psutil.Process().memory_full_info()
        rss, uss = int(info.rss), int(getattr(info, "uss", 0))
        return {
            "rss": rss,
            "anonymous": uss,
            "file": rss - uss,
            "pss": int(getattr(info, "pss", rss)),
        }
    rss = fields.get("Rss", 0)
    anon = fields.get("Anonymous", 0)
    return {"rss": rss, "anonymous": anon, "file": rss - anon, "pss": fields.get("Pss", rss)}

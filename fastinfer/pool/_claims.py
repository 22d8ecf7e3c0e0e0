"""Which CPUs the live pinned pools of this machine use: one file per (CPU, process).

A pool pins one worker per physical core, assuming the cores are its own. Several server
processes that each start one (``uvicorn --workers 2``, ``gunicorn -w 2`` with
``svc.serve_model``) pin twice as many workers on the same cores, and nothing says so. Each
process that pins a pool to CPU ``n`` holds the file ``cpu<n>.<pid>`` (its content: the
process's start time, so a recycled pid is not taken for the owner) in a directory shared by
the machine (``/dev/shm/fastinfer-cpus``, else the temp dir); a pool that finds another live
process's file for one of its CPUs says so. The files are written before the others are read,
so of two pools starting at once at least one sees the other. A process that died leaves its
files behind: they are ignored (and removed) by the next pool. Pools of one process share its
files (counted here) and are not reported against each other.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterable

from fastinfer._common.files import atomic_write_text

__all__ = ["CpuClaim", "claims_dir"]

logger = logging.getLogger("fastinfer.pool")

_NAME = re.compile(r"cpu(\d+)\.(\d+)")
# Re-entrant: a pool's claim is released by a weakref finalizer, which the garbage collector can
# run inside any allocation, including this module's own locked section of another claim (a plain
# Lock then deadlocked the thread that was starting a pool).
_lock = threading.RLock()
_held: Counter[tuple[str, int]] = Counter()  # (directory, cpu) -> this process's pools on it


def _after_fork_in_child() -> None:
    """A forked child starts with no claims: its parent's pools (and their files, named by the
    parent's pid) are not its own, so a pool it creates writes its own files. The lock is new too:
    one another thread of the parent held at the fork would stay held here forever."""
    global _lock, _held
    _lock = threading.RLock()
    _held = Counter()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def claims_dir() -> str | None:
    """The shared directory of claim files (None when none can be written: no check then)."""
    import tempfile  # here, not at import: it pulls in random and hashlib

    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, "fastinfer-cpus")
    try:
        os.makedirs(path, exist_ok=True)
        st = os.stat(path)
        if st.st_uid == os.getuid() and st.st_mode & 0o1777 != 0o1777:
            os.chmod(path, 0o1777)  # every user's pools share the cores: like /tmp
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), "" for a zombie,
    None when it cannot be read (no such process, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # the command name may hold ") "
    if len(fields) < 20:
        return None
    return "" if fields[0] == b"Z" else fields[19].decode()


def _alive(pid: int, started: str) -> bool:
    now = _started(pid)
    if now is not None:
        return bool(now) and (not started or now == started)
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


class CpuClaim:
    """This process's claim on ``cpus`` (made at once); ``others`` maps each other live process
    that claims some of them to those CPUs. :meth:`release` is idempotent, and does nothing in a
    forked child (the claim is its parent's)."""

    def __init__(self, cpus: Iterable[int], directory: str | None = None) -> None:
        self._pid = os.getpid()
        self.cpus = tuple(sorted(set(cpus)))
        self.others: dict[int, list[int]] = {}
        self._held = False
        self.directory = directory
        if self.cpus and directory is None:
            self.directory = claims_dir()
        if self.directory is None or not self.cpus:
            return
        me = os.getpid()
        try:
            with _lock:
                for cpu in self.cpus:
                    key = (self.directory, cpu)
                    if not _held[key]:
                        path = os.path.join(self.directory, f"cpu{cpu}.{me}")
                        atomic_write_text(path, _started(me) or "")
                    _held[key] += 1
                self._held = True
            names = os.listdir(self.directory)
        except OSError as exc:  # a full or read-only directory: no check, never a failure
            logger.debug("cannot claim CPUs %s in %s: %s", self.cpus, self.directory, exc)
            return
        for name in names:
            m = _NAME.fullmatch(name)
            if m is None or int(m[2]) == me or int(m[1]) not in self.cpus:
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path) as f:
                    started = f.read().strip()
            except OSError:
                continue
            if _alive(int(m[2]), started):
                self.others.setdefault(int(m[2]), []).append(int(m[1]))
            else:
                try:  # its process is gone
                    os.unlink(path)
                except OSError:
                    pass

    def warning(self) -> str | None:
        """What to tell the user when other live processes pin pools to these CPUs."""
        if not self.others:
            return None
        shared = sorted({c for cpus in self.others.values() for c in cpus})
        owners = "; ".join(
            f"pid {pid}: {', '.join(f'cpu{c}' for c in sorted(cpus))}"
            for pid, cpus in sorted(self.others.items())
        )
        return (
            f"CPUs {', '.join(map(str, shared))} are already pinned by the pool of another live "
            f"process on this machine ({owners}): the workers of both share those cores and each "
            "runs slower than alone. Several server processes that each start a pool do this "
            "(uvicorn --workers N, gunicorn -w N): run one server process per machine or pod "
            "and let its pool use the cores (docs/fastapi.md, 'One server process per machine')"
        )

    def release(self) -> None:
        """Drop this claim (the file goes when the last pool of this process on a CPU does)."""
        if self._pid != os.getpid():
            return  # a forked child's copy: the files and the count are the parent's
        with _lock:
            if not self._held:
                return
            self._held = False
            assert self.directory is not None
            for cpu in self.cpus:
                key = (self.directory, cpu)
                _held[key] -= 1
                if _held[key] <= 0:
                    del _held[key]
                    try:
                        os.unlink(os.path.join(self.directory, f"cpu{cpu}.{os.getpid()}"))
                    except OSError:
                        pass

"""Entry point of a :class:`fastinfer.PinnedPool` worker process (private).

The pool starts this file *by path* in a fresh interpreter (``python _worker.py FD CONFIG``),
not through ``multiprocessing``'s spawn, because spawn imports the parent's ``__main__`` and the
target's package (``fastinfer`` -> ``torch``) before any of our code runs, and torch sizes its
thread pools from the affinity mask when it is imported. So this module imports only the standard
library at top level, and the order below matters:

1. ask the kernel to kill us when the parent dies (``prctl(PR_SET_PDEATHSIG)``), check the parent;
2. pin to the worker's CPUs (``sched_setaffinity``) and optionally bind memory to its NUMA node;
   OMP_NUM_THREADS / MKL_NUM_THREADS and the user's ``env=`` are already in the environment;
3. only now ``import torch`` and set its intra/inter-op thread counts;
4. apply the parent's preparation data (sys.path, cwd, ``__main__``, authkey), unpickle
   ``init``/``fn`` and call ``init()`` once (then ``fn`` on the ``warmup`` batch, if given);
   report ready (or the traceback of the failure);
5. serve calls until the connection closes, while a watchdog thread exits if the parent goes away.

Whatever ``fn`` raises, ``SystemExit`` and ``KeyboardInterrupt`` included, is caught, sent back and
the worker keeps serving: the process state is what any other exception leaves, and a restart would
reload the model. A worker that must be replaced exits with ``os._exit`` (a crash: it is restarted).
The exception travels pickled on its own, so the parent can fail just that call with the traceback
text when it cannot rebuild the exception (a class it cannot import, an ``__init__`` that pickle
cannot call again).
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import platform
import sys
import threading
import time
import traceback
from typing import Any

PR_SET_PDEATHSIG = 1
MPOL_PREFERRED = 1
MPOL_BIND = 2
# set_mempolicy syscall numbers; other architectures skip NUMA binding with a note.
_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}


def set_pdeathsig(sig: int = 9) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent thread exits. False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_mempolicy(node: int, *, bind: bool) -> str | None:
    """Bind (or prefer) this process's memory allocations to NUMA ``node``; None or a reason it could not."""
    nr = _SYS_SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        return f"NUMA binding not supported on {platform.machine()}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:
        return f"NUMA binding unavailable: {exc}"
    mask = ctypes.c_ulong(1 << node)
    mode = MPOL_BIND if bind else MPOL_PREFERRED
    rc = libc.syscall(nr, mode, ctypes.byref(mask), ctypes.sizeof(mask) * 8 + 1)
    if rc != 0:
        return f"set_mempolicy(node {node}) failed: {os.strerror(ctypes.get_errno())}"
    return None


def _watch_parent(parent_pid: int) -> None:
    # Backstop for PR_SET_PDEATHSIG (which fires when the parent *thread* exits and is Linux only):
    # poll the parent pid; when we are re-parented the parent is gone.
    while True:
        time.sleep(0.25)
        if os.getppid() != parent_pid:
            os._exit(0)


def main(argv: list[str]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path.pop(0)  # the script's folder (fastinfer/pool/) must not shadow stdlib modules
    fd = int(argv[1])
    cfg: dict[str, Any] = json.loads(argv[2])
    parent_pid = int(cfg["parent_pid"])
    set_pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    notes: list[str] = []
    if cfg.get("cpus") is not None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cfg["cpus"])
        else:
            notes.append(f"CPU pinning is not supported on {sys.platform}; threads were still set")
    if cfg.get("numa_node") is not None:
        why = set_mempolicy(int(cfg["numa_node"]), bind=cfg.get("numa_mode") == "bind")
        if why:
            notes.append(why)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()

    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        import torch  # only now: torch sizes its thread pools from the mask and env set above

        torch.set_num_threads(int(cfg["threads"]))
        if cfg.get("interop") is not None:
            torch.set_num_interop_threads(int(cfg["interop"]))
        import multiprocessing.spawn
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # registers the shared-memory tensor reductions

        setup = pickle.loads(conn.recv_bytes())
        multiprocessing.spawn.prepare(setup["prep"])
        init = pickle.loads(setup["init"])
        fn = pickle.loads(setup["fn"])
        report = pickle.loads(setup["report"]) if setup["report"] is not None else None
        report_interval = float(setup["report_interval"])
        state = init()
        if setup.get("warmup") is not None:  # the first real call finds the worker warm
            fn(state, pickle.loads(setup["warmup"]))
        from fastinfer.pool import _wire  # as a module, so pickles name its functions

        _wire.set_worker_state(state)
        dumps = _wire.make_dumps()
    except BaseException as exc:
        try:
            conn.send_bytes(pickle.dumps(("init_error", traceback.format_exc(), _cause(exc))))
        finally:
            os._exit(1)

    conn.send_bytes(
        pickle.dumps(
            (
                "ready",
                {
                    "pid": os.getpid(),
                    "affinity": sorted(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity")
                    else cfg.get("cpus"),
                    "threads": torch.get_num_threads(),
                    "interop": torch.get_num_interop_threads(),
                    "notes": notes,
                },
            )
        )
    )
    last_report = 0.0
    while True:
        try:
            msg = ForkingPickler.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)  # the parent closed the pool or died
        if msg[0] == "close":
            break
        _, call_id, kind, payload = msg
        t0 = time.perf_counter()
        try:
            if kind == "fn":
                result = fn(state, payload)
            else:
                func, args, kwargs = payload
                result = func(*args, **kwargs)
            reply: tuple[Any, ...] = ("ok", call_id, result)
        except BaseException as exc:  # SystemExit / KeyboardInterrupt too: this call only
            tb = traceback.format_exc()
            try:
                blob: bytes | None = dumps(exc)
            except BaseException:
                blob = None  # the exception does not pickle: the traceback text still goes
            reply = ("err", call_id, blob, tb, _describe(exc))
        exec_s = time.perf_counter() - t0
        payload_report: Any = None
        has_report = False
        if report is not None and time.monotonic() - last_report >= report_interval:
            last_report = time.monotonic()
            try:
                payload_report, has_report = report(state), True
            except Exception:
                traceback.print_exc()
        tail = (exec_s, has_report, payload_report)
        try:
            data = dumps((*reply, *tail))
        except Exception:
            if reply[0] == "ok":
                reply = (
                    "err",
                    call_id,
                    None,
                    "the result cannot be pickled:\n" + traceback.format_exc(),
                    "",  # not an exception of fn's: the text says it all
                )
            try:
                data = dumps((*reply, *tail))
            except Exception:
                data = dumps((*reply, exec_s, False, None))
        try:
            conn.send_bytes(data)
        except OSError:
            os._exit(0)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cause(exc: BaseException) -> str:
    """``Type: message`` on one line, for a message that must not carry the whole traceback."""
    try:
        text = " ".join(str(exc).split())
    except Exception:
        text = ""
    name = type(exc).__qualname__
    return f"{name}: {text[:300]}" if text else name


def _describe(exc: BaseException) -> str:
    """``module.Type('message')`` for the parent's message (text survives any pickling)."""
    module = type(exc).__module__
    try:
        text = repr(exc)[:300]
    except Exception:
        text = type(exc).__qualname__
    return text if module == "builtins" else f"{module}.{text}"


if __name__ == "__main__":
    main(sys.argv)

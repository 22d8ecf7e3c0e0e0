"""``fastinfer.profile()``: torch.profiler with a trace file and a short, actionable summary.

    >>> with fastinfer.profile(steps=10) as prof:     # doctest: +SKIP
    ...     for _ in range(10):
    ...         model(x)
    >>> prof.summary.launch_bound, prof.summary.trace_path   # doctest: +SKIP

The summary gives the time per op (top N by self time), op calls and kernel launches per step,
the share of time spent in tiny ops, and a hint when the model is launch-bound (many small
kernels: compile it). ``FASTINFER_PROFILE=1`` turns :func:`maybe_profile` blocks on in a running
service without code changes (``FASTINFER_PROFILE=0`` turns explicit ``profile()`` blocks off);
traces go to ``FASTINFER_PROFILE_DIR`` (default ``./fastinfer-traces``).

torch's profiler runs one session per process, and a second one started while another runs
crashes the process (SIGSEGV). So one ``profile()`` block runs at a time: a block nested in an
active one in the same thread (or inside a ``torch.profiler.profile`` of this thread) is a no-op
whose ops the outer profile records (``Profile.skipped`` says why; logged once per outer block),
and a block started while another thread's block runs raises :class:`ConfigError`. A trace that
cannot be written (folder not writable, a file in its place, disk full) leaves
``summary.trace_path`` None and the reason in ``summary.trace_error``; the summary is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastinfer import _env
from fastinfer.errors import ConfigError

__all__ = ["OpStat", "Profile", "ProfileSummary", "maybe_profile", "profile"]

logger = logging.getLogger(__name__)

_LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "hipLaunchKernel")
_GRAPH_LAUNCH = ("cudaGraphLaunch", "hipGraphLaunch")


@dataclass(frozen=True)
class OpStat:
    """One op (or kernel) aggregated over the profile; times in seconds."""

    name: str
    calls: int
    self_time: float
    share: float  # of the summed self time

    @property
    def mean(self) -> float:
        return self.self_time / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class ProfileSummary:
    """What the profile says, as plain data. ``str()`` gives the printed table."""

    steps: int
    wall_time: float
    device: str  # "cpu" or "cuda": where the op times were measured
    total_self_time: float
    top_ops: tuple[OpStat, ...]
    op_calls: int
    op_calls_per_step: float
    kernel_launches: int
    kernel_launches_per_step: float
    tiny_op_threshold: float
    tiny_op_share: float
    launch_bound: bool
    hint: str | None
    trace_path: str | None
    trace_error: str | None = None  # why no trace was written (None when written or not asked)

    def __str__(self) -> str:
        lines = [
            f"fastinfer.profile: {self.steps} step(s) in {self.wall_time * 1e3:.2f} ms wall; "
            f"{self.op_calls_per_step:.0f} op calls/step"
            + (
                f", {self.kernel_launches_per_step:.0f} kernel launches/step"
                if self.device == "cuda"
                else ""
            ),
            f"time in tiny ops (< {self.tiny_op_threshold * 1e6:.0f} µs each): "
            f"{self.tiny_op_share:.0%} of {self.device} op time",
        ]
        width = max([len(o.name) for o in self.top_ops] + [2])
        width = min(width, 48)
        lines.append(f"{'op':<{width}}  {'calls':>7}  {'self':>10}  {'share':>6}  {'mean':>9}")
        for o in self.top_ops:
            lines.append(
                f"{o.name[:width]:<{width}}  {o.calls:>7}  {o.self_time * 1e3:>8.3f}ms  "
                f"{o.share:>6.1%}  {o.mean * 1e6:>7.1f}µs"
            )
        if self.hint:
            lines.append(f"hint: {self.hint}")
        if self.trace_path:
            lines.append(
                f"trace: {self.trace_path} (open in https://ui.perfetto.dev or chrome://tracing)"
            )
        elif self.trace_error:
            lines.append(f"trace: not written ({self.trace_error})")
        return "\n".join(lines)


def summarize(
    prof: Any,
    *,
    steps: int,
    wall_time: float,
    top: int = 10,
    tiny_op_us: float = 10.0,
    launch_bound_calls: int = 64,
    trace_path: str | None = None,
    trace_error: str | None = None,
) -> ProfileSummary:
    """Build a :class:`ProfileSummary` from a finished ``torch.profiler.profile``."""
    from torch.autograd import DeviceType

    events = prof.events()
    device_rows = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    use_cuda = bool(device_rows)
    if use_cuda:  # kernels measured on the device
        rows = [(e.key, e.count, e.self_device_time_total) for e in device_rows]
    else:
        rows = [
            (e.key, e.count, e.self_cpu_time_total)
            for e in prof.key_averages()
            if e.device_type == DeviceType.CPU and not getattr(e, "is_user_annotation", False)
            and not e.key.startswith("ProfilerStep")
        ]  # fmt: skip
    total_us = sum(t for _, _, t in rows)
    ops = sorted(rows, key=lambda r: r[2], reverse=True)
    tiny_us = sum(t for _, c, t in rows if c and t / c < tiny_op_us)
    op_calls = sum(
        1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
    )
    launches = sum(1 for e in events if e.name in _LAUNCH_NAMES or e.name in _GRAPH_LAUNCH) or sum(
        1 for e in events if e.device_type == DeviceType.CUDA
    )
    per_step = steps if steps > 0 else 1
    tiny_share = tiny_us / total_us if total_us else 0.0
    work_per_step = (launches if use_cuda else op_calls) / per_step
    launch_bound = work_per_step >= launch_bound_calls and tiny_share >= 0.5
    hint = None
    if launch_bound:
        what = "kernel launches" if use_cuda else "op calls"
        hint = (
            f"many small kernels: {work_per_step:.0f} {what} per step and {tiny_share:.0%} of the "
            "time in ops under "
            f"{tiny_op_us:.0f} µs; the model is launch-bound. Try compile_model(...) "
            "(mode='reduce-overhead' on CUDA uses CUDA graphs) or larger batches."
        )
    return ProfileSummary(
        steps=steps,
        wall_time=wall_time,
        device="cuda" if use_cuda else "cpu",
        total_self_time=total_us / 1e6,
        top_ops=tuple(
            OpStat(name, count, t / 1e6, t / total_us if total_us else 0.0)
            for name, count, t in ops[:top]
        ),
        op_calls=op_calls,
        op_calls_per_step=op_calls / per_step,
        kernel_launches=launches if use_cuda else 0,
        kernel_launches_per_step=(launches / per_step) if use_cuda else 0.0,
        tiny_op_threshold=tiny_op_us / 1e6,
        tiny_op_share=tiny_share,
        launch_bound=launch_bound,
        hint=hint,
        trace_path=trace_path,
        trace_error=trace_error,
    )


# torch's profiler is one session per process: at most one Profile runs at a time (see the module
# docstring). Set under _active_lock before the session starts, cleared once its report is done.
_active_lock = threading.Lock()
_active: Profile | None = None
_active_thread: int | None = None
_raw_nested_logged = False  # a profile() inside a plain torch.profiler session: logged once


class Profile:
    """The handle returned by :func:`profile`; ``summary`` is set when the block exits.

    ``skipped`` says why a block that was enabled took no profile of its own (it ran nested in
    another profile of the same thread, which recorded its ops); None otherwise.
    """

    def __init__(
        self,
        *,
        steps: int,
        trace_dir: str | os.PathLike[str] | Literal[False] | None,
        name: str,
        top: int,
        tiny_op_us: float,
        launch_bound_calls: int,
        print_summary: bool,
        record_shapes: bool,
        enabled: bool,
        cuda: bool | None,
    ) -> None:
        self.steps = steps
        self.trace_dir = trace_dir
        self.name = name
        self.top = top
        self.tiny_op_us = tiny_op_us
        self.launch_bound_calls = launch_bound_calls
        self.print_summary = print_summary
        self.record_shapes = record_shapes
        self.enabled = enabled
        self.cuda = cuda
        self.summary: ProfileSummary | None = None
        self.skipped: str | None = None
        self._prof: Any = None
        self._annotation: Any = None  # the record_function range of a nested (no-op) block
        self._nested_logged = False
        self._t0 = 0.0

    def __enter__(self) -> Profile:
        if not self.enabled:
            return self
        global _active, _active_thread
        import torch
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        me = threading.get_ident()
        in_torch_profiler = getattr(torch.autograd, "_profiler_enabled", lambda: False)()
        with _active_lock:
            outer, thread = _active, _active_thread
            if outer is self or self._annotation is not None:
                raise ConfigError(
                    f"fastinfer.profile({self.name!r}) is already running: a Profile is entered "
                    "once at a time. Fix: create a new fastinfer.profile(...) for another block"
                )
            if outer is not None and thread != me:
                raise ConfigError(
                    f"fastinfer.profile({self.name!r}) cannot start: profile block "
                    f"{outer.name!r} is running in thread {_thread_name(thread)}, and torch's "
                    "profiler runs one session per process (a second one crashes the process). "
                    "Fix: profile one block at a time (wait for the other block to finish, or "
                    "profile from one thread only)"
                )
            self.skipped = None
            nested = outer is not None or in_torch_profiler
            if not nested:
                _active, _active_thread = self, me
        if nested:
            self._skip(outer)
            return self
        try:
            use_cuda = torch.cuda.is_available() if self.cuda is None else self.cuda
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
            self._prof = torch_profile(activities=activities, record_shapes=self.record_shapes)
            self._prof.__enter__()
            if use_cuda:
                torch.cuda.synchronize()
        except BaseException:
            self._prof = None
            _release(self)
            raise
        self._t0 = time.perf_counter()
        return self

    def _skip(self, outer: Profile | None) -> None:
        """Run this block as a no-op inside the profile already running in this thread: its ops
        are recorded there, under a range named after this block."""
        global _raw_nested_logged
        from torch.profiler import record_function

        if outer is not None:
            self.skipped = (
                f"nested in the running profile block {outer.name!r}, which records its ops "
                f"(under the range {self.name!r})"
            )
            first, outer._nested_logged = not outer._nested_logged, True
            once = "once per outer block"
        else:
            self.skipped = (
                "a torch.profiler session is already running in this thread; it records this "
                f"block's ops (under the range {self.name!r})"
            )
            first, _raw_nested_logged = not _raw_nested_logged, True
            once = "once per process"
        if first:
            logger.warning(
                "fastinfer.profile(%r) took no profile of its own: %s. torch's profiler runs one "
                "session per process; profile the outer block (or take the inner block out of "
                "it) to get a separate summary (logged %s)",
                self.name,
                self.skipped,
                once,
            )
        self._annotation = record_function(self.name)
        self._annotation.__enter__()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._annotation is not None:  # a nested block: nothing of its own to report
            annotation, self._annotation = self._annotation, None
            annotation.__exit__(exc_type, *exc)
            return
        if self._prof is None:
            return
        try:
            self._finish(exc_type, *exc)
        finally:
            _release(self)

    def _finish(self, exc_type: object, *exc: object) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(exc_type, *exc)
        if exc_type is not None:
            return  # the block failed: keep its exception, skip the report
        trace = error = None
        if self.trace_dir is not False:
            trace, error = self._write_trace(prof)
        self.summary = summarize(
            prof,
            steps=self.steps,
            wall_time=wall,
            top=self.top,
            tiny_op_us=self.tiny_op_us,
            launch_bound_calls=self.launch_bound_calls,
            trace_path=trace,
            trace_error=error,
        )
        if self.print_summary:
            print(self.summary, flush=True)

    def _write_trace(self, prof: Any) -> tuple[str | None, str | None]:
        """Write the Chrome trace: (its path, None), or (None, why) when it could not be written.

        Never raises: the summary is worth keeping without its trace. torch's exporter writes
        ``<path>.tmp`` and renames it, and on a full disk it fails silently, leaving the temp file
        and no trace; so the file is checked, and whatever a failed write left is removed.
        """
        folder = Path(self.trace_dir or _env.get("FASTINFER_PROFILE_DIR") or "fastinfer-traces")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = folder / f"{self.name}-{stamp}-{os.getpid()}-{next(_COUNTER)}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
            if not _complete(path):
                raise OSError(
                    f"torch's exporter left no complete {path.name} (is the folder writable, "
                    "is the disk full?)"
                )
        except Exception as e:
            for leftover in (path, path.with_name(path.name + ".tmp")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            why = f"{type(e).__name__}: {e}"
            logger.warning(
                "fastinfer.profile(%r): could not write the trace to folder %s (%s); the summary "
                "is kept, with trace_path=None. Fix: point FASTINFER_PROFILE_DIR (or "
                "profile(trace_dir=...)) at a writable folder with free space, or pass "
                "trace_dir=False to write no trace",
                self.name,
                str(folder),
                why,
            )
            return None, why
        return str(path), None


def _complete(path: Path) -> bool:
    """Whether ``path`` holds a whole trace: a JSON object ends with ``}`` (a write cut short
    by a full disk does not)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 256))
            return f.read().rstrip().endswith(b"}")
    except OSError:
        return False


def _release(prof: Profile) -> None:
    global _active, _active_thread
    with _active_lock:
        if _active is prof:
            _active, _active_thread = None, None


def _thread_name(ident: int | None) -> str:
    for t in threading.enumerate():
        if t.ident == ident:
            return repr(t.name)
    return str(ident)


_COUNTER = iter(range(1, 1 << 62))


def profile(
    *,
    steps: int = 1,
    trace_dir: str | os.PathLike[str] | Literal[False] | None = None,
    name: str = "fastinfer",
    top: int = 10,
    tiny_op_us: float = 10.0,
    launch_bound_calls: int = 64,
    print_summary: bool = True,
    record_shapes: bool = False,
    enabled: bool | None = None,
    cuda: bool | None = None,
) -> Profile:
    """Profile the ``with`` block; on exit write a Chrome/Perfetto trace and print a summary.

    Args:
        steps: how many forwards the block runs (for the per-step figures).
        trace_dir: folder for the trace (default ``$FASTINFER_PROFILE_DIR`` or
            ``./fastinfer-traces``); ``False`` writes none.
        top: how many ops the summary lists.
        tiny_op_us: ops whose mean self time is below this are "tiny".
        launch_bound_calls: launches (CUDA) or op calls (CPU) per step from which a model with
            mostly tiny ops is called launch-bound.
        enabled: None follows ``FASTINFER_PROFILE`` (unset or true: on; false: off).
        cuda: profile CUDA kernels too (default: when CUDA is available).

    Returns a :class:`Profile` whose ``summary`` (:class:`ProfileSummary`) is set on exit.

    Raises ConfigError for bad arguments, when ``FASTINFER_PROFILE`` is not a boolean, and on
    entering the block while another thread's profile block runs (one runs at a time). A block
    nested in a running profile of the same thread is a no-op (``Profile.skipped``). A trace that
    cannot be written is logged and left out (``summary.trace_error``); the summary is kept.

        with fastinfer.profile(steps=10) as prof:
            for _ in range(10):
                model(x)
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"profile(steps=...) must be a positive int, got {steps!r}")
    if top < 1 or tiny_op_us <= 0 or launch_bound_calls < 1:
        raise ConfigError("profile(): top, tiny_op_us and launch_bound_calls must be positive")
    if enabled is None:
        enabled = _env.flag("FASTINFER_PROFILE") is not False
    return Profile(
        steps=steps,
        trace_dir=trace_dir,
        name=name,
        top=top,
        tiny_op_us=tiny_op_us,
        launch_bound_calls=launch_bound_calls,
        print_summary=print_summary,
        record_shapes=record_shapes,
        enabled=enabled,
        cuda=cuda,
    )


# --------------------------------------------------------------------------------------------
# maybe_profile: a no-op unless FASTINFER_PROFILE is set; profiles one window of calls
# --------------------------------------------------------------------------------------------


class _Window:
    def __init__(self) -> None:
        self.calls = 0
        self.profile: Profile | None = None
        self.thread: int | None = None
        self.seen = 0
        self.done = False
        self.summary: ProfileSummary | None = None


_windows: dict[str, _Window] = {}
_windows_lock = threading.Lock()
_env_errors_logged: set[str] = set()


@contextlib.contextmanager
def maybe_profile(name: str = "serve", *, warmup: int = 3, steps: int = 10) -> Iterator[None]:
    """Wrap each call of a running service: a no-op unless ``FASTINFER_PROFILE`` is true.

    When it is, calls ``warmup+1 .. warmup+steps`` made under ``name`` (from the thread that made
    call ``warmup+1``) are profiled together, once per process; the trace is written and the summary
    logged (WARNING, so it shows without logging set up). Later calls run unprofiled. A value of
    ``FASTINFER_PROFILE`` that is not a boolean is logged once (ERROR) and the calls run
    unprofiled: profiling never breaks the service it observes.

        def handle(x):
            with maybe_profile("serve"):
                return model(x)
    """
    try:
        wanted = _env.flag("FASTINFER_PROFILE")
    except ConfigError as e:  # a typo must not break the service it would observe: log it once
        if str(e) not in _env_errors_logged:
            _env_errors_logged.add(str(e))
            logger.error("maybe_profile(%r) runs unprofiled: %s", name, e)
        wanted = None
    if wanted is not True:
        yield
        return
    ident = threading.get_ident()
    with _windows_lock:
        w = _windows.setdefault(name, _Window())
        start = stop = False
        if not w.done:
            if w.profile is None:
                w.calls += 1
                if w.calls > warmup:
                    w.profile = profile(steps=steps, name=name, print_summary=False, enabled=True)
                    w.thread = ident
                    start = True
            mine = w.thread == ident and w.profile is not None
        else:
            mine = False
    if not mine:
        yield
        return
    assert w.profile is not None
    if start:
        try:
            w.profile.__enter__()
        except Exception:  # profiling must never break the service it observes
            logger.exception("FASTINFER_PROFILE: could not start the profiler for %r", name)
            w.done = True
            yield
            return
    try:
        yield
    finally:
        with _windows_lock:
            w.seen += 1
            stop = w.seen >= steps
        if stop:
            w.done = True
            try:
                w.profile.__exit__(None, None, None)
                w.summary = w.profile.summary
                if w.summary is None:
                    logger.warning(
                        "FASTINFER_PROFILE window %r took no profile of its own: %s",
                        name,
                        w.profile.skipped,
                    )
                else:
                    logger.warning("FASTINFER_PROFILE window %r finished:\n%s", name, w.summary)
            except Exception:
                logger.exception("FASTINFER_PROFILE: could not finish the profile of %r", name)


def last_window_summary(name: str = "serve") -> ProfileSummary | None:
    """The summary of :func:`maybe_profile`'s finished window ``name`` (None if not finished)."""
    w = _windows.get(name)
    return w.summary if w is not None else None


def reset_windows() -> None:
    """Forget :func:`maybe_profile` windows so that the next calls profile again (tests, REPL)."""
    with _windows_lock:
        _windows.clear()

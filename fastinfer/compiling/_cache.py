"""A persistent, environment-checked Inductor compile cache that can be shipped as a bundle.

:class:`InductorCache` points torch's FX-graph and AOTAutograd caches at a folder you choose
(never the default in the temporary directory, which a restart wipes), writes a compatibility
manifest into it (torch, exact Python, CPU ISA, threads, C++ compiler, GPU/CUDA/Triton, inductor
settings, a tag) and refuses a folder built for another environment with
:class:`~fastinfer.CacheMismatchError`: a CPU cache reused on a machine with another vector ISA is
a silent cache hit with wrong outputs. ``export``/``import_`` pack the whole folder (compiled C++
libraries included) into a tar bundle, published atomically.

Under faults: a damaged manifest is reported as corrupt and ``on_mismatch="replace"`` rebuilds the
folder; a cached module that fails to load is removed and compiled again
(:mod:`._cache_files`); a read-only folder is used as a prebuilt cache through a scratch overlay.

    >>> with InductorCache("/var/cache/fastinfer", tag="bert-v3") as cache:
    ...     compiled = fastinfer.compile_model(model, example_inputs, cache=cache)
    ...     cache.export("bert-v3.tar")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastinfer import _env, _torch_compat
from fastinfer._common.export import counter, gauge
from fastinfer._common.files import atomic_write_json
from fastinfer.compiling._cache_bundle import export_bundle, import_bundle
from fastinfer.compiling._cache_files import (
    COMPILE_LOCK_FILE,
    LOCK_FILE,
    MANIFEST,
    build_overlay,
    flock,
    wipe,
    writable,
)
from fastinfer.compiling._manifest import (
    cache_counters,
    environment_manifest,
    manifest_diff,
    manifest_problem,
    mismatch_message,
)
from fastinfer.errors import CacheMismatchError, ConfigError

__all__ = ["MANIFEST", "CacheStatistics", "InductorCache"]

COMPILE_CACHE = "fastinfer_compile_cache_total"

logger = logging.getLogger("fastinfer.compiling")

_INDUCTOR_SUBDIR = "inductor"
_ISA_PROBE = "isa-probe.json"
_FORMAT = 1

# Env and config this class changes inside ``with``; everything is restored on exit.
_ENV_KEYS = (
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE",
    "TRITON_CACHE_DIR",
)


# folder -> (thread holding its compile lock in this process, depth), for re-entrancy
_held: dict[str, tuple[int, int]] = {}
_held_mutex = threading.Lock()


@dataclass(frozen=True)
class CacheStatistics:
    """Counts while this cache was active (maps to ``fastinfer_compile_cache_total{result}``)."""

    cache_hits: int = counter(standard=COMPILE_CACHE, labels={"result": "hit"})
    cache_misses: int = counter(standard=COMPILE_CACHE, labels={"result": "miss"})
    cache_bypasses: int = counter(standard=COMPILE_CACHE, labels={"result": "bypass"})
    aot_autograd_hits: int = gauge()
    aot_autograd_misses: int = gauge()
    lock_waits: int = gauge()
    lock_wait_seconds: float = gauge()
    active: bool = gauge()
    repairs: int = counter()  # cached files removed because they failed to load
    read_only: bool = gauge()  # used as a read-only prebuilt cache (through a scratch overlay)


def _cache_path(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute; refused when no compile could work in it."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # "~nouser/x": no such user's home
        raise ConfigError(
            f"compile cache path {os.fspath(path)!r} cannot be expanded ({exc}); pass an absolute "
            "path (or set FASTINFER_CACHE_DIR to one)"
        ) from None
    if any(c.isspace() for c in str(resolved)):
        # torch puts cache paths into the C++ compiler's command line unquoted: every compile
        # fails there (g++: "input file ... is the same as output file").
        raise ConfigError(
            f"compile cache path {str(resolved)!r} contains whitespace, and torch passes cache "
            "paths to the C++ compiler unquoted, so no compile can work in it. Fix: use a path "
            "without spaces (e.g. /var/cache/fastinfer), or set FASTINFER_CACHE_DIR to one"
        )
    return resolved


class InductorCache:
    """A context manager that points torch's compile caches at ``path`` for the ``with`` block.

    Inside the block ``TORCHINDUCTOR_CACHE_DIR`` is ``path/inductor``, the FX-graph and AOTAutograd
    caches are on (``TORCHINDUCTOR_FX_GRAPH_CACHE=1``, ``TORCHINDUCTOR_AUTOGRAD_CACHE=1``, and the
    matching inductor/functorch config), and ``TRITON_CACHE_DIR`` is ``path/triton``; all of it is
    restored on exit. ``path`` defaults to ``$FASTINFER_CACHE_DIR``.

    Entering checks ``path``'s manifest against this environment and raises
    :class:`~fastinfer.CacheMismatchError` naming the fields that differ, or saying the manifest is
    corrupt (``on_mismatch="replace"`` wipes and rebuilds the folder instead). A cached module that
    fails to load while ``compile_model`` compiles is removed and compiled again (counted in
    ``statistics().repairs``); :meth:`clear` removes every compiled artifact.

    A folder this process cannot write (a prebuilt cache baked into a read-only image) is used as
    is: its manifest must exist and match, no lock is taken, and inductor runs on a scratch overlay
    in the temporary directory that links every cached file, so hits load the prebuilt code and
    anything compiled anew goes to the overlay and is dropped on exit (``statistics().read_only``).
    Not re-entrant; one ``with`` at a time per object.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        tag: str | None = None,
        on_mismatch: Literal["error", "replace"] = "error",
        lock_timeout: float | None = 600.0,
    ) -> None:
        if path is None:
            path = _env.get("FASTINFER_CACHE_DIR")
            if not path:
                raise ConfigError(
                    "InductorCache needs a path: pass one or set FASTINFER_CACHE_DIR to a persistent "
                    "folder (not the temporary directory, which a restart wipes)"
                )
        elif not os.fspath(path):
            # Path("") is the working directory: a cache there would fill whatever folder the
            # service happens to start in.
            raise ConfigError(
                "InductorCache got an empty path; pass a persistent folder (or None to use "
                "FASTINFER_CACHE_DIR)"
            )
        if on_mismatch not in ("error", "replace"):
            raise ConfigError(f"on_mismatch must be 'error' or 'replace', got {on_mismatch!r}")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise ConfigError(f"tag must be a non-empty string or None, got {tag!r}")
        self.path = _cache_path(path)
        self.tag = tag
        self.on_mismatch = on_mismatch
        self.lock_timeout = lock_timeout
        self._saved: dict[str, Any] | None = None
        self._base: tuple[int, ...] | None = None
        self._totals = [0, 0, 0, 0, 0]
        self._lock_waits = 0
        self._lock_wait_s = 0.0
        self._repairs = 0
        self._read_only = False
        self._overlay: Path | None = None
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"InductorCache({str(self.path)!r}, tag={self.tag!r})"

    @property
    def inductor_dir(self) -> Path:
        return self.path / _INDUCTOR_SUBDIR

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def read_only(self) -> bool:
        """Whether this process cannot write ``path`` (used as a prebuilt cache, see the class)."""
        if self.active:
            return self._read_only
        return self.path.exists() and not writable(self.path)

    def manifest(self) -> dict[str, Any] | None:
        """The manifest stored in ``path`` (None when the folder has none yet).

        Raises :class:`CacheMismatchError` when it is corrupt: empty, cut short, ``null``, not an
        object, or missing fields.
        """
        try:
            text = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheMismatchError(
                f"compile cache manifest {self.manifest_path} cannot be read ({exc}). Fix: make it "
                f"readable, or delete {self.path} or pass on_mismatch='replace' to rebuild the cache"
            ) from None
        doc, problem = manifest_problem(text)
        if problem is not None:
            raise CacheMismatchError(
                f"compile cache manifest {self.manifest_path} {problem}: the cache is corrupt (a "
                "write cut short, a full disk, a hand edit). Fix: pass on_mismatch='replace' to "
                f"rebuild it, or delete {self.path}"
            )
        return doc

    def check(self) -> dict[str, Any]:
        """Validate (or create) the manifest for this environment; returns the manifest."""
        here = environment_manifest(tag=self.tag)
        if self.path.exists() and not writable(self.path):
            self._check_prebuilt(here)
            return here
        try:
            self._check_writable(here)
        except OSError as exc:  # a full disk, a folder where a file belongs
            raise ConfigError(
                f"cannot set up the compile cache {self.path}: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if exc.filename else ''}. Fix: free space on that "
                "filesystem, remove what is in the way, or pass another path"
            ) from None
        return here

    def _check_writable(self, here: dict[str, Any]) -> None:
        with flock(self.path / LOCK_FILE, timeout=self.lock_timeout, what=str(self.path)):
            try:
                built = self.manifest()
            except CacheMismatchError as exc:
                if self.on_mismatch == "error":
                    raise
                logger.warning("replacing compile cache %s: %s", self, exc)
                built, diff = None, {}
                self._wipe()
            else:
                diff = manifest_diff(built, here) if built is not None else {}
            if diff:
                if self.on_mismatch == "error":
                    raise CacheMismatchError(mismatch_message(f"compile cache {self.path}", diff))
                logger.warning("replacing compile cache %s built for another environment", self)
                self._wipe()
                built = None
            if built is None:
                if self.manifest_path.is_dir() and not self.manifest_path.is_symlink():
                    shutil.rmtree(self.manifest_path)  # replacing: a folder where it belongs
                self.inductor_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.manifest_path, here)

    def _check_prebuilt(self, here: dict[str, Any]) -> None:
        """A folder we cannot write: usable only as a complete, matching prebuilt cache."""
        cannot = (
            f"compile cache {self.path} is read-only here, so on_mismatch='replace' cannot "
            "rebuild it. Fix: rebuild the prebuilt cache on a matching machine (fastinfer warm), "
            "or pass a writable path"
        )
        try:
            built = self.manifest()
        except CacheMismatchError as exc:
            raise CacheMismatchError(
                f"{exc}. {cannot}" if self.on_mismatch == "replace" else str(exc)
            ) from None
        if built is None:
            raise ConfigError(
                f"compile cache {self.path} is read-only here and holds no fastinfer cache (no "
                f"{MANIFEST}): a read-only folder can only be a prebuilt cache. Fix: build the cache "
                "where it is writable before making it read-only (fastinfer warm, or "
                "InductorCache.export then import_), or pass a writable path"
            )
        if diff := manifest_diff(built, here):
            message = mismatch_message(f"compile cache {self.path}", diff)
            raise CacheMismatchError(
                f"{message}. {cannot}" if self.on_mismatch == "replace" else message
            )

    def _wipe(self) -> None:
        wipe(self.path, (_ISA_PROBE,))

    def clear(self) -> None:
        """Remove every compiled artifact in the folder (the manifest stays), under its lock.

        The repair for a cache whose entries keep failing to load; the next compile starts cold.
        """
        if not writable(self.path):
            raise ConfigError(f"cannot clear compile cache {self.path}: it is read-only here")
        with flock(self.path / LOCK_FILE, timeout=self.lock_timeout, what=str(self.path)):
            self._wipe()
            self.inductor_dir.mkdir(parents=True, exist_ok=True)
        if self.active:
            _torch_compat.inductor_clear_caches()

    def effective_dirs(self) -> tuple[str, str]:
        """The inductor and triton folders torch uses while this cache is active (the overlay's
        for a read-only cache)."""
        base = self._overlay if self._overlay is not None else self.path
        return str(base / _INDUCTOR_SUBDIR), str(base / "triton")

    def repair_advice(
        self, name: str, exc: BaseException, *, tried: list[str], why: str | None = None
    ) -> str:
        """A CompileError message for a compile that fails on ``name``, a file of this cache."""
        cause = f"{type(exc).__name__}: {str(exc).strip()[:600]}"
        done = f" after removing {len(tried)} cached file(s) that failed to load" if tried else ""
        if self._read_only:
            fix = (
                "the prebuilt cache is read-only here: rebuild it (fastinfer warm) or delete the "
                "file from the image"
            )
        else:
            fix = (
                f"call InductorCache({str(self.path)!r}).clear() or delete {self.path} (as a user "
                "allowed to write it); the next compile rebuilds what it needs"
            )
        removal = f" (it could not be removed: {why})" if why else ""
        return (
            f"compiling failed{done} on {name}{removal}, a file of the compile cache {self.path}: "
            f"the cached module is corrupt. Fix: {fix}. Cause: {cause}"
        )

    def _record_repair(self) -> None:
        with self._mutex:
            self._repairs += 1

    # -- the context manager -------------------------------------------------------------------

    def __enter__(self) -> InductorCache:
        if self._saved is not None:
            raise ConfigError(f"{self!r} is already active; it is not re-entrant")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the compile cache folder {self.path} ({exc.strerror or exc}); pass "
                "a writable path, or a folder that already holds a prebuilt cache"
            ) from None
        try:
            self._enter()
        except BaseException:
            # Nothing half-entered is left behind: environment, config and overlay restored.
            if self._saved is not None:
                self.close()
            elif self._overlay is not None:
                shutil.rmtree(self._overlay, ignore_errors=True)
                self._overlay = None
            raise
        return self

    def _enter(self) -> None:
        self.check()
        self._read_only = not writable(self.path)
        if self._read_only:
            self._overlay = self._make_overlay()
        inductor_config = _torch_compat.inductor_config()
        functorch_config = _torch_compat.functorch_config()

        self._saved = {
            "env": {k: os.environ.get(k) for k in _ENV_KEYS},
            "fx_graph_cache": inductor_config.fx_graph_cache,
            "autograd_cache": functorch_config.enable_autograd_cache,
        }
        inductor_dir, triton_dir = self.effective_dirs()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
        os.environ["TRITON_CACHE_DIR"] = triton_dir
        inductor_config.fx_graph_cache = True
        functorch_config.enable_autograd_cache = True
        _torch_compat.inductor_clear_caches()  # in-memory caches may point into the previous folder
        self._replay_isa_probe()
        self._base = cache_counters()

    def _make_overlay(self) -> Path:
        try:
            overlay = Path(tempfile.mkdtemp(prefix="fastinfer-cache-overlay-"))
        except OSError as exc:
            raise ConfigError(
                f"compile cache {self.path} is read-only here, and using it needs a writable "
                f"scratch folder in the temporary directory ({exc}); set TMPDIR to a writable folder"
            ) from None
        if any(c.isspace() for c in str(overlay)):
            shutil.rmtree(overlay, ignore_errors=True)
            raise ConfigError(
                f"compile cache {self.path} is read-only here, and its scratch folder {overlay} "
                "contains whitespace, which the C++ compiler's command line cannot take. Fix: set "
                "TMPDIR to a writable folder without spaces"
            )
        try:
            linked = build_overlay(self.path, overlay)
        except BaseException:
            shutil.rmtree(overlay, ignore_errors=True)
            raise
        logger.info(
            "compile cache %s is read-only here: using its %d files as a prebuilt cache; anything "
            "compiled anew goes to %s and is dropped on exit",
            self.path,
            linked,
            overlay,
        )
        return overlay

    def _replay_isa_probe(self) -> None:
        """Run inductor's CPU ISA probe once per process, replaying a recorded outcome.

        Inductor decides which vector ISAs to generate code for by compiling test programs into
        the cache folder and ``dlopen``-ing each in a child Python (seconds, every process). The
        compiled test programs live in this folder, keyed by code, flags and compiler; their load
        outcome is recorded in ``isa-probe.json`` and replayed when this folder (same manifest:
        CPU ISA, compiler, torch) is used again, so a warm start skips the child processes.
        """
        isa = _torch_compat.inductor_cpu_vec_isa()
        if isa is None:  # pragma: no cover
            return
        listing = getattr(isa, "valid_vec_isa_list", None)
        original = getattr(getattr(isa, "VecISA", None), "_probe_load", None)
        if listing is None or original is None or not hasattr(listing, "cache_info"):
            return
        if listing.cache_info().currsize:  # already probed in this process
            return
        record = self.path / _ISA_PROBE
        try:
            doc = json.loads(record.read_text())
        except (OSError, ValueError, RecursionError):
            doc = None
        # A damaged record (not an object of booleans) is ignored and written again.
        known: dict[str, bool] = {
            k: v for k, v in (doc if isinstance(doc, dict) else {}).items() if isinstance(v, bool)
        }
        damaged = record.exists() and (not isinstance(doc, dict) or len(known) != len(doc))
        seen: dict[str, bool] = {}

        def probe(vec_isa: Any, output_path: str) -> bool:
            key = os.path.basename(output_path)
            if key in known and os.path.isfile(output_path):
                ok = bool(known[key])
            else:
                ok = bool(original(vec_isa, output_path))
            seen[key] = ok
            return ok

        isa.VecISA._probe_load = probe  # type: ignore[method-assign,assignment]
        try:
            isa.pick_vec_isa()
        except Exception as exc:  # the real compile will report it with its cause
            logger.debug("CPU ISA probe failed: %s", exc)
            return
        finally:
            isa.VecISA._probe_load = original  # type: ignore[method-assign]
        if seen and ({**known, **seen} != known or damaged):
            with contextlib.suppress(OSError):
                atomic_write_json(record, {**known, **seen})

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore the environment and config saved on entry (``__exit__`` calls it)."""
        if self._saved is None:
            return
        inductor_config = _torch_compat.inductor_config()
        functorch_config = _torch_compat.functorch_config()

        self._accumulate()
        saved, self._saved = self._saved, None
        for key, value in saved["env"].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        inductor_config.fx_graph_cache = saved["fx_graph_cache"]
        functorch_config.enable_autograd_cache = saved["autograd_cache"]
        _torch_compat.inductor_clear_caches()
        if self._overlay is not None:  # loaded modules and libraries stay loaded
            shutil.rmtree(self._overlay, ignore_errors=True)
            self._overlay = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def _accumulate(self) -> None:
        if self._base is None:
            return
        now = cache_counters()
        for i, (a, b) in enumerate(zip(now, self._base)):
            self._totals[i] += a - b
        self._base = now if self._saved is not None else None

    # -- one compiles, the others wait ---------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the folder's compile lock: the first process compiles, the others wait then load.

        Re-entrant within a thread (``export`` inside ``exclusive`` does not deadlock). Raises
        :class:`CacheLockTimeout` after ``timeout`` seconds (default: ``lock_timeout``). A read-only
        cache takes no lock: nothing is written to it.
        """
        if self.read_only:
            yield
            return
        key, me = str(self.path), threading.get_ident()
        with _held_mutex:
            owner = _held.get(key)
            if owner is not None and owner[0] == me:
                _held[key] = (me, owner[1] + 1)
                reentered = True
            else:
                reentered = False
        if reentered:
            try:
                yield
            finally:
                with _held_mutex:
                    _held[key] = (me, _held[key][1] - 1)
            return
        wait = self.lock_timeout if timeout is None else timeout
        lock = self.path / COMPILE_LOCK_FILE
        with flock(lock, timeout=wait, what=f"compiling into {self.path}") as waited:
            with self._mutex:
                if waited > 0.01:
                    self._lock_waits += 1
                self._lock_wait_s += waited
            with _held_mutex:
                _held[key] = (me, 1)
            try:
                yield
            finally:
                with _held_mutex:
                    _held.pop(key, None)

    # -- bundles -------------------------------------------------------------------------------

    def export(self, bundle_path: str | os.PathLike[str]) -> Path:
        """Pack the whole cache folder (manifest, FX graphs, compiled libraries) into a tar file.

        Written to a temporary name next to ``bundle_path`` and renamed, so readers never see a
        partial bundle.
        """
        return export_bundle(self, bundle_path)

    @classmethod
    def import_(
        cls,
        bundle_path: str | os.PathLike[str],
        dest: str | os.PathLike[str] | None = None,
        *,
        tag: str | None = None,
    ) -> InductorCache:
        """Unpack a bundle into ``dest`` (default ``$FASTINFER_CACHE_DIR``) and return its cache.

        The bundle's manifest is checked against this environment first
        (:class:`~fastinfer.CacheMismatchError`). The folder is unpacked next to ``dest`` and
        renamed into place, under a lock, so concurrent importers are safe; an already imported,
        matching ``dest`` is reused. A damaged bundle or a read-only ``dest`` is a
        :class:`~fastinfer.ConfigError`.
        """
        return import_bundle(cls(dest, tag=tag), bundle_path, tag=tag)

    def statistics(self) -> CacheStatistics:
        """FX-graph hits/misses/bypasses and AOTAutograd hits/misses counted while active."""
        with self._mutex:
            if self._saved is not None:
                self._accumulate()
            t = self._totals
            return CacheStatistics(
                cache_hits=t[0],
                cache_misses=t[1],
                cache_bypasses=t[2],
                aot_autograd_hits=t[3],
                aot_autograd_misses=t[4],
                lock_waits=self._lock_waits,
                lock_wait_seconds=self._lock_wait_s,
                active=self._saved is not None,
                repairs=self._repairs,
                read_only=self.read_only,
            )

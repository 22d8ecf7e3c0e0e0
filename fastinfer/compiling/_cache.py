"""A persistent, environment-checked Inductor compile cache that can be shipped as a bundle.

:class:`InductorCache` points torch's FX-graph and AOTAutograd caches at a folder you choose
(never the default in the temporary directory, which a restart wipes), writes a compatibility
manifest into it (torch, exact Python, CPU ISA, threads, C++ compiler, GPU/CUDA/Triton, inductor
settings, a tag) and refuses a folder built for another environment with
:class:`~fastinfer.CacheMismatchError`: a CPU cache reused on a machine with another vector ISA is
a silent cache hit with wrong outputs. ``export``/``import_`` pack the whole folder (compiled C++
libraries included) into a tar bundle, published atomically.

    >>> with InductorCache("/var/cache/fastinfer", tag="bert-v3") as cache:
    ...     compiled = fastinfer.compile_model(model, example_inputs, cache=cache)
    ...     cache.export("bert-v3.tar")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastinfer import _env, _torch_compat
from fastinfer._common.export import counter, gauge
from fastinfer._common.files import atomic_path, atomic_write_json
from fastinfer.compiling._manifest import (
    cache_counters,
    environment_manifest,
    manifest_diff,
    mismatch_message,
)
from fastinfer.errors import CacheLockTimeout, CacheMismatchError, ConfigError

if TYPE_CHECKING:
    import tarfile

__all__ = ["MANIFEST", "CacheStatistics", "InductorCache"]

COMPILE_CACHE = "fastinfer_compile_cache_total"

logger = logging.getLogger("fastinfer.compiling")

MANIFEST = "fastinfer-cache.json"
_INDUCTOR_SUBDIR = "inductor"
_LOCK_FILE = ".fastinfer.lock"
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


@contextlib.contextmanager
def _flock(path: Path, *, timeout: float | None, what: str) -> Iterator[float]:
    """An exclusive ``flock`` on ``path``; yields how long it waited."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


class InductorCache:
    """A context manager that points torch's compile caches at ``path`` for the ``with`` block.

    Inside the block ``TORCHINDUCTOR_CACHE_DIR`` is ``path/inductor``, the FX-graph and AOTAutograd
    caches are on (``TORCHINDUCTOR_FX_GRAPH_CACHE=1``, ``TORCHINDUCTOR_AUTOGRAD_CACHE=1``, and the
    matching inductor/functorch config), and ``TRITON_CACHE_DIR`` is ``path/triton``; all of it is
    restored on exit. ``path`` defaults to ``$FASTINFER_CACHE_DIR``.

    Entering checks ``path``'s manifest against this environment and raises
    :class:`~fastinfer.CacheMismatchError` naming the fields that differ (``on_mismatch="replace"``
    wipes the folder instead). Not re-entrant; one ``with`` at a time per object.
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
        if on_mismatch not in ("error", "replace"):
            raise ConfigError(f"on_mismatch must be 'error' or 'replace', got {on_mismatch!r}")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise ConfigError(f"tag must be a non-empty string or None, got {tag!r}")
        self.path = Path(path).expanduser().resolve()
        self.tag = tag
        self.on_mismatch = on_mismatch
        self.lock_timeout = lock_timeout
        self._saved: dict[str, Any] | None = None
        self._base: tuple[int, ...] | None = None
        self._totals = [0, 0, 0, 0, 0]
        self._lock_waits = 0
        self._lock_wait_s = 0.0
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"InductorCache({str(self.path)!r}, tag={self.tag!r})"

    @property
    def inductor_dir(self) -> Path:
        return self.path / _INDUCTOR_SUBDIR

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        """The manifest stored in ``path`` (None when the folder has none yet)."""
        try:
            return dict(json.loads(self.manifest_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CacheMismatchError(
                f"cache manifest {self.manifest_path} is unreadable ({exc}); delete the folder or "
                "pass on_mismatch='replace'"
            ) from exc

    def check(self) -> dict[str, Any]:
        """Validate (or create) the manifest for this environment; returns the manifest."""
        here = environment_manifest(tag=self.tag)
        with _flock(self.path / _LOCK_FILE, timeout=self.lock_timeout, what=str(self.path)):
            built = self.manifest()
            if built is not None and (diff := manifest_diff(built, here)):
                if self.on_mismatch == "error":
                    raise CacheMismatchError(mismatch_message(f"compile cache {self.path}", diff))
                logger.warning("replacing compile cache %s built for another environment", self)
                shutil.rmtree(self.inductor_dir, ignore_errors=True)
                shutil.rmtree(self.path / "triton", ignore_errors=True)
                built = None
            if built is None:
                self.inductor_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.manifest_path, here)
        return here

    # -- the context manager -------------------------------------------------------------------

    def __enter__(self) -> InductorCache:
        if self._saved is not None:
            raise ConfigError(f"{self!r} is already active; it is not re-entrant")
        self.path.mkdir(parents=True, exist_ok=True)
        self.check()
        inductor_config = _torch_compat.inductor_config()
        functorch_config = _torch_compat.functorch_config()

        self._saved = {
            "env": {k: os.environ.get(k) for k in _ENV_KEYS},
            "fx_graph_cache": inductor_config.fx_graph_cache,
            "autograd_cache": functorch_config.enable_autograd_cache,
        }
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.inductor_dir)
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
        os.environ["TRITON_CACHE_DIR"] = str(self.path / "triton")
        inductor_config.fx_graph_cache = True
        functorch_config.enable_autograd_cache = True
        _torch_compat.inductor_clear_caches()  # in-memory caches may point into the previous folder
        self._replay_isa_probe()
        self._base = cache_counters()
        return self

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
            known: dict[str, bool] = json.loads(record.read_text())
        except (OSError, ValueError):
            known = {}
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
        if seen and {**known, **seen} != known:
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
        :class:`CacheLockTimeout` after ``timeout`` seconds (default: ``lock_timeout``).
        """
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
        lock = self.path / ".compile.lock"
        with _flock(lock, timeout=wait, what=f"compiling into {self.path}") as waited:
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
        if self.manifest() is None:
            raise ConfigError(f"{self.path} holds no fastinfer cache yet: compile into it first")
        import tarfile

        bundle = Path(bundle_path).expanduser().resolve()
        skip = {_LOCK_FILE, ".compile.lock"}
        with atomic_path(bundle) as tmp, self.exclusive(), tarfile.open(tmp, "w") as tar:
            for child in sorted(self.path.iterdir()):
                if child.name in skip:
                    continue
                tar.add(child, arcname=child.name, filter=_no_locks)
        return bundle

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
        matching ``dest`` is reused.
        """
        import tarfile

        bundle = Path(bundle_path).expanduser()
        if not bundle.is_file():
            raise ConfigError(f"cache bundle {bundle} does not exist")
        target = cls(dest, tag=tag)  # resolves the default path and validates arguments
        try:
            with tarfile.open(bundle) as tar:
                member = tar.extractfile(MANIFEST)
                built = json.loads(member.read()) if member else None
        except (tarfile.TarError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"{bundle} is not a fastinfer cache bundle ({exc}); make one with "
                "InductorCache.export or `fastinfer warm --bundle`"
            ) from exc
        if built is None:
            raise ConfigError(f"{bundle} has no {MANIFEST}: not a fastinfer cache bundle")
        if tag is None:
            target.tag = built.get("tag")
        here = environment_manifest(tag=target.tag)
        if diff := manifest_diff(built, here):
            raise CacheMismatchError(mismatch_message(f"cache bundle {bundle}", diff))
        path = target.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with _flock(path.parent / f".{path.name}.import.lock", timeout=600, what=f"import {path}"):
            if path.exists() and any(path.iterdir()):
                existing = target.manifest()
                if existing is None or manifest_diff(existing, here):
                    raise CacheMismatchError(
                        f"cannot import {bundle} into {path}: the folder holds another cache; "
                        "import into an empty folder"
                    )
                _merge_bundle(bundle, path)
                return target
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.import."))
            try:
                with tarfile.open(bundle) as tar:
                    _extract(tar, tmp)
                if path.exists():
                    path.rmdir()  # empty (checked above)
                os.rename(tmp, path)  # atomic publish
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return target

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
            )


def _no_locks(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = os.path.basename(info.name)
    return None if name.endswith(".lock") or name == "locks" else info


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    import tarfile

    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
    else:  # pragma: no cover - Python without PEP 706
        for m in tar.getmembers():
            if m.name.startswith("/") or ".." in Path(m.name).parts:
                raise ConfigError(f"unsafe path {m.name!r} in cache bundle")
        tar.extractall(dest)


def _merge_bundle(bundle: Path, path: Path) -> None:
    """Copy a bundle's entries into an existing matching cache (each file renamed into place)."""
    import tarfile

    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.merge."))
    try:
        with tarfile.open(bundle) as tar:
            _extract(tar, tmp)
        for src in sorted(tmp.rglob("*")):
            rel = src.relative_to(tmp)
            dst = path / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            elif not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

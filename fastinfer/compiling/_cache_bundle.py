"""InductorCache bundles: pack a cache folder into a tar file and unpack one in place (private).

The whole folder (manifest, FX graphs, compiled libraries) goes into the tar; lock files never do.
A bundle is published atomically (temp name, rename); importing checks its manifest against this
environment, unpacks beside the destination and renames it into place under a lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fastinfer._common.files import atomic_path, writable_target
from fastinfer.compiling._cache_files import (
    COMPILE_LOCK_FILE,
    LOCK_FILE,
    MANIFEST,
    flock,
    writable,
)
from fastinfer.compiling._manifest import (
    environment_manifest,
    manifest_diff,
    manifest_problem,
    mismatch_message,
)
from fastinfer.errors import CacheMismatchError, ConfigError

if TYPE_CHECKING:
    import tarfile

    from fastinfer.compiling._cache import InductorCache

__all__ = ["export_bundle", "import_bundle"]

_NOT_A_BUNDLE = "make one with InductorCache.export or `fastinfer warm --bundle`"


def export_bundle(cache: InductorCache, bundle_path: str | os.PathLike[str]) -> Path:
    if cache.manifest() is None:
        raise ConfigError(f"{cache.path} holds no fastinfer cache yet: compile into it first")
    import tarfile

    bundle = writable_target(bundle_path, what="cache bundle", example="cache.tar")
    skip = {LOCK_FILE, COMPILE_LOCK_FILE}
    try:
        with atomic_path(bundle) as tmp, cache.exclusive(), tarfile.open(tmp, "w") as tar:
            for child in sorted(cache.path.iterdir()):
                if child.name in skip:
                    continue
                tar.add(child, arcname=child.name, filter=_no_locks)
    except OSError as exc:  # a full disk, an unreadable cached file; no partial bundle is left
        raise ConfigError(
            f"writing cache bundle {bundle} from {cache.path} failed ({exc.strerror or exc}"
            f"{f': {exc.filename}' if exc.filename else ''}). Fix: free space where the bundle "
            "goes, or pass another path"
        ) from None
    return bundle


def import_bundle(
    target: InductorCache, bundle_path: str | os.PathLike[str], *, tag: str | None
) -> InductorCache:
    import tarfile

    bundle = Path(bundle_path).expanduser()
    if not bundle.is_file():
        raise ConfigError(f"cache bundle {bundle} does not exist")
    try:
        with tarfile.open(bundle) as tar:
            member = tar.extractfile(MANIFEST)
            raw = member.read() if member else None
    except (tarfile.TarError, KeyError, ValueError, OSError) as exc:
        raise ConfigError(
            f"{bundle} is not a fastinfer cache bundle ({exc}); {_NOT_A_BUNDLE}"
        ) from exc
    if raw is None:
        raise ConfigError(f"{bundle} has no {MANIFEST}: not a fastinfer cache bundle")
    built, problem = manifest_problem(raw)
    if built is None:
        raise ConfigError(
            f"the {MANIFEST} in cache bundle {bundle} {problem}: the bundle is damaged; "
            f"{_NOT_A_BUNDLE}"
        )
    if tag is None:
        target.tag = built.get("tag")
    here = environment_manifest(tag=target.tag)
    if diff := manifest_diff(built, here):
        raise CacheMismatchError(mismatch_message(f"cache bundle {bundle}", diff))
    path = target.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot import {bundle} into {path}: {exc.strerror or exc}") from None
    if not writable(path.parent) or (path.exists() and not writable(path)):
        raise ConfigError(
            f"cannot import {bundle} into {path}: the folder is read-only here; import into a "
            "writable folder (a read-only copy of it can then be used as a prebuilt cache)"
        )
    with flock(path.parent / f".{path.name}.import.lock", timeout=600, what=f"import {path}"):
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
                _extract(tar, tmp, bundle)
            if path.exists():
                path.rmdir()  # empty (checked above)
            os.rename(tmp, path)  # atomic publish
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _no_locks(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = os.path.basename(info.name)
    return None if name.endswith(".lock") or name == "locks" else info


def _extract(tar: tarfile.TarFile, dest: Path, bundle: Path) -> None:
    """Unpack into ``dest``: nothing outside it, no links out, no device files (tarfile's
    ``data`` filter); a bundle that tries is refused with :class:`ConfigError`."""
    import tarfile

    try:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python without PEP 706
            for m in tar.getmembers():
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise ConfigError(f"unsafe path {m.name!r} in cache bundle {bundle}")
            tar.extractall(dest)
    except (tarfile.TarError, EOFError) as exc:  # FilterError, a member cut short
        raise ConfigError(
            f"cache bundle {bundle} cannot be unpacked: {exc} ({type(exc).__name__}; nothing was "
            "written outside the destination). The bundle is damaged or was not made by fastinfer; "
            f"{_NOT_A_BUNDLE}"
        ) from None
    except OSError as exc:  # a full disk
        raise ConfigError(
            f"unpacking cache bundle {bundle} into {dest.parent} failed ({exc.strerror or exc}). "
            "Fix: free space there, or import into another folder"
        ) from None


def _merge_bundle(bundle: Path, path: Path) -> None:
    """Copy a bundle's entries into an existing matching cache (each file renamed into place)."""
    import tarfile

    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.merge."))
    try:
        with tarfile.open(bundle) as tar:
            _extract(tar, tmp, bundle)
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

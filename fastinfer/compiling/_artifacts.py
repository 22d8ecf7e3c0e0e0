"""The cache of exported artefacts (ONNX files, ONNX Runtime-optimised graphs, OpenVINO IR).

Each artefact is a folder ``<root>/artifacts/<kind>-<key>/`` holding its files and a
``manifest.json`` (the key's document: the environment manifest, the model's structure and a
fingerprint of its weights, which an exported file embeds, the input spec, the tool versions) and
each file's size and sha256. It is built in a temporary folder beside it and renamed into place
(:func:`atomic_dir`): a second worker sees all of it or none of it. A folder whose manifest does
not match or cannot be read, or whose files are missing or not the size it records, is rebuilt
once. The sha256 is recorded, not checked on every use: hashing costs about a second per GB at
every start, and a file of the right size that is damaged fails to load (a ``CompileError``
naming the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastinfer._common.files import atomic_dir
from fastinfer._common.keys import digest
from fastinfer.errors import CompileError

__all__ = ["MANIFEST", "artifact"]

logger = logging.getLogger("fastinfer.compiling")

MANIFEST = "manifest.json"


def artifact(
    root: Path,
    kind: str,
    key_doc: Mapping[str, Any],
    build: Callable[[Path], None],
    failed: dict[tuple[str, str], str] | None = None,
) -> tuple[Path, bool]:
    """The folder of the ``kind`` artefact for ``key_doc`` under ``root``, built by
    ``build(folder)`` when missing: ``(folder, True when it came from the cache)``.

    A folder whose manifest does not match, cannot be read, or whose files are missing or differ
    from the sizes it records (a copy cut short) is removed and built again, with a warning; when the rebuilt folder is not sound either (it cannot be written or removed),
    ``CompileError`` says so and names the fix.

    ``failed`` (one per ``select_backend`` call) remembers builds that raised, so ONNX Runtime and
    OpenVINO, which share one export, do not attempt a failing export twice."""
    key = digest(dict(key_doc))
    if failed is not None and (kind, key) in failed:
        raise CompileError(f"{failed[(kind, key)]} (the same build failed for another candidate)")
    target = root / f"{kind}-{key[:32]}"
    damage = ""
    if target.exists() or target.is_symlink():
        damage = _damage(target, key)
        if not damage:
            return target, True
        logger.warning("rebuilding the %s artefact in %s: %s", kind, target, damage)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                target.unlink()
    try:
        with atomic_dir(target) as tmp:
            try:
                build(tmp)
            except CompileError as exc:
                if failed is not None:
                    failed[(kind, key)] = str(exc)
                raise
            doc = {"key": key, "kind": kind, **dict(key_doc), "files": _files(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(doc, indent=2, default=str))
    except OSError as exc:  # read-only, full, or a file where the folder goes
        msg = (
            f"could not build the {kind} artefact in {target} ({type(exc).__name__}: {exc}); "
            "if the folder is read-only or full, point cache_dir (FASTINFER_CACHE_DIR) at a "
            "writable folder with free space"
        )
        if failed is not None:
            failed[(kind, key)] = msg
        raise CompileError(msg) from exc
    # Another worker may have published its copy first (kept by atomic_dir), or a damaged folder
    # that could not be removed is still there: what is served must be sound.
    still = _damage(target, key)
    if still:
        was = f" (it was damaged: {damage})" if damage else ""
        raise CompileError(
            f"the {kind} artefact in {target} is damaged after rebuilding it{was}: {still}. "
            f"Fix: delete {target} and make sure cache_dir (FASTINFER_CACHE_DIR) is writable"
        )
    return target, False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()  # hashlib.file_digest is Python 3.11+
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    """Each file of an artefact (its manifest aside): its size and sha256, by relative path."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel != MANIFEST and p.is_file():
            out[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


def _damage(folder: Path, key: str) -> str:
    """Why the artefact in ``folder`` cannot be served ("" when it can): its manifest is missing,
    unreadable or for another key, or a file it lists is missing or not the size it records."""
    try:
        doc = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"its manifest is missing or unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if not isinstance(doc, dict):
        return f"its manifest is damaged (a JSON {type(doc).__name__}, not an object)"
    if doc.get("key") != key:
        return "its manifest does not match"
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest records no file sizes and checksums (written by an older fastinfer)"
    for rel, want in files.items():
        path = folder / rel
        if (
            not isinstance(want, dict)
            or Path(rel).is_absolute()
            or ".." in Path(rel).parts
            or not isinstance(want.get("size"), int)
        ):
            return f"its manifest's record of {rel!r} is damaged"
        try:
            size = path.stat().st_size
            if size != want["size"]:
                return f"{rel} has {size} bytes, its manifest records {want['size']} (cut short?)"
        except OSError as exc:
            return f"{rel} cannot be read ({type(exc).__name__}: {exc})"
    return ""

"""The cache of exported artefacts (ONNX files, ONNX Runtime-optimised graphs, OpenVINO IR).

Each artefact is a folder ``<root>/artifacts/<kind>-<key>/`` holding its files and a
``manifest.json`` (the key's document: the environment manifest, the model's structure and a
fingerprint of its weights, which an exported file embeds, the input spec, the tool versions). It
is built in a temporary folder beside it and renamed into place (:func:`atomic_dir`): a second
worker sees all of it or none of it. A folder whose manifest does not match is rebuilt.
"""

from __future__ import annotations

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

    ``failed`` (one per ``select_backend`` call) remembers builds that raised, so ONNX Runtime and
    OpenVINO, which share one export, do not attempt a failing export twice."""
    key = digest(dict(key_doc))
    if failed is not None and (kind, key) in failed:
        raise CompileError(f"{failed[(kind, key)]} (the same build failed for another candidate)")
    target = root / f"{kind}-{key[:32]}"
    manifest = target / MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("key") == key:
                return target, True
        except (OSError, ValueError):
            pass
        logger.warning(
            "rebuilding the %s artefact in %s: its manifest does not match", kind, target
        )
        shutil.rmtree(target, ignore_errors=True)
    with atomic_dir(target) as tmp:
        try:
            build(tmp)
        except CompileError as exc:
            if failed is not None:
                failed[(kind, key)] = str(exc)
            raise
        (tmp / MANIFEST).write_text(
            json.dumps({"key": key, "kind": kind, **dict(key_doc)}, indent=2, default=str)
        )
    return target, False

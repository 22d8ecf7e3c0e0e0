"""The attention decision cache: a measured choice, reused by a restart or a second worker.

A decision lives in ``<cache_dir>/decisions/attention-<key>.json`` (``cache_dir`` defaults to
``$FASTINFER_CACHE_DIR``; with neither, nothing is cached), written atomically. The key covers:

* the model's structure, not its weights' values (:func:`fastinfer._common.keys.structure_key`),
  the transformers version for Hugging Face models, and the attention package's own code;
* the input's shape class: batch and sequence length bucketed to a power of two, the padding
  fraction to a quarter, dtype and device (:func:`fastinfer._common.keys.shape_class`);
* the options that change the answer (``prefer``, ``verify``, ``rtol``/``atol``) and the grad mode;
* the environment manifest (torch, Python, CPU ISA, threads, GPU; eager scope).

The record also stores the full manifest, and a record whose manifest differs from this
environment is refused (logged, and measured again), so a decision copied from another machine is
never reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfer import _env
from fastinfer._common.files import atomic_write_json
from fastinfer._common.keys import digest, shape_class, structure_key
from fastinfer._common.manifest import flat_diff, manifest_diff
from fastinfer.attention._outputs import valid_mask
from fastinfer.attention._types import REGISTRY, PathResult

__all__ = ["FORMAT", "decision_key", "decisions_dir", "load", "store"]

logger = logging.getLogger("fastinfer.attention")

FORMAT = 1


def decisions_dir(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / "decisions"
    env = _env.get("FASTINFER_CACHE_DIR")
    return Path(env).expanduser() / "decisions" if env else None


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """The attention package's source: a new fastinfer (other kernels) is another decision."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def _named_tensors(inputs: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    elif isinstance(inputs, tuple | list):
        items = [(str(i), v) for i, v in enumerate(inputs)]
    else:
        items = [("0", inputs)]
    tensors = {k: v for k, v in items if isinstance(v, torch.Tensor)}
    others = [[k, repr(v)] for k, v in items if not isinstance(v, torch.Tensor)]
    return tensors, others


def decision_key(
    model: nn.Module,
    inputs: Any,
    *,
    prefer: list[str],
    verify: bool,
    rtol: float | None,
    atol: float | None,
    manifest: Mapping[str, Any],
) -> tuple[str, dict[str, Any]]:
    """``(key, the document it hashes)`` for a decision about ``model`` on inputs like ``inputs``."""
    valid = valid_mask(model, inputs)
    padding = 0.0 if valid is None else 1.0 - float(valid.float().mean())
    # which side the padding is on: torch's nested fastpath takes left-aligned masks only
    side = None
    if valid is not None and valid.dim() == 2 and valid.shape[1] > 0 and not bool(valid.all()):
        side = "left" if bool((~valid[:, 0] & valid[:, -1]).any()) else "right"
    tensors, others = _named_tensors(inputs)
    registered = sorted(
        f"{cls.__module__}.{cls.__qualname__}={getattr(fn, '__qualname__', repr(fn))}"
        for cls, fn in REGISTRY.items()
        if any(isinstance(m, cls) for m in model.modules())
    )
    transformers = sys.modules.get("transformers")
    shapes = shape_class(tensors, seq_dim=1 if valid is not None else None, padding=padding)
    doc = {
        "format": FORMAT,
        "model": structure_key(model),
        "code": _code_hash(),
        "transformers": getattr(transformers, "__version__", None) if transformers else None,
        "registered": registered,
        "inputs": [*shapes, *others],
        "padding_side": side,
        "grad": [torch.is_grad_enabled(), torch.is_inference_mode_enabled()],
        "prefer": prefer,
        "verify": verify,
        "tolerance": [rtol, atol],
        "environment": digest(dict(manifest)),
    }
    return digest(doc), doc


def _path(folder: Path, key: str) -> Path:
    return folder / f"attention-{key[:32]}.json"


def load(folder: Path, key: str, manifest: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The stored decision for ``key`` (None when there is none) and why one was refused."""
    path = _path(folder, key)
    if not path.is_file():
        return None, ""
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("key") != key:
            return None, f"ignored {path}: another format or key"
        diff = manifest_diff(doc["environment"], dict(manifest))
        if diff:
            fields = "; ".join(f"{k}: made for {a!r}, here {b!r}" for k, a, b in flat_diff(diff))
            why = (
                f"refused the cached attention decision {path}: it was made in another "
                f"environment ({fields}); measuring again"
            )
            logger.warning("%s", why)
            return None, why
        _check_record(doc)
        doc["paths"] = tuple(PathResult(**p) for p in doc["paths"])
        return doc, ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"ignored the unreadable attention decision {path}: {type(exc).__name__}: {exc}"
        logger.warning("%s", why)
        return None, why


def _check_record(doc: Any) -> None:
    """Raise ValueError unless ``doc`` has the fields a decision is read from, of their types
    (a file edited by hand, or written by something else, is measured again, never trusted)."""
    ok = (
        isinstance(doc.get("chosen"), str)
        and isinstance(doc.get("paths"), list)
        and all(isinstance(p, dict) for p in doc["paths"])
        and isinstance(doc.get("notes"), list)
        and all(isinstance(n, str) for n in doc["notes"])
        and (
            doc.get("measured_on") is None
            or (
                isinstance(doc["measured_on"], list)
                and len(doc["measured_on"]) == 2
                and all(type(v) is int for v in doc["measured_on"])
            )
        )
    )
    if not ok:
        raise ValueError("a field is missing or of the wrong type")


def store(
    folder: Path,
    key: str,
    key_doc: Mapping[str, Any],
    manifest: Mapping[str, Any],
    *,
    chosen: str,
    paths: tuple[PathResult, ...],
    notes: tuple[str, ...],
    measured_on: tuple[int, int] | None,
    selection_seconds: float,
) -> Path:
    path = _path(folder, key)
    atomic_write_json(
        path,
        {
            "format": FORMAT,
            "key": key,
            "key_doc": dict(key_doc),
            "environment": dict(manifest),
            "chosen": chosen,
            "paths": [asdict(p) for p in paths],
            "notes": list(notes),
            "measured_on": list(measured_on) if measured_on else None,
            "selection_seconds": selection_seconds,
        },
    )
    return path

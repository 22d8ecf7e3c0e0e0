"""Cache keys for measured decisions: a model's structure (not its weights) and a shape class.

A decision (which attention path, which backend) depends on what the model computes and on the
shapes it sees, not on the values of its weights: a restarted service, or a second worker that
loaded the same checkpoint, must find the decision without hashing hundreds of megabytes.
:func:`structure_key` hashes the module tree (each class's qualified name and source, the
``repr`` of the tree, parameter and buffer names with dtype, shape and device, an HF config)
and never a weight value. :func:`shape_class` buckets an input's shape so that nearby shapes share
a decision: batch and sequence length rounded up to a power of two, the padding fraction to a
quarter (exactly 0 is its own bucket), dtype and device kept exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "batch_bucket",
    "digest",
    "padding_bucket",
    "shape_class",
    "structure_key",
    "weights_fingerprint",
]

# Config keys that name where a model came from, not what it computes.
_CONFIG_NOISE = ("_name_or_path", "_commit_hash", "transformers_version")


def digest(doc: Any) -> str:
    """A stable sha256 of a JSON-able document (keys sorted; unknown objects via ``str``)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=512)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _class_source(cls: type) -> str:
    """A hash of the source file that defines ``cls`` (cached by path, mtime and size): cheaper
    than ``inspect.getsource``, which parses the whole module to find one class."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if not path:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return _file_hash(path, st.st_mtime_ns, st.st_size)


def structure_key(model: Any) -> str:
    """A hash of what ``model`` computes, without its weights' values.

    For an ``nn.Module``: every class in the tree (module, qualified name, a hash of the source
    file that defines it),
    the ``repr`` of the tree, each parameter's and buffer's name, dtype, shape and device, and a
    Hugging Face ``config`` (minus where it was loaded from). For any other callable: its type and
    qualified name.
    """
    from torch import nn

    h = hashlib.sha256()
    if not isinstance(model, nn.Module):
        cls = model if isinstance(model, type) else type(model)
        name = getattr(model, "__qualname__", None) or getattr(cls, "__qualname__", repr(cls))
        h.update(f"{getattr(model, '__module__', '')}:{name}".encode())
        return h.hexdigest()
    classes = {type(m) for m in model.modules()}
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update(f"{cls.__module__}.{cls.__qualname__}:{_class_source(cls)}\n".encode())
    h.update(repr(model).encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.device.type}\n".encode())
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        try:
            cfg = {k: v for k, v in to_dict().items() if k not in _CONFIG_NOISE}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        except Exception:  # a config that cannot be serialised: the repr above still counts
            pass
        h.update(str(getattr(config, "_attn_implementation", "")).encode())
    return h.hexdigest()


def weights_fingerprint(model: Any) -> str:
    """A sha256 over every parameter's and buffer's bytes (for artefacts that embed the weights,
    such as an exported ONNX file; a decision uses :func:`structure_key` instead). Buffers left
    out of the state dict (``persistent=False``: position ids, rotary tables, masks) count too:
    an export bakes them in as constants just the same."""
    import torch
    from torch import nn

    h = hashlib.sha256()
    if not isinstance(model, nn.Module):
        return h.hexdigest()
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update((f"buffer:{n}", b) for n, b in model.named_buffers() if b is not None)
    for name, value in sorted(tensors.items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))


def batch_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (1, 2, 4, 8, 16, 32, ...): the bucket a size falls in."""
    return _pow2(int(n))


def padding_bucket(fraction: float) -> str:
    """``"0"`` for no padding, else the quarter it falls in: ``"0-0.25"``, ..., ``"0.75-1"``."""
    if fraction <= 0.0:
        return "0"
    q = min(4, max(1, math.ceil(fraction * 4)))
    return f"{(q - 1) / 4:g}-{q / 4:g}"


def shape_class(
    tensors: Mapping[str, Any], *, batch_dim: int = 0, seq_dim: int | None = None, padding: float
) -> list[Any]:
    """The bucketed description of a batch: per tensor input its name, dtype, device type and
    shape with the batch (and sequence) dimension rounded up to a power of two; then the padding
    bucket. Two batches with the same shape class share a decision."""
    out: list[Any] = []
    for name, t in tensors.items():
        shape = list(t.shape)
        if len(shape) > batch_dim:
            shape[batch_dim] = f"b{batch_bucket(shape[batch_dim])}"
        if seq_dim is not None and len(shape) > seq_dim:
            shape[seq_dim] = f"t{batch_bucket(shape[seq_dim])}"
        out.append([str(name), str(t.dtype).removeprefix("torch."), t.device.type, shape])
    out.append(["padding", padding_bucket(padding)])
    return out

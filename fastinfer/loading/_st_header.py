"""Safetensors header validation for :mod:`fastinfer.loading._formats`: the dtypes the format
defines, each tensor's entry checked as strictly as the safetensors library does (a known dtype,
a shape of non-negative ints, offsets that fit, no two tensors sharing bytes), and the alias
record ``save_weights`` leaves in ``__metadata__``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastinfer.errors import CheckpointError

__all__ = ["ALIASES_METADATA", "Spec", "aliases", "contiguous_stride", "entry", "refuse_overlaps"]

# Every dtype the safetensors format defines (its ``Dtype`` enum, safetensors 0.8) and the torch
# dtype that holds it; None where torch has none (the 6-bit floats). A name outside this table is
# unsupported (a newer format or another tool), not a sign of corruption.
_ST_FORMAT: dict[str, str | None] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",  # 4-bit: the header counts values, torch packs two per byte
    "F6_E2M3": None,
    "F6_E3M2": None,
}
_ST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in _ST_FORMAT.items()
    if attr is not None and isinstance(getattr(torch, attr, None), torch.dtype)
}
_ST_PACKED = {"F4": 2}  # values per byte (per torch element) of the sub-byte dtypes

# save_weights writes a tensor that several keys share once and records the other keys here, in
# the header's __metadata__ (a JSON object alias -> stored key), so the loader gives them the same
# tensor again. Other readers see only the stored key.
ALIASES_METADATA = "fastinfer.aliases"


def aliases(path: Path, metadata: Any) -> dict[str, str]:
    """The alias record save_weights leaves in ``__metadata__`` (alias key -> stored key)."""
    if not isinstance(metadata, dict) or ALIASES_METADATA not in metadata:
        return {}
    try:
        aliases = json.loads(metadata[ALIASES_METADATA])
    except (TypeError, ValueError, RecursionError):
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(
            f"safetensors file {str(path)!r} is corrupt: its __metadata__ entry "
            f"{ALIASES_METADATA!r} is not a JSON object of key names "
            f"({str(metadata[ALIASES_METADATA])[:200]!r}); re-save it (fastinfer.save_weights)"
        )
    return aliases


Spec = tuple[str, torch.dtype, list[int], int, int]


def entry(path: Path, key: str, info: Any) -> Spec:
    """One header entry, validated: a known dtype, a shape of non-negative ints, offsets that fit."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"safetensors file {str(path)!r} is corrupt: tensor {key!r} {problem}; "
            "re-save or re-download it"
        )

    if not isinstance(info, dict):
        raise bad(f"has a header entry of type {type(info).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise bad(f"has no {', '.join(repr(m) for m in missing)} in its header entry")
    name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(name, str):
        raise bad(f"has a dtype of type {type(name).__name__}, not a string: {name!r}")
    if name not in _ST_DTYPES:
        if name in _ST_FORMAT:
            why = (
                f"dtype {name!r}, which the safetensors format defines but torch "
                f"{torch.__version__} has no dtype for"
            )
        else:
            why = (
                f"an unknown dtype {name!r}, not one the safetensors format defines (written by "
                "a newer safetensors version or another tool)"
            )
        raise CheckpointError(
            f"safetensors file {str(path)!r}: tensor {key!r} has {why}, so it is not supported "
            f"(supported: {', '.join(_ST_DTYPES)}). Fix: convert that tensor to a supported "
            "dtype and re-save the checkpoint"
        )
    dtype = _ST_DTYPES[name]
    if not isinstance(shape, list):
        raise bad(f"has a shape of type {type(shape).__name__}, not a list: {shape!r}")
    for dim in shape:
        if type(dim) is not int:  # a float (2.5 or 2.0), a bool, a string: never truncated
            raise bad(f"has a non-integer dimension {dim!r} in its shape {shape!r}")
        if dim < 0:
            raise bad(f"has a negative dimension {dim} in its shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(type(x) is not int or x < 0 for x in offsets)
        or offsets[1] < offsets[0]
    ):
        raise bad(
            f"has invalid data_offsets {offsets!r} (expected [begin, end], 0 <= begin <= end)"
        )
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    per_byte = _ST_PACKED.get(name, 1)
    if numel % per_byte:
        raise bad(
            f"has {numel} values of {name} in shape {tuple(shape)}: not a whole number of bytes"
        )
    if end - begin != numel // per_byte * dtype.itemsize:
        raise bad(f"has {end - begin} bytes for shape {tuple(shape)} of {dtype}")
    if per_byte > 1:  # torch's packed dtype holds `per_byte` values along the last dimension
        if not shape or shape[-1] % per_byte:
            raise CheckpointError(
                f"safetensors file {str(path)!r}: tensor {key!r} of dtype {name} has shape "
                f"{tuple(shape)}, whose last dimension is not a multiple of {per_byte}, so {dtype} "
                f"(which packs {per_byte} values along the last dimension) cannot hold it: it is "
                "not supported. Fix: pad the last dimension and re-save the checkpoint"
            )
        shape = [*shape[:-1], shape[-1] // per_byte]
    return key, dtype, list(shape), begin, end


def refuse_overlaps(path: Path, specs: list[Spec]) -> None:
    """Two tensors sharing bytes would alias each other; the safetensors library refuses it too."""
    prev: Spec | None = None
    for spec in sorted((s for s in specs if s[4] > s[3]), key=lambda s: (s[3], s[4])):
        if prev is not None and spec[3] < prev[4]:
            raise CheckpointError(
                f"safetensors file {str(path)!r} is corrupt: tensors {prev[0]!r} (bytes "
                f"{prev[3]}-{prev[4]}) and {spec[0]!r} (bytes {spec[3]}-{spec[4]}) overlap, so "
                "they would alias each other; re-save the checkpoint (fastinfer.save_weights or "
                "safetensors.torch.save_file)"
            )
        prev = spec


def contiguous_stride(shape: list[int]) -> list[int]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return stride[::-1]

"""Safetensors header validation for :mod:`fastinfer.loading._formats`: the dtypes the format
defines, each tensor's entry checked as strictly as the safetensors library does (a known dtype,
a shape of non-negative ints, offsets that fit, tensors that cover the data contiguously: no two
sharing bytes, no byte belonging to none; ``__metadata__`` a map of strings to strings; no key
twice in one JSON object), and the alias record ``save_weights`` leaves in ``__metadata__``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from fastinfer.errors import CheckpointError

__all__ = [
    "ALIASES_METADATA",
    "DuplicateKey",
    "Spec",
    "aliases",
    "check_layout",
    "contiguous_stride",
    "entry",
    "metadata",
    "no_duplicate_keys",
]

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


class DuplicateKey(ValueError):
    """A key twice in one object of the header JSON (raised by :func:`no_duplicate_keys`)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"duplicate keys {keys!r}")
        self.keys = keys


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: a key twice in one object is refused.

    ``json.loads`` keeps the last value silently, so a header naming a tensor twice would load
    whichever entry came last; the safetensors library refuses a repeated field."""
    out = dict(pairs)
    if len(out) != len(pairs):
        counts = Counter(k for k, _ in pairs)
        raise DuplicateKey(sorted(k for k, n in counts.items() if n > 1))
    return out


def metadata(path: Path, value: Any) -> dict[str, str]:
    """The header's ``__metadata__``, validated as the safetensors library does: absent or null,
    or a JSON object whose values are all strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(
            f"safetensors file {str(path)!r} is corrupt: its __metadata__ is a JSON "
            f"{type(value).__name__}, not an object of strings (the safetensors library refuses "
            "it too); re-save it"
        )
    bad = [f"{k!r} ({type(v).__name__})" for k, v in value.items() if not isinstance(v, str)]
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise CheckpointError(
            f"safetensors file {str(path)!r} is corrupt: its __metadata__ has {len(bad)} "
            f"value{'s' if len(bad) > 1 else ''} that {'are' if len(bad) > 1 else 'is'} not a "
            f"string ({shown}); the format allows only string values (the safetensors library "
            "refuses the file too). Fix: re-save it with string metadata (json.dumps the values)"
        )
    return value


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


def check_layout(path: Path, specs: list[Spec]) -> int:
    """Tensors must cover the data contiguously from byte 0, as the safetensors library requires:
    two tensors sharing bytes would alias each other, and bytes no tensor covers (a hole before
    or between tensors) mean the offsets are wrong. Returns where the data ends (bytes after the
    header)."""
    pos, prev = 0, None
    # The library's order: by (begin, end), so a zero-size tensor sits where its offsets put it.
    for spec in sorted(specs, key=lambda s: (s[3], s[4])):
        key, _, _, begin, end = spec
        if begin < pos and prev is not None:
            raise CheckpointError(
                f"safetensors file {str(path)!r} is corrupt: tensors {prev[0]!r} (bytes "
                f"{prev[3]}-{prev[4]}) and {key!r} (bytes {begin}-{end}) overlap, so "
                "they would alias each other; re-save the checkpoint (fastinfer.save_weights or "
                "safetensors.torch.save_file)"
            )
        if begin > pos:
            where = (
                f"after tensor {prev[0]!r} (bytes {prev[3]}-{prev[4]})"
                if prev is not None
                else "before the first tensor (the data must start at byte 0)"
            )
            raise CheckpointError(
                f"safetensors file {str(path)!r} is corrupt: data bytes {pos}-{begin} belong to "
                f"no tensor: a hole {where}, before tensor {key!r} (bytes {begin}-{end}). The "
                "format requires the tensors to cover the data contiguously, without holes (the "
                "safetensors library refuses the file too); re-save or re-download it"
            )
        pos, prev = end, spec
    return pos


def contiguous_stride(shape: list[int]) -> list[int]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return stride[::-1]

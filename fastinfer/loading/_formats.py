"""Checkpoint readers for :mod:`fastinfer.loading`: zero-copy maps of torch zip and safetensors files.

Every reader returns CPU tensors and says which of them are views of a file mapping (no bytes
copied) and which were materialised in fresh memory. Errors from the zip, pickle and safetensors
layers are turned into :class:`~fastinfer.CheckpointError` / :class:`~fastinfer.UnsafeCheckpointError`
messages that name the file.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap as _mmap
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastinfer import _env
from fastinfer.errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger("fastinfer.loading")

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

# Wrapper keys some training loops put around the state dict ({"state_dict": {...}}).
_WRAPPERS = ("state_dict", "model_state_dict", "model")


@dataclass
class Mapped:
    """What a reader produced: tensors by key, and where each came from."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    format: str = ""
    zero_copy: set[str] = field(default_factory=set)  # keys whose data is a view of a file map
    notes: list[str] = field(default_factory=list)

    def merge(self, other: Mapped) -> None:
        dup = self.tensors.keys() & other.tensors.keys()
        if dup:
            raise CheckpointError(
                f"{len(dup)} keys appear in more than one shard ({preview(sorted(dup))}): "
                "the shard index is inconsistent; re-save the checkpoint"
            )
        self.tensors.update(other.tensors)
        self.files.extend(other.files)
        self.zero_copy |= other.zero_copy
        self.notes.extend(n for n in other.notes if n not in self.notes)


def preview(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def resolve(checkpoint: str | os.PathLike[str]) -> tuple[str, list[Path], Path | None]:
    """``(kind, files, index)`` for a checkpoint file or folder; kind is 'safetensors' or 'torch'."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        for index_name, kind in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_INDEX, "torch")):
            index = path / index_name
            if index.is_file():
                return kind, _index_files(index), index
        for name in SINGLE_FILES:
            if (path / name).is_file():
                return sniff(path / name), [path / name], None
        raise CheckpointError(
            f"folder {str(path)!r} holds no checkpoint: expected {SAFETENSORS_INDEX}, {TORCH_INDEX} "
            f"or one of {', '.join(SINGLE_FILES)}"
        )
    return sniff(path), [path], None


def _index_files(index: Path) -> list[Path]:
    try:
        doc = json.loads(index.read_text())
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"shard index {str(index)!r} is unreadable ({type(exc).__name__}: {exc}); "
            "it must be JSON with a 'weight_map' object mapping keys to shard files"
        ) from None
    files = list(dict.fromkeys(index.parent / str(name) for name in weight_map.values()))
    missing = [str(f.name) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"shard index {str(index)!r} names {len(missing)} shard files that do not exist: "
            f"{preview(missing)}"
        )
    return files


def sniff(path: Path) -> str:
    """'safetensors' or 'torch' from a file's first bytes (not its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
    if len(head) < 8:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or empty ({len(head)} bytes): re-save or re-download it"
        )
    if head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"
    raise CheckpointError(
        f"checkpoint {str(path)!r} is neither a torch.save file nor a safetensors file "
        f"(first bytes {head[:8]!r}): it is corrupt or of an unsupported format"
    )


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def read(
    kind: str,
    files: list[Path],
    *,
    mmap: bool,
    trust_pickle: bool,
    progress: bool,
) -> Mapped:
    out = Mapped(format=("sharded " if len(files) > 1 else "") + kind)
    with _progress_bar(len(files), enabled=progress and len(files) > 1) as advance:
        for path in files:
            one = (
                read_safetensors(path, mmap=mmap)
                if kind == "safetensors"
                else read_torch(path, mmap=mmap, trust_pickle=trust_pickle)
            )
            out.merge(one)
            advance()
    return out


def read_torch(path: Path, *, mmap: bool, trust_pickle: bool) -> Mapped:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # what torch.load itself checks
    out = Mapped(files=[path], format="torch")
    if not is_zip:
        out.notes.append(
            f"{path.name} is a legacy (non-zip) torch.save file: it cannot be memory-mapped and was "
            "read into memory; re-save it with torch.save or fastinfer.save_weights to load it zero-copy"
        )
    use_mmap = mmap and is_zip
    try:
        obj = torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _is_unsafe(str(exc)):
            raise _corrupt(path, exc) from None
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"checkpoint {str(path)!r} holds Python objects that only a full unpickle can "
                f"rebuild ({_first_line(exc)}); a full unpickle runs arbitrary code from the file. "
                "Pass trust_pickle=True only if you trust its source, or re-save the weights as a "
                "plain state dict (fastinfer.save_weights)"
            ) from None
        out.notes.append(f"{path.name} was fully unpickled (trust_pickle=True)")
        try:
            obj = torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=False)
        except Exception as exc2:
            raise _corrupt(path, exc2) from None
    except Exception as exc:
        if "TorchScript" in str(exc):
            raise CheckpointError(
                f"{str(path)!r} is a TorchScript archive, not a state dict: load it with "
                "torch.jit.load, or save model.state_dict() instead"
            ) from None
        raise _corrupt(path, exc) from None
    sd = _unwrap(obj, path, out)
    out.tensors = sd
    if use_mmap:
        out.zero_copy = set(sd)
    return out


def _is_unsafe(message: str) -> bool:
    m = message.lower()
    return any(s in m for s in ("global", "reduce for", "unsupported class", "blocked"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # torch's weights-only wrapper puts its own preamble first; keep the line naming the cause.
    for line in text:
        if "GLOBAL" in line or "reduce" in line:
            return line.strip()[:300]
    return (text[0] if text else type(exc).__name__)[:300]


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {str(path)!r} is truncated or corrupt and cannot be read "
        f"({type(exc).__name__}: {_first_line(exc)}); re-save or re-download it"
    )


def _unwrap(obj: Any, path: Path, out: Mapped) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for wrapper in _WRAPPERS:
            inner = obj.get(wrapper)
            if (
                isinstance(inner, dict)
                and inner
                and all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inner.items()
                )
            ):
                out.notes.append(f"{path.name}: used the state dict under {wrapper!r}")
                obj = inner
                break
        bad = [
            k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        ]
        if not bad:
            return dict(obj)
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict: {len(bad)} entries are not "
            f"name -> tensor ({preview([str(k) for k in bad])}); save model.state_dict()"
        )
    if isinstance(obj, torch.nn.Module):
        out.notes.append(f"{path.name} held a whole pickled module; its state_dict() was used")
        return {k: v.detach() for k, v in obj.state_dict().items()}
    raise CheckpointError(
        f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict; save model.state_dict()"
    )


def read_safetensors(path: Path, *, mmap: bool) -> Mapped:
    """Parse the safetensors header ourselves and view each tensor in one private file mapping."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file is {len(head)} bytes long")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"safetensors file {str(path)!r} is truncated or corrupt: bad header ({exc}); "
            "re-save or re-download it"
        ) from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    specs: list[tuple[str, torch.dtype, list[int], int, int]] = []
    end_max = 0
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"safetensors file {str(path)!r} is corrupt: bad entry for {key!r} ({exc!r})"
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"safetensors file {str(path)!r} is corrupt: {key!r} has {end - begin} bytes for "
                f"shape {tuple(shape)} of {dtype}"
            )
        specs.append((key, dtype, shape, begin, end))
        end_max = max(end_max, end)
    if data_start + end_max > size:
        raise CheckpointError(
            f"safetensors file {str(path)!r} is truncated: its header needs {data_start + end_max} "
            f"bytes but the file has {size}; re-save or re-download it"
        )
    out = Mapped(files=[path], format="safetensors")
    storage: Any
    if mmap:
        storage = torch.UntypedStorage.from_file(str(path), False, size)
    else:
        storage = torch.UntypedStorage(size)
        with open(path, "rb") as f:
            view = memoryview(
                (ctypes.c_char * size).from_address(storage.data_ptr())  # type: ignore[operator]
            )
            f.readinto(view)
    for key, dtype, shape, begin, _end in specs:
        offset = data_start + begin
        stride = _contiguous_stride(shape)
        if offset % dtype.itemsize == 0:
            t = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape, stride)
            if mmap:
                out.zero_copy.add(key)
        else:  # unaligned data: one copy of this tensor only
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, [_end - begin], [1])
            t = raw.clone().view(dtype).reshape(shape)
        out.tensors[key] = t
    return out


def _contiguous_stride(shape: list[int]) -> list[int]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return stride[::-1]


# --------------------------------------------------------------------------------------------
# Progress, page population, memory
# --------------------------------------------------------------------------------------------


def progress_enabled(explicit: bool | None) -> bool:
    if explicit is not None:
        return explicit
    forced = _env.flag("FASTINFER_PROGRESS")
    if forced is not None:
        return forced
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    from fastinfer._optional import require

    tqdm = require("tqdm", purpose="progress bars").tqdm
    bar = tqdm(total=total, desc="loading shards", unit="shard", file=sys.stderr)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()


_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+
_libc: Any = None


def _madvise(addr: int, length: int, advice: int) -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return bool(_libc.madvise(addr, length, advice) == 0)


def populate(tensors: Sequence[torch.Tensor]) -> None:
    """Fault in the pages behind ``tensors`` (file mappings) in bulk, so the first forward does not.

    One ``madvise(MADV_POPULATE_READ)`` per mapped range (Linux 5.14+) builds the page tables without a
    fault per page; elsewhere one byte per page is read. Reading file pages adds no private memory.
    """
    page = _mmap.PAGESIZE
    ranges: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        start, nbytes = st.data_ptr(), st.nbytes()
        if nbytes:
            ranges[start] = max(ranges.get(start, 0), nbytes)
    merged: list[list[int]] = []
    for start, nbytes in sorted(ranges.items()):
        lo, hi = start - start % page, start + nbytes
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    for lo, hi in merged:
        _madvise(lo, hi - lo, _MADV_WILLNEED)
    for lo, hi in merged:
        if not _madvise(lo, hi - lo, _MADV_POPULATE_READ):
            buf = (ctypes.c_char * (hi - lo)).from_address(lo)  # type: ignore[operator]
            flat = torch.frombuffer(memoryview(buf), dtype=torch.uint8)
            flat[::page].max()


def memory() -> dict[str, int]:
    """This process's resident memory split into private anonymous, file-backed and PSS bytes."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        import psutil

        info = psutil.Process().memory_full_info()
        rss, uss = int(info.rss), int(getattr(info, "uss", 0))
        return {
            "rss": rss,
            "anonymous": uss,
            "file": rss - uss,
            "pss": int(getattr(info, "pss", rss)),
        }
    rss = fields.get("Rss", 0)
    anon = fields.get("Anonymous", 0)
    return {"rss": rss, "anonymous": anon, "file": rss - anon, "pss": fields.get("Pss", rss)}

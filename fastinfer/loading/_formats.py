"""Checkpoint readers for :mod:`fastinfer.loading`: zero-copy maps of torch zip and safetensors files.

Every reader returns CPU tensors and says which of them are views of a file mapping (no bytes
copied) and which were materialised in fresh memory. Errors from the zip, pickle and safetensors
layers are turned into :class:`~fastinfer.CheckpointError` / :class:`~fastinfer.UnsafeCheckpointError`
messages that name the file. Every file is recorded as it was read (:mod:`._pages`), so a file that
changes while it loads is reported instead of touched; a safetensors header is validated as strictly
as the safetensors library does (types, shapes, tensors covering the data exactly: no overlap, no
hole, no trailing bytes; string metadata; no duplicate keys).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import pickle
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from fastinfer.errors import CheckpointError, UnsafeCheckpointError
from fastinfer.loading import _st_header as st_header
from fastinfer.loading._pages import Source, check_unchanged, memory, populate, snapshot

__all__ = [
    "QUANTIZED_FIX",
    "Mapped",
    "memory",
    "not_tensors",
    "populate",
    "preview",
    "read",
    "resolve",
    "sniff",
]

logger = logging.getLogger("fastinfer.loading")

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")

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
    sources: list[Source] = field(default_factory=list)  # each mapped file as it was when mapped

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
        self.sources.extend(other.sources)
        self.notes.extend(n for n in other.notes if n not in self.notes)


# What a state dict with non-tensor entries usually is, and what to do instead.
QUANTIZED_FIX = (
    "this is what the state dict of a torch.ao.quantization model looks like (packed "
    "parameters, a dtype per layer), and fastinfer checkpoints hold plain tensors only. Fix: "
    "save and load the float model with fastinfer and quantize after loading "
    "(torch.ao.quantization.quantize_dynamic(model, ...)), or keep the quantized state dict in "
    "torch.save and restore it with model.load_state_dict(torch.load(path, weights_only=True))"
)


def not_tensors(entries: dict[Any, Any]) -> list[str]:
    """The entries of a would-be state dict that are not ``name -> tensor``, each with its type."""
    return [
        f"{k!s} ({type(v).__name__})"
        for k, v in entries.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]


def preview(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

# The safetensors library refuses headers larger than this (HeaderTooLarge); so do we.
MAX_HEADER_BYTES = 100_000_000


def _stat(path: Path, what: str = "checkpoint") -> os.stat_result:
    """``os.stat(path)`` with a :class:`CheckpointError` that says what is wrong with the path."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            why = "is a symlink loop (a symbolic link that leads back to itself); fix the link"
        elif exc.errno == errno.ENOENT and os.path.islink(path):
            why = f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
        elif exc.errno == errno.ENOENT:
            why = "does not exist"
        else:
            why = f"cannot be read ({exc.strerror or exc})"
        raise CheckpointError(f"{what} {str(path)!r} {why}") from None


def _refuse_special(path: Path, st: os.stat_result, what: str = "checkpoint") -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = (
        "a named pipe (FIFO): reading it would block until a writer appears"
        if stat.S_ISFIFO(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "not a regular file"
    )
    raise CheckpointError(
        f"{what} {str(path)!r} is {kind}; a checkpoint must be a regular file or a folder"
    )


def _open_regular(path: Path) -> tuple[Any, os.stat_result]:
    """Open ``path`` for reading without blocking on a FIFO; refuse anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} disappeared while the checkpoint was being loaded "
            "(it existed when the checkpoint was found); load it again once it is in place"
        ) from None
    except OSError as exc:
        _stat(path)  # the precise reason where the path itself is the problem (a symlink loop...)
        raise CheckpointError(
            f"checkpoint file {str(path)!r} cannot be read ({exc.strerror or exc})"
        ) from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    try:
        _refuse_special(path, st)
    except CheckpointError:
        f.close()
        raise
    return f, st


def resolve(checkpoint: str | os.PathLike[str]) -> tuple[str, list[Path], Path | None]:
    """``(kind, files, index)`` for a checkpoint file or folder; kind is 'safetensors' or 'torch'."""
    path = Path(checkpoint)
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
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
    _refuse_special(path, st)
    return sniff(path), [path], None


def _index_files(index: Path) -> list[Path]:
    try:
        doc = json.loads(index.read_text())
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else f"{exc}"
        raise CheckpointError(
            f"shard index {str(index)!r} is unreadable ({type(exc).__name__}: {why}); "
            "it must be JSON with a 'weight_map' object mapping keys to shard files"
        ) from None
    bad_names = [v for v in weight_map.values() if not isinstance(v, str) or not v or "\0" in v]
    if bad_names:
        raise CheckpointError(
            f"shard index {str(index)!r} maps keys to {len(bad_names)} values that are not file "
            f"names ({preview([repr(v) for v in bad_names])}); re-save the checkpoint"
        )
    outside = sorted({v for v in weight_map.values() if _outside(v)})
    if outside:
        raise CheckpointError(
            f"shard index {str(index)!r} names {len(outside)} shard files outside its folder "
            f"({preview([str(v) for v in outside])}); an index may only name files in its own "
            "folder (relative names without '..'), so these were not read. Fix: put the shards "
            "beside the index and name them relative to it"
        )
    files = list(dict.fromkeys(index.parent / str(name) for name in weight_map.values()))
    missing = [str(f.name) for f in files if not f.exists() and not f.is_symlink()]
    if missing:
        raise CheckpointError(
            f"shard index {str(index)!r} names {len(missing)} shard files that do not exist: "
            f"{preview(missing)}"
        )
    for f in files:
        _refuse_special(f, _stat(f, "shard"), "shard")
    return files


def _outside(name: str) -> bool:
    """Whether an index entry leaves the index's folder: an absolute path or a '..' component.

    The index is data: it names files, it does not get to point anywhere on disk. A symbolic link
    *inside* the folder is followed (the Hugging Face cache links every snapshot file to
    ``../../blobs/``): whoever wrote the folder chose the link, not the index.
    """
    pure = PurePosixPath(name.replace("\\", "/"))
    return pure.is_absolute() or os.path.isabs(name) or ".." in pure.parts


def sniff(path: Path) -> str:
    """'safetensors' or 'torch' from a file's first bytes (not its name)."""
    f, _st = _open_regular(path)
    try:
        with f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
    if len(head) < 8:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or empty ({len(head)} bytes): re-save or re-download it"
        )
    if head[:4] == b"PK\x03\x04":
        return "torch"
    # Before the pickle check: a safetensors header length of 128 mod 256 starts with 0x80 too.
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol opcode: a legacy torch.save file
        return "torch"
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
    f, st = _open_regular(path)
    with f:
        is_zip = f.read(4) == b"PK\x03\x04"  # what torch.load itself checks
    out = Mapped(files=[path], format="torch")
    # torch.load maps the file at its size when it opens it: that is what the tensors may view.
    source = snapshot(path, st)
    if not is_zip:
        out.notes.append(
            f"{path.name} is a legacy (non-zip) torch.save file: it cannot be memory-mapped and was "
            "read into memory; re-save it with torch.save or fastinfer.save_weights to load it zero-copy"
        )
    use_mmap = mmap and is_zip
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=True)
        except pickle.UnpicklingError as exc:
            if not _is_unsafe(str(exc)):
                raise _corrupt(path, exc) from None
            if not trust_pickle:
                raise UnsafeCheckpointError(
                    f"checkpoint {str(path)!r} holds Python objects that only a full unpickle can "
                    f"rebuild ({_first_line(exc)}); a full unpickle runs arbitrary code from the "
                    "file. Pass trust_pickle=True only if you trust its source, or re-save the "
                    "weights as a plain state dict (fastinfer.save_weights)"
                ) from None
            out.notes.append(f"{path.name} was fully unpickled (trust_pickle=True)")
            try:
                obj = torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=False)
            except Exception as exc2:
                raise _corrupt(path, exc2) from None
        except (CheckpointError, UnsafeCheckpointError):
            raise
        except Exception as exc:
            if "TorchScript" in str(exc):
                raise CheckpointError(
                    f"{str(path)!r} is a TorchScript archive, not a state dict: load it with "
                    "torch.jit.load, or save model.state_dict() instead"
                ) from None
            raise _corrupt(path, exc) from None
    except (CheckpointError, UnsafeCheckpointError):
        check_unchanged([source])  # a file rewritten while torch read it: say so instead
        raise
    check_unchanged([source])
    sd = _unwrap(obj, path, out)
    out.tensors = sd
    if use_mmap:
        out.zero_copy = set(sd)
        out.sources.append(source)  # mapped: checked again before any page is touched
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
        bad = not_tensors(obj)
        if not bad:
            return dict(obj)
        quantized = any(isinstance(v, (torch.dtype, tuple)) for v in obj.values())
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict of tensors: {len(bad)} entries are "
            f"not name -> tensor ({preview(bad)}); "
            + (QUANTIZED_FIX if quantized else "save model.state_dict()")
        )
    if isinstance(obj, torch.nn.Module):
        out.notes.append(f"{path.name} held a whole pickled module; its state_dict() was used")
        return {k: v.detach() for k, v in obj.state_dict().items()}
    raise CheckpointError(
        f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict; save model.state_dict()"
    )


def read_safetensors(path: Path, *, mmap: bool) -> Mapped:
    """Parse the safetensors header ourselves and view each tensor in one private file mapping."""
    f, st = _open_regular(path)
    size = st.st_size
    try:
        with f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file is {len(head)} bytes long")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise ValueError(
                    f"header claims {n} bytes, more than the format's limit of {MAX_HEADER_BYTES}"
                )
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            raw_header = f.read(n)
            if len(raw_header) < n:
                raise ValueError(f"the file ended {n - len(raw_header)} bytes into the header")
            try:
                header = json.loads(raw_header, object_pairs_hook=st_header.no_duplicate_keys)
            except RecursionError:
                raise ValueError("the header JSON is nested too deeply") from None
            if not isinstance(header, dict):
                raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    except st_header.DuplicateKey as exc:
        raise CheckpointError(
            f"safetensors file {str(path)!r} is corrupt: its header JSON has the key"
            f"{'s' if len(exc.keys) > 1 else ''} {preview(exc.keys)} twice in one object, so "
            "which entry is meant is ambiguous (JSON readers keep either one; the safetensors "
            "library refuses a repeated field); re-save or re-download it"
        ) from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(
            f"safetensors file {str(path)!r} is truncated or corrupt: bad header ({exc}); "
            "re-save or re-download it"
        ) from None
    metadata = st_header.metadata(path, header.pop("__metadata__", None))
    aliases = st_header.aliases(path, metadata)
    data_start = 8 + n
    specs = [st_header.entry(path, key, info) for key, info in header.items()]
    end_max = st_header.check_layout(path, specs)
    if data_start + end_max > size:
        raise CheckpointError(
            f"safetensors file {str(path)!r} is truncated: its header needs {data_start + end_max} "
            f"bytes but the file has {size}; re-save or re-download it"
        )
    if data_start + end_max < size:
        raise CheckpointError(
            f"safetensors file {str(path)!r} is corrupt: its last {size - data_start - end_max} "
            f"bytes (from byte {data_start + end_max} of {size}) belong to no tensor: the "
            "header's tensors end before the file does. The format requires the tensors to cover "
            "the data exactly (the safetensors library refuses the file too: 'file not fully "
            "covered'); re-save or re-download it"
        )
    out = Mapped(files=[path], format="safetensors")
    source = snapshot(path, st, needed=data_start + end_max)
    storage: Any
    if mmap:
        storage = torch.UntypedStorage.from_file(str(path), False, size)
        check_unchanged([source])  # mapped the file we parsed, still whole: no page touched yet
        out.sources.append(source)  # checked again before any page is touched
    else:
        storage = torch.UntypedStorage(size)
        f, _ = _open_regular(path)
        with f:
            view = memoryview(
                (ctypes.c_char * size).from_address(storage.data_ptr())  # type: ignore[operator]
            )
            got = f.readinto(view)
        check_unchanged([source])  # changed while it was read: the bytes may be a mix
        if got is None or got < data_start + end_max:
            raise CheckpointError(
                f"safetensors file {str(path)!r} ended after {got} bytes while it was being read "
                f"(its header needs {data_start + end_max}); re-save or re-download it"
            )
    unaligned = []
    for key, dtype, shape, begin, end in specs:
        offset = data_start + begin
        stride = st_header.contiguous_stride(shape)
        if offset % dtype.itemsize == 0:
            t = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape, stride)
            if mmap:
                out.zero_copy.add(key)
            out.tensors[key] = t
        else:
            unaligned.append((key, dtype, shape, offset, end - begin))
    for key, dtype, shape, offset, nbytes in unaligned:  # one copy of each of these only
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, [nbytes], [1])
        if mmap:
            populate([raw], sources=out.sources, whole_storage=False)  # EFAULT, not SIGBUS
        out.tensors[key] = raw.clone().view(dtype).reshape(shape)
    for alias, stored in aliases.items():  # keys save_weights wrote once: the same tensor again
        if alias not in out.tensors and stored in out.tensors:
            out.tensors[alias] = out.tensors[stored]
            if stored in out.zero_copy:
                out.zero_copy.add(alias)
    return out


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


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

"""save_weights: publish a checkpoint atomically (never rewrite a file that may be mapped)."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfer._common.files import atomic_path
from fastinfer._optional import require
from fastinfer.errors import CheckpointError, ConfigError, LoadError
from fastinfer.loading._formats import QUANTIZED_FIX, not_tensors, preview
from fastinfer.loading._st_header import ALIASES_METADATA

__all__ = ["save_weights"]


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
) -> Path:
    """Write weights to a temporary file next to ``path``, fsync it, then rename it over ``path``.

    Never rewrite a checkpoint in place: a process that has it memory-mapped (every fastinfer
    load does) gets SIGBUS when the file shrinks under it. A rename leaves the old inode intact for
    readers that still map it. ``format`` is ``"safetensors"`` or ``"torch"`` (default: from the
    suffix, ``.safetensors`` or anything else). For safetensors, a tensor that several keys share
    (tied weights, two parameters set to one tensor) is written once and the other keys are
    recorded in the header's metadata; the loader gives them that same tensor again.

    Raises:
        CheckpointError: the state dict holds entries that are not tensors (a
            ``torch.ao.quantization`` model's packed parameters and dtypes), named with the fix;
            the file could not be written (disk full, quota, file-size limit, a
            folder that is not writable), naming the path, the cause and the fix; the previous
            file at ``path`` is left as it was and no temporary file is left behind.
    """
    target = Path(path)
    fmt_name = format or ("safetensors" if target.suffix == ".safetensors" else "torch")
    if fmt_name not in ("safetensors", "torch"):
        raise ConfigError(f"format must be 'safetensors' or 'torch', got {format!r}")
    if isinstance(model_or_state_dict, nn.Module):
        sd = dict(model_or_state_dict.state_dict())
    elif isinstance(model_or_state_dict, Mapping):
        sd = dict(model_or_state_dict)
    else:
        raise ConfigError(
            f"save_weights takes an nn.Module or a state dict, got {type(model_or_state_dict).__name__}"
        )
    bad = not_tensors(sd)
    if bad:
        quantized_sd = any(isinstance(v, (torch.dtype, tuple)) for v in sd.values())
        raise CheckpointError(
            f"cannot save {str(target)!r}: {len(bad)} state-dict entries are not tensors "
            f"({preview(bad)}); "
            + (QUANTIZED_FIX if quantized_sd else "pass a model or a dict of name -> tensor")
        )
    quantized = [k for k, v in sd.items() if v.is_quantized]
    if quantized and fmt_name == "safetensors":
        raise CheckpointError(
            f"cannot save {str(target)!r}: safetensors has no quantized tensors, and "
            f"{len(quantized)} are ({preview(quantized)}); {QUANTIZED_FIX}"
        )
    meta = [k for k, v in sd.items() if v.is_meta]
    if meta:
        raise LoadError(
            f"cannot save {len(meta)} tensors on the meta device (no data): {preview(meta)}"
        )
    aliases = _aliases(sd) if fmt_name == "safetensors" else {}
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    try:
        with atomic_path(target) as tmp_path:
            if fmt_name == "safetensors":
                _write_safetensors(sd, aliases, tmp_path)
            else:
                # A file object, not a path: torch's own writer reports a failed write as
                # "unexpected pos"; through Python's the OSError (ENOSPC...) is kept as the cause.
                with open(tmp_path, "wb") as f:
                    torch.save(sd, f)
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
    except Exception as exc:
        error = _write_error(target, exc, [v for k, v in sd.items() if k not in aliases])
        if error is None:
            raise
        raise error from exc
    try:  # the rename itself survives a crash only once the folder is synced
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return target


def _aliases(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is exactly an earlier key's (same memory, shape, strides, dtype): key ->
    that earlier key. Found before the copy to CPU, which would separate them."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for k, v in sd.items():
        if not v.numel():
            continue
        ident = (
            v.device,
            v.untyped_storage().data_ptr(),
            v.storage_offset(),
            tuple(v.shape),
            v.stride(),
            v.dtype,
        )
        if ident in seen:
            aliases[k] = seen[ident]
        else:
            seen[ident] = k
    return aliases


def _write_safetensors(sd: dict[str, torch.Tensor], aliases: dict[str, str], path: Path) -> None:
    st = require("safetensors.torch", purpose="saving safetensors")
    stored = {k: v for k, v in sd.items() if k not in aliases}
    users: dict[int, int] = {}
    for v in stored.values():
        ptr = v.untyped_storage().data_ptr()
        users[ptr] = users.get(ptr, 0) + 1
    out: dict[str, torch.Tensor] = {}
    for k, v in stored.items():
        st_ = v.untyped_storage()
        whole = v.numel() * v.element_size() == st_.nbytes()
        # safetensors refuses tensors that share memory: give views their own copy
        out[k] = (
            v.contiguous()
            if users[st_.data_ptr()] == 1 and whole
            else v.clone(memory_format=torch.contiguous_format)
        )
    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_METADATA] = json.dumps(aliases, sort_keys=True)
    st.save_file(out, str(path), metadata=metadata)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how the safetensors (Rust) writer names it


def _errno(exc: BaseException) -> tuple[int, str] | None:
    """The OS error behind a failed write, from the exception or what it was raised from."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return cur.errno, cur.strerror or os.strerror(cur.errno)
        match = _OS_ERROR.search(str(cur)) if type(cur).__name__ == "SafetensorError" else None
        if match:
            code = int(match.group(1))
            return code, os.strerror(code)
        cur = cur.__cause__ or cur.__context__
    return None


def _write_error(
    target: Path, exc: BaseException, tensors: list[torch.Tensor]
) -> CheckpointError | None:
    """A CheckpointError for a write that failed for a reason of the filesystem, else None."""
    found = _errno(exc)
    if found is None:
        return None
    code, text = found
    cause = f"{errno.errorcode.get(code, code)}: {text}"
    nbytes = sum(v.numel() * v.element_size() for v in tensors)
    folder = str(target.parent)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
        fix = (
            f"free space on the filesystem that holds {folder!r} (the checkpoint needs about "
            f"{nbytes / 2**20:,.1f} MiB, beside the old file until it replaces it) or save it "
            "elsewhere"
        )
    elif code == errno.EFBIG:
        what = "the file is larger than the filesystem or the process's file-size limit allows"
        fix = "raise the limit (ulimit -f) or save it elsewhere, on another filesystem"
    else:
        what = "the file could not be written"
        fix = f"make sure {folder!r} is a writable folder with free space, or save it elsewhere"
    kept = (
        "the previous file at that path is unchanged"
        if target.exists()
        else "nothing was written at that path"
    )
    return CheckpointError(
        f"cannot save checkpoint {str(target)!r}: {what} ({cause}). Fix: {fix}. "
        f"{kept[0].upper()}{kept[1:]} and no temporary file was left behind"
    )

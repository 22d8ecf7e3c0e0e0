"""save_weights: publish a checkpoint atomically (never rewrite a file that may be mapped)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fastinfer._common.files import atomic_path
from fastinfer._optional import require
from fastinfer.errors import ConfigError, LoadError
from fastinfer.loading._formats import preview

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
    suffix, ``.safetensors`` or anything else). For safetensors, tied tensors are written once
    (the loader re-ties them from the model's structure).
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
    meta = [k for k, v in sd.items() if v.is_meta]
    if meta:
        raise LoadError(
            f"cannot save {len(meta)} tensors on the meta device (no data): {preview(meta)}"
        )
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    with atomic_path(target) as tmp_path:
        tmp = str(tmp_path)
        if fmt_name == "safetensors":
            st = require("safetensors.torch", purpose="saving safetensors")
            seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
            users: dict[int, int] = {}
            for v in sd.values():
                ptr = v.untyped_storage().data_ptr()
                users[ptr] = users.get(ptr, 0) + 1
            out: dict[str, torch.Tensor] = {}
            for k, v in sd.items():
                st_ = v.untyped_storage()
                ident = (st_.data_ptr(), v.storage_offset(), tuple(v.shape))
                if v.numel() and ident in seen:
                    continue  # a tied alias
                seen[ident] = k
                whole = v.numel() * v.element_size() == st_.nbytes()
                # safetensors refuses tensors that share memory: give views their own copy
                out[k] = v.contiguous() if users[st_.data_ptr()] == 1 and whole else v.clone()
            st.save_file(out, tmp, metadata={"format": "pt"})
        else:
            torch.save(sd, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    try:  # the rename itself survives a crash only once the folder is synced
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return target

"""Hugging Face checkpoints as ``from_pretrained`` reads them: transformers' own key conversions.

transformers 5 renames and fuses weights when it loads (ViT's attention and MLP names, Mixtral's
per-expert weights fused into ``gate_up_proj``, ``LayerNorm.gamma/beta``, weight-norm
``weight_g/weight_v`` as parametrizations) and writes the original names back when it saves, so a
``save_pretrained`` folder, like every checkpoint on the hub, is in the saved format. This module
applies the same conversion that ``from_pretrained`` applies, through transformers' own machinery
(``get_model_conversion_mapping`` and the ``WeightRenaming`` / ``WeightConverter`` objects it
returns), so models that transformers learns to convert keep loading. A key that is only renamed
keeps its memory-mapped tensor (no copy); only weights an operation changes (a fusion, a split)
are computed.

It also reads what the model class declares: checkpoint keys it ignores on load
(``_keys_to_ignore_on_load_unexpected``, e.g. the decoder for ``T5EncoderModel``), and, for a class
that is one part of the saved model (``WhisperEncoder`` from a ``WhisperModel`` folder), the part of
the checkpoint that holds its weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from copy import deepcopy
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fastinfer.loading._formats import Mapped

__all__ = ["hf_remap"]

logger = logging.getLogger("fastinfer.loading")


def _storage(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except RuntimeError:
        return -1


def _convert(model: Any, mapped: Mapped) -> Mapped:
    """``mapped`` with transformers' renames and conversions for ``model`` applied."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers 4: renames only, through the model's own hook
        return _convert_v4(model, mapped)
    mapping = get_model_conversion_mapping(model)
    renamings = [w for w in mapping if isinstance(w, WeightRenaming)]
    converters = [w for w in mapping if isinstance(w, WeightConverter)]
    if not renamings and not converters:
        return mapped
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    model_keys: dict[str, Any] = dict.fromkeys(model.state_dict().keys(), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    out = Mapped(files=mapped.files, format=mapped.format, notes=list(mapped.notes))
    pending: dict[str, Any] = {}  # first target key -> its converter, collecting its sources
    renamed = 0
    # Natural order, as transformers loads: experts 0, 1, ..., 10 are stacked in that order.
    for key in sorted(mapped.tensors, key=dot_natural_key):
        tensor = mapped.tensors[key]
        new, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
        if new not in model_keys and key in model_keys:
            new, pattern = key, None
        if new in model_keys and pattern is not None:
            conv = pending.setdefault(new, deepcopy(by_pattern[pattern]))
            conv.add_tensor(new, key, pattern, tensor)
            continue
        target = new if new in model_keys else key  # unknown keys keep the name in the file
        if target in out.tensors:
            continue  # two saved names for one weight (a tied copy): the first is kept
        renamed += target != key
        out.tensors[target] = tensor
        if key in mapped.zero_copy:
            out.zero_copy.add(target)
    mapped_storages = {_storage(mapped.tensors[k]) for k in mapped.zero_copy}
    sources = produced = 0
    ops: set[str] = set()
    for first, conv in pending.items():
        sources += sum(len(v) for v in conv.collected_tensors.values())
        ops.update(type(op).__name__ for op in conv.operations)
        for name, value in conv.convert(first, model=model, config=model.config).items():
            t = value[0] if isinstance(value, list) else value
            out.tensors[name] = t
            produced += 1
            if _storage(t) in mapped_storages:
                out.zero_copy.add(name)  # a view of the file (a split): still no copy
    if renamed or produced:
        what = []
        if renamed:
            what.append(f"{renamed} keys renamed")
        if produced:
            what.append(f"{sources} tensors converted into {produced} ({', '.join(sorted(ops))})")
        out.notes.append(
            f"applied transformers' checkpoint conversion for {type(model).__name__}: "
            + ", ".join(what)
        )
    return out


def _convert_v4(model: Any, mapped: Mapped) -> Mapped:
    fix = getattr(model, "_fix_state_dict_key_on_load", None)
    if not callable(fix):
        return mapped
    out = Mapped(files=mapped.files, format=mapped.format, notes=list(mapped.notes))
    for key, tensor in mapped.tensors.items():
        new = fix(key)
        new = new[0] if isinstance(new, tuple) else new
        out.tensors.setdefault(new, tensor)
        if key in mapped.zero_copy:
            out.zero_copy.add(new)
    return out


def _drop_ignored(model: Any, mapped: Mapped, model_keys: set[str]) -> Mapped:
    """Drop the checkpoint keys the model class declares it does not load (transformers' rules)."""
    unexpected = {k for k in mapped.tensors if k not in model_keys}
    if not unexpected:
        return mapped
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(unexpected))
    try:
        adjust(info)  # type: ignore[misc]
    except Exception as exc:  # another transformers: only the declared patterns
        import re

        logger.debug("transformers' key adjustment unavailable: %s", exc)
        patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        info.unexpected_keys = {k for k in unexpected if not any(re.search(p, k) for p in patterns)}
    ignored = unexpected - set(info.unexpected_keys)
    if not ignored:
        return mapped
    for key in ignored:
        mapped.tensors.pop(key)
        mapped.zero_copy.discard(key)
    mapped.notes.append(
        f"{len(ignored)} checkpoint keys that {type(model).__name__} declares unused were not "
        f"loaded (e.g. {sorted(ignored)[0]})"
    )
    return mapped


def _subtree(model: Any, mapped: Mapped, model_keys: set[str]) -> Mapped:
    """For a class that is one part of the saved model, the part of the checkpoint it is in."""
    tied = getattr(model, "all_tied_weights_keys", None)
    required = model_keys - set(tied or {})  # tied copies are not saved
    if not required or required <= mapped.tensors.keys():
        return mapped
    probe = min(required)
    prefixes = {k[: -len(probe)] for k in mapped.tensors if k.endswith("." + probe)}
    fits = [p for p in prefixes if all(p + k in mapped.tensors for k in required)]
    if len(fits) != 1:
        return mapped  # none, or several parts that could hold it: not ours to pick (strict says)
    prefix = fits[0]
    out = Mapped(files=mapped.files, format=mapped.format, notes=list(mapped.notes))
    for key, tensor in mapped.tensors.items():
        if key.startswith(prefix):
            out.tensors[key[len(prefix) :]] = tensor
            if key in mapped.zero_copy:
                out.zero_copy.add(key[len(prefix) :])
    left = len(mapped.tensors) - len(out.tensors)
    out.notes.append(
        f"loaded {type(model).__name__} from the checkpoint's {prefix!r} part; {left} keys of "
        "the other parts were not used"
    )
    return out


def hf_remap(model: nn.Module) -> Callable[[Mapped], Mapped]:
    """The key conversion ``from_pretrained`` would apply for ``model``, as a function of the
    mapped checkpoint (for :func:`fastinfer.loading._load.load_weights`)."""

    def remap(mapped: Mapped) -> Mapped:
        model_keys = set(model.state_dict().keys())
        out = _convert(model, mapped)
        out = _subtree(model, out, model_keys)
        return _drop_ignored(model, out, model_keys)

    return remap

"""load_weights_: fill a model built on meta from a checkpoint by memory map and assign (see
:mod:`fastinfer.loading`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastinfer import _env
from fastinfer.errors import ConfigError, StateDictMismatch
from fastinfer.loading import _formats as fmt
from fastinfer.loading import _pages as pages
from fastinfer.loading._report import LoadReport

__all__ = ["load_weights", "load_weights_", "validate_options"]

logger = logging.getLogger("fastinfer.loading")

# Prefixes that wrappers add to every key: DDP/DataParallel, torch.compile, some trainers.
_KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")


# --------------------------------------------------------------------------------------------
# load_weights_
# --------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    module: nn.Module
    name: str
    kind: str  # "parameter" | "buffer"
    tensor: torch.Tensor
    persistent: bool


def _slots(model: nn.Module) -> dict[str, _Slot]:
    out: dict[str, _Slot] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        pre = f"{prefix}." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out[pre + name] = _Slot(mod, name, "parameter", p, True)
        for name, b in mod._buffers.items():
            if b is not None:
                persistent = name not in mod._non_persistent_buffers_set
                out[pre + name] = _Slot(mod, name, "buffer", b, persistent)
    return out


def _tie_groups(model: nn.Module, slots: dict[str, _Slot]) -> tuple[list[list[str]], set[str]]:
    """Names that share one tensor: same object in the module, or tied by the HF convention."""
    parent: dict[str, str] = {k: k for k in slots}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        if a in parent and b in parent:
            parent[find(a)] = find(b)

    by_id: dict[int, str] = {}
    for key, slot in slots.items():
        first = by_id.setdefault(id(slot.tensor), key)
        union(key, first)
    hf_map = getattr(model, "get_expanded_tied_weights_keys", None)  # honours the HF config
    hf_keys: set[str] = set()
    if callable(hf_map):
        try:
            for target, source in dict(hf_map(all_submodels=True)).items():
                union(str(target), str(source))
                hf_keys |= {str(target), str(source)}
        except Exception as exc:  # an HF version with another signature: identity ties suffice
            logger.debug("tied-weights mapping unavailable: %s", exc)
    groups: dict[str, list[str]] = {}
    for key in slots:
        groups.setdefault(find(key), []).append(key)
    return list(groups.values()), hf_keys


def _strip(keys: Sequence[str], prefixes: Sequence[str]) -> dict[str, str]:
    """Map checkpoint key -> model key with the given prefixes removed (repeatedly)."""
    out = {}
    for k in keys:
        new = k
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if p and new.startswith(p):
                    new, changed = new[len(p) :], True
        out[k] = new
    return out


def _prefix_hint(missing: list[str], unexpected: list[str], model: nn.Module) -> str:
    candidates = list(_KNOWN_PREFIXES)
    base = getattr(model, "base_model_prefix", None)
    if isinstance(base, str) and base and f"{base}." not in candidates:
        candidates.append(f"{base}.")
    missing_set = set(missing)
    best, best_hits = "", 0
    for p in candidates:
        hits = sum(1 for k in unexpected if k.startswith(p) and k[len(p) :] in missing_set)
        if hits > best_hits:
            best, best_hits = p, hits
    if best_hits:
        why = {
            "module.": " (saved from DataParallel/DistributedDataParallel)",
            "_orig_mod.": " (saved from a torch.compile'd model)",
        }.get(best, "")
        return (
            f"\n  hint: {best_hits} checkpoint keys start with {best!r}{why} and match missing "
            f"keys once it is removed: pass strip_prefix={best!r}"
        )
    unexpected_set = set(unexpected)
    for p in candidates:
        hits = sum(1 for k in missing if k.startswith(p) and k[len(p) :] in unexpected_set)
        if hits:
            return (
                f"\n  hint: {hits} model keys start with {p!r} but the checkpoint's do not: load "
                f"into the submodule instead (e.g. load_weights_(model.{p[:-1]}, ...))"
            )
    return ""


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"    {k}" for k in keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {title} ({len(keys)}):\n{shown}{more}"


def validate_options(dtype: torch.dtype | None, device: str | torch.device) -> torch.device:
    """The ``dtype`` and ``device`` options, checked before anything is built or read."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(
            f"dtype must be a floating-point dtype (it applies to float tensors), got {dtype}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a valid torch device: {exc}") from None
    if dev.type == "meta":
        raise ConfigError(
            f"device={device!r}: loading onto the meta device loads nothing (meta tensors hold "
            "no data). To build a model without storage use fastinfer.empty_init() (load_model "
            "and load_pretrained already build under it), and load onto a device that holds "
            "data: device='cpu' or 'cuda'"
        )
    return dev


def _convert(
    t: torch.Tensor, dtype: torch.dtype | None, device: torch.device
) -> tuple[torch.Tensor, bool]:
    """Apply dtype/device to one tensor; returns (tensor, copied?)."""
    copied = False
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(device=device, dtype=dtype)  # one step: no intermediate copy on the source device
        copied = True
    if t.device != device:
        t = t.to(device)
        copied = True
    return t, copied


def _will_copy(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> bool:
    return (dtype is not None and t.is_floating_point() and t.dtype != dtype) or t.device != device


def _prefault(mapped: fmt.Mapped, tensors: list[torch.Tensor]) -> None:
    """Fault in the mapped pages of ``tensors`` before reading them: a page gone since the map
    (the file shrank) is a CheckpointError from ``madvise``'s EFAULT, not SIGBUS on the read."""
    if mapped.zero_copy:
        pages.populate(tensors, sources=mapped.sources, whole_storage=False)


def _make_param(t: torch.Tensor, old: torch.Tensor) -> nn.Parameter:
    rg = bool(old.requires_grad) and (t.is_floating_point() or t.is_complex())
    cls: Any = type(old)
    if cls is not nn.Parameter and isinstance(old, nn.Parameter):
        try:
            new = cls(t, requires_grad=rg)
            new.__dict__.update(old.__dict__)
            return new
        except Exception:
            pass
    return nn.Parameter(t, requires_grad=rg)


def load_weights_(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mmap: bool = True,
    strip_prefix: str | Sequence[str] | None = None,
    trust_pickle: bool = False,
    progress: bool | None = None,
    touch: bool = True,
) -> LoadReport:
    """Load ``checkpoint`` into ``model`` in place by assigning (not copying) mapped tensors.

    ``checkpoint`` is a ``torch.save`` file, a safetensors file, or a folder with a sharded
    checkpoint and its index JSON (or ``model.safetensors`` / ``pytorch_model.bin``). With
    ``mmap=True`` tensors are views of the file (zero copy); ``dtype`` (floating tensors) and
    ``device`` are applied tensor by tensor. ``strict=False`` ignores unexpected keys and keeps
    parameters the checkpoint lacks *if they are real* (never meta). ``strip_prefix`` removes
    prefixes such as ``"module."`` from checkpoint keys. ``touch`` pre-faults the mapped pages.

    Raises:
        ConfigError: a bad ``dtype`` or ``device`` (``"meta"`` loads nothing: it is refused).
        CheckpointError: missing, truncated or corrupt file (named).
        UnsafeCheckpointError: the pickle needs a full unpickle and ``trust_pickle`` is False.
        StateDictMismatch: missing/unexpected keys, shape or dtype mismatches, tensors left on meta.
    """
    return load_weights(
        model,
        checkpoint,
        strict=strict,
        dtype=dtype,
        device=device,
        mmap=mmap,
        strip_prefix=strip_prefix,
        trust_pickle=trust_pickle,
        progress=progress,
        touch=touch,
    )


def load_weights(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    *,
    strict: bool,
    dtype: torch.dtype | None,
    device: str | torch.device,
    mmap: bool,
    strip_prefix: str | Sequence[str] | None,
    trust_pickle: bool,
    progress: bool | None,
    touch: bool,
    construct_seconds: float = 0.0,
    memory_before: int | None = None,
    extra_prefixes: Sequence[str] = (),
    cast_unsaved_buffers: bool = True,
    keep_fp32: Sequence[str] = (),
    dtype_as_built: bool = False,
    remap: Callable[[fmt.Mapped], fmt.Mapped] | None = None,
) -> LoadReport:
    """:func:`load_weights_` with the options of the loaders built on it. ``dtype_as_built``:
    with a ``dtype``, each floating tensor takes the dtype the model built its slot in (the model
    was built in ``dtype``; a tensor its module makes in float32 on purpose stays float32), as
    ``from_pretrained`` loads."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    dev = validate_options(dtype, device)
    prefixes = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix or [])
    prefixes.extend(extra_prefixes)
    mem0 = memory_before if memory_before is not None else fmt.memory()["anonymous"]

    # -- map
    t0 = time.perf_counter()
    kind, files, _index = fmt.resolve(checkpoint)
    mapped = fmt.read(
        kind, files, mmap=mmap, trust_pickle=trust_pickle, progress=_env.progress_wanted(progress)
    )
    if remap is not None:  # checkpoint names -> model names (transformers' conversions)
        mapped = remap(mapped)
    t1 = time.perf_counter()
    # Nothing has touched a mapped page yet: a file that changed (truncated by a deploy writing it
    # in place) is reported here rather than found by SIGBUS.
    pages.check_unchanged(mapped.sources)

    # -- assign
    slots = _slots(model)
    renamed = _strip(list(mapped.tensors), prefixes)
    by_model_key: dict[str, str] = {}  # model key -> checkpoint key
    for ck, mk in renamed.items():
        by_model_key.setdefault(mk, ck)
    groups, hf_tied = _tie_groups(model, slots)
    untied: list[str] = []
    missing: list[str] = []
    missing_real: list[str] = []
    notes = list(mapped.notes)
    plan: list[tuple[list[str], str]] = []  # (slot keys of one tie group, checkpoint key)
    for group in groups:
        wanted = [k for k in group if slots[k].persistent]
        present = [k for k in wanted if k in by_model_key]
        if len(present) > 1 and hf_tied.issuperset(present):
            # Tied by the transformers convention: if the checkpoint holds different values
            # under each name, do as from_pretrained does and leave them untied.
            first = mapped.tensors[by_model_key[present[0]]]
            others = [mapped.tensors[by_model_key[k]] for k in present[1:]]
            _prefault(mapped, [first, *others])  # compared below: pages read
            if any(not _same(first, other) for other in others):
                notes.append(
                    f"{', '.join(present)} are tied by the model's config but differ in the "
                    "checkpoint: left untied (set tie_word_embeddings=False to silence this)"
                )
                logger.warning("%s", notes[-1])
                plan.extend(([k], by_model_key[k]) for k in present)
                untied.extend(present)
                continue
        if present:
            plan.append((group, by_model_key[present[0]]))
        elif wanted:
            if all(not slots[k].tensor.is_meta for k in group):
                missing_real.extend(wanted)
            missing.extend(wanted)
    used = {by_model_key[k] for k in slots if k in by_model_key}
    unexpected = [ck for ck in mapped.tensors if ck not in used]

    if strict and (missing or unexpected):
        msg = "checkpoint keys do not match the model"
        if missing:
            msg += _listing("missing from the checkpoint", sorted(missing))
        if unexpected:
            msg += _listing("unexpected in the checkpoint", sorted(unexpected))
        msg += _prefix_hint(sorted(missing), sorted(unexpected), model)
        msg += "\n  fix: load a checkpoint saved from this model class, or pass strict=False"
        raise StateDictMismatch(msg)

    def dtype_for(key: str) -> torch.dtype | None:
        if dtype is not None and keep_fp32 and set(key.split(".")) & set(keep_fp32):
            return torch.float32  # transformers' _keep_in_fp32_modules convention
        if dtype is not None and dtype_as_built and slots[key].tensor.is_floating_point():
            return slots[key].tensor.dtype  # from_pretrained: the dtype the model built it in
        return dtype

    mismatches: list[str] = []
    castable = uncastable = False  # dtype mismatches that dtype= would / would not resolve
    for group, ck in plan:
        src = mapped.tensors[ck]
        target = slots[group[0]].tensor
        if tuple(src.shape) != tuple(target.shape):
            mismatches.append(
                f"    {group[0]}: checkpoint {tuple(src.shape)} vs model {tuple(target.shape)}"
            )
        elif src.dtype != target.dtype:
            # dtype= casts floating tensors only (as module.to(dtype)): an integer, bool or
            # complex tensor keeps its dtype, so it never fits a floating slot, nor the reverse.
            both_float = src.is_floating_point() and target.is_floating_point()
            if both_float and dtype_for(group[0]) is not None:
                continue
            castable, uncastable = castable or both_float, uncastable or not both_float
            mismatches.append(
                f"    {group[0]}: checkpoint dtype {src.dtype} vs model dtype {target.dtype}"
            )
    if mismatches:
        hint = ""
        if uncastable:
            hint = (
                "; dtype= casts floating-point tensors only, so it cannot turn an integer, bool "
                "or complex checkpoint tensor into a floating-point one or the reverse: convert "
                "those tensors first (e.g. dequantize an int8 export) or fix the model's dtypes"
            )
        elif castable:
            hint = "; pass dtype= to cast floating tensors while loading"
        raise StateDictMismatch(
            f"{len(mismatches)} tensors in {str(checkpoint)!r} do not fit the model:\n"
            + "\n".join(mismatches[:20])
            + (f"\n    ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else "")
            + f"\n  fix: build the model with the configuration the checkpoint was saved from{hint}"
        )

    bytes_mapped = bytes_copied = 0
    loaded: list[torch.Tensor] = []
    keys_tied = 0
    counted: set[int] = set()  # mapped tensors already counted (one stored under two names)

    with torch.no_grad():
        for group, ck in plan:
            src = mapped.tensors[ck]
            if ck in mapped.zero_copy and _will_copy(src, dtype_for(group[0]), dev):
                _prefault(mapped, [src])  # the cast / move reads every page of it
            t, copied = _convert(src, dtype_for(group[0]), dev)
            nbytes = t.numel() * t.element_size()
            if copied:
                bytes_copied += nbytes
            elif id(t) not in counted:
                counted.add(id(t))
                if ck in mapped.zero_copy:
                    bytes_mapped += nbytes
                    loaded.append(t)
                else:
                    bytes_copied += nbytes
            lead = slots[group[0]]
            new: torch.Tensor = _make_param(t, lead.tensor) if lead.kind == "parameter" else t
            keys_tied += len(group) - 1
            for key in group:
                slot = slots[key]
                if slot.kind == "parameter":
                    slot.module._parameters[slot.name] = new  # type: ignore[assignment]
                else:
                    slot.module._buffers[slot.name] = new
        # Tensors the checkpoint does not hold (non-persistent buffers, strict=False leftovers).
        seen: set[int] = set()
        planned = {k for g, _ in plan for k in g}
        for group in groups:
            if planned.intersection(group):
                continue
            slot = slots[group[0]]
            if slot.tensor.is_meta or id(slot.tensor) in seen:
                continue
            seen.add(id(slot.tensor))
            unsaved_dtype = dtype_for(group[0]) if cast_unsaved_buffers else None
            t, copied = _convert(slot.tensor, unsaved_dtype, dev)
            if copied:
                bytes_copied += t.numel() * t.element_size()
                new = _make_param(t, slot.tensor) if slot.kind == "parameter" else t
                for key in group:
                    s = slots[key]
                    store = s.module._parameters if s.kind == "parameter" else s.module._buffers
                    store[s.name] = new  # type: ignore[assignment]

    tie = getattr(model, "tie_weights", None)
    if untied:
        tied_map = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied_map, dict):  # transformers' own record, so it does not re-tie later
            for key in untied:
                tied_map.pop(key, None)
    elif callable(tie) and hasattr(model, "get_expanded_tied_weights_keys"):
        tie()  # the Hugging Face convention (the groups above already share objects)
    _check_no_meta(model)
    t2 = time.perf_counter()

    # -- first touch
    if touch and loaded and dev.type == "cpu":
        pages.check_unchanged(mapped.sources)
        pages.populate(loaded, sources=mapped.sources)
    t3 = time.perf_counter()

    mem = fmt.memory()
    if not mmap:
        notes.append("mmap=False: the checkpoint was read into private memory")
    return LoadReport(
        checkpoint=str(checkpoint),
        format=mapped.format,
        files=tuple(str(f) for f in mapped.files),
        keys_loaded=len(plan),
        keys_tied=keys_tied,
        construct_seconds=construct_seconds,
        map_seconds=t1 - t0,
        assign_seconds=t2 - t1,
        first_touch_seconds=t3 - t2,
        bytes_mapped=bytes_mapped,
        bytes_copied=bytes_copied,
        private_bytes=mem["anonymous"],
        shared_bytes=mem["file"],
        pss_bytes=mem["pss"],
        private_added_bytes=max(0, mem["anonymous"] - mem0),
        dtype=None if dtype is None else str(dtype),
        device=str(dev),
        missing_keys=tuple(sorted(missing_real)) if not strict else (),
        unexpected_keys=tuple(unexpected) if not strict else (),
        notes=tuple(notes),
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # one storage saved under two names (torch.save of a tied model)
    return bool(torch.equal(a, b))


def _check_no_meta(model: nn.Module) -> None:
    left: list[str] = []
    for key, slot in _slots(model).items():
        if slot.tensor.is_meta:
            if slot.kind == "buffer" and not slot.persistent:
                why = (
                    "non-persistent buffer, never saved: either the model was built on the meta "
                    "device (build it under fastinfer.empty_init(), which creates buffers for "
                    "real), or its __init__ computed the buffer from a parameter, which has no "
                    "data under empty_init (as load_model builds): compute it after loading, or "
                    "build the model normally and use fastinfer.load_weights_"
                )
            else:
                why = "not in the checkpoint"
            left.append(f"    {slot.kind} {key!r} ({why})")
    if left:
        raise StateDictMismatch(
            f"{len(left)} tensors are still on the meta device after loading (a forward would "
            "fail):\n"
            + "\n".join(left[:30])
            + (f"\n    ... and {len(left) - 30} more" if len(left) > 30 else "")
        )

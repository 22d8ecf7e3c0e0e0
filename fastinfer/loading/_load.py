"""Fast, correct model loading: meta-device construction + memory-mapped checkpoints + assign.

    with fastinfer.empty_init():
        model = MyModel()                      # parameters on meta: no storage, no init
    report = fastinfer.load_weights_(model, "model.safetensors")
    model = fastinfer.load_model(MyModel, "ckpt.pt", width=4096)   # the three steps in one

Weights stay in the page cache, mapped into the process (zero copy), so several processes that load
the same file share one copy. Buffers are built for real during construction (so computed,
non-persistent buffers such as RoPE ``inv_freq`` are never left on meta), tied weights stay tied,
and nothing is left on meta after a load (checked). See docs/loading.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fastinfer import _loading_formats as fmt
from fastinfer._loading_init import empty_init
from fastinfer._optional import require
from fastinfer.errors import CheckpointError, ConfigError, LoadError, StateDictMismatch

__all__ = [
    "LoadReport",
    "empty_init",
    "load_model",
    "load_pretrained",
    "load_weights_",
    "save_weights",
]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

# Prefixes that wrappers add to every key: DDP/DataParallel, torch.compile, some trainers.
_KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class LoadReport:
    """What one load did: phase times (seconds), bytes mapped vs copied, memory, keys.

    ``private_bytes`` is this process's private anonymous resident memory after the load (the
    memory a second worker would not share); ``shared_bytes`` its file-backed resident memory
    (page-cache pages, shared with every process that maps the same file); ``private_added_bytes``
    how much private memory the load itself added.
    """

    checkpoint: str
    format: str
    files: tuple[str, ...]
    keys_loaded: int
    keys_tied: int
    construct_s: float
    map_s: float
    assign_s: float
    first_touch_s: float
    bytes_mapped: int
    bytes_copied: int
    private_bytes: int
    shared_bytes: int
    pss_bytes: int
    private_added_bytes: int
    dtype: str | None
    device: str
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def total_s(self) -> float:
        return self.construct_s + self.map_s + self.assign_s + self.first_touch_s

    def __str__(self) -> str:
        lines = [
            f"LoadReport: {self.keys_loaded} tensors from {self.checkpoint} ({self.format}, "
            f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}) in {self.total_s:.3f}s",
            f"  phases: construct {self.construct_s:.3f}s, map {self.map_s:.3f}s, "
            f"assign {self.assign_s:.3f}s, first touch {self.first_touch_s:.3f}s",
            f"  bytes: mapped {_mib(self.bytes_mapped)}, copied {_mib(self.bytes_copied)}"
            f"{f' (dtype {self.dtype})' if self.dtype else ''} on {self.device}",
            f"  memory: private {_mib(self.private_bytes)} (+{_mib(self.private_added_bytes)} "
            f"by this load), shared {_mib(self.shared_bytes)}, PSS {_mib(self.pss_bytes)}",
        ]
        if self.keys_tied:
            lines.append(f"  tied: {self.keys_tied} names share a loaded tensor")
        if self.missing_keys:
            lines.append(f"  missing (kept as built): {fmt._preview(list(self.missing_keys))}")
        if self.unexpected_keys:
            lines.append(f"  unexpected (ignored): {fmt._preview(list(self.unexpected_keys))}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


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


def _validate_options(dtype: torch.dtype | None, device: str | torch.device) -> torch.device:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(
            f"dtype must be a floating-point dtype (it applies to float tensors), got {dtype}"
        )
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a valid torch device: {exc}") from None


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
        CheckpointError: missing, truncated or corrupt file (named).
        UnsafeCheckpointError: the pickle needs a full unpickle and ``trust_pickle`` is False.
        StateDictMismatch: missing/unexpected keys, shape or dtype mismatches, tensors left on meta.
    """
    return _load_weights(
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


def _load_weights(
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
    construct_s: float = 0.0,
    memory_before: int | None = None,
    extra_prefixes: Sequence[str] = (),
    cast_unsaved_buffers: bool = True,
    keep_fp32: Sequence[str] = (),
) -> LoadReport:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    dev = _validate_options(dtype, device)
    prefixes = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix or [])
    prefixes.extend(extra_prefixes)
    mem0 = memory_before if memory_before is not None else fmt.memory()["anonymous"]

    # -- map
    t0 = time.perf_counter()
    kind, files, _index = fmt.resolve(checkpoint)
    mapped = fmt.read(
        kind, files, mmap=mmap, trust_pickle=trust_pickle, progress=fmt.progress_enabled(progress)
    )
    t1 = time.perf_counter()

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
            if any(not _same(first, mapped.tensors[by_model_key[k]]) for k in present[1:]):
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

    mismatches: list[str] = []
    for group, ck in plan:
        src = mapped.tensors[ck]
        target = slots[group[0]].tensor
        if tuple(src.shape) != tuple(target.shape):
            mismatches.append(
                f"    {group[0]}: checkpoint {tuple(src.shape)} vs model {tuple(target.shape)}"
            )
        elif dtype is None and src.dtype != target.dtype:
            mismatches.append(
                f"    {group[0]}: checkpoint dtype {src.dtype} vs model dtype {target.dtype}"
            )
    if mismatches:
        hint = ""
        if any("dtype" in m for m in mismatches):
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

    def dtype_for(key: str) -> torch.dtype | None:
        if dtype is not None and keep_fp32 and set(key.split(".")) & set(keep_fp32):
            return torch.float32  # transformers' _keep_in_fp32_modules convention
        return dtype

    with torch.no_grad():
        for group, ck in plan:
            src = mapped.tensors[ck]
            t, copied = _convert(src, dtype_for(group[0]), dev)
            nbytes = t.numel() * t.element_size()
            if copied or ck not in mapped.zero_copy:
                bytes_copied += nbytes
            else:
                bytes_mapped += nbytes
                loaded.append(t)
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
        fmt.populate(loaded)
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
        construct_s=construct_s,
        map_s=t1 - t0,
        assign_s=t2 - t1,
        first_touch_s=t3 - t2,
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
                    "non-persistent buffer, never saved: build the model under "
                    "fastinfer.empty_init(), which creates buffers for real"
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


# --------------------------------------------------------------------------------------------
# load_model / load_pretrained
# --------------------------------------------------------------------------------------------


def load_model(
    factory_or_class: Callable[..., M],
    checkpoint: str | os.PathLike[str],
    *args: Any,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mmap: bool = True,
    strip_prefix: str | Sequence[str] | None = None,
    trust_pickle: bool = False,
    progress: bool | None = None,
    touch: bool = True,
    on_report: Callable[[LoadReport], None] | None = None,
    **kwargs: Any,
) -> M:
    """Build ``factory_or_class(*args, **kwargs)`` under :func:`empty_init`, load, return it in eval.

    The :class:`LoadReport` goes to ``on_report`` when given (and is logged at DEBUG).

        model = fastinfer.load_model(RotaryMLP, "ckpt.pt", width=4096, layers=24)
    """
    if not callable(factory_or_class):
        raise ConfigError(f"factory_or_class must be callable, got {factory_or_class!r}")
    mem0 = fmt.memory()["anonymous"]
    t0 = time.perf_counter()
    with empty_init():
        model = factory_or_class(*args, **kwargs)
    construct_s = time.perf_counter() - t0
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory_or_class returned a {type(model).__name__}, not an nn.Module")
    report = _load_weights(
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
        construct_s=construct_s,
        memory_before=mem0,
    )
    logger.debug("%s", report)
    if on_report is not None:
        on_report(report)
    return model.eval()


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    model_class: Any = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mmap: bool = True,
    trust_pickle: bool = False,
    progress: bool | None = None,
    touch: bool = True,
    on_report: Callable[[LoadReport], None] | None = None,
    **config_kwargs: Any,
) -> Any:
    """Load a Hugging Face ``transformers`` model saved with ``save_pretrained`` from a local folder.

    The class comes from ``config.architectures`` unless ``model_class`` is given (a model class or
    an ``Auto*`` class). It is built under :func:`empty_init` and loaded by the same zero-copy path
    as :func:`load_weights_`; ``dtype=None`` uses the ``dtype`` recorded in ``config.json``.

        model = fastinfer.load_pretrained("./my-bert")
    """
    transformers = require("transformers", purpose="fastinfer.load_pretrained")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not a save_pretrained folder (no config.json); "
            "for a bare checkpoint use fastinfer.load_model"
        )
    mem0 = fmt.memory()["anonymous"]
    t0 = time.perf_counter()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, **config_kwargs)
    cls = model_class
    if cls is None:
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            cls = transformers.AutoModel
    if dtype is None:
        recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(recorded, str):
            recorded = getattr(torch, recorded, None)
        dtype = recorded if isinstance(recorded, torch.dtype) else None
    with empty_init():  # Auto* classes build through from_config
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    construct_s = time.perf_counter() - t0
    extra: list[str] = []
    base = getattr(model, "base_model_prefix", "")
    if base and not hasattr(model, base):
        extra.append(f"{base}.")  # a base model loaded from a head model's checkpoint
    keep: set[str] = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    report = _load_weights(
        model,
        folder,
        strict=strict,
        dtype=dtype,
        device=device,
        mmap=mmap,
        strip_prefix=None,
        trust_pickle=trust_pickle,
        progress=progress,
        touch=touch,
        construct_s=construct_s,
        memory_before=mem0,
        extra_prefixes=extra,
        # As from_pretrained: buffers keep the dtype they were computed in (RoPE inv_freq stays fp32).
        cast_unsaved_buffers=False,
        keep_fp32=sorted(keep),
    )
    gen = folder / "generation_config.json"
    if gen.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    logger.debug("%s", report)
    if on_report is not None:
        on_report(report)
    return model.eval()


# --------------------------------------------------------------------------------------------
# save_weights
# --------------------------------------------------------------------------------------------


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
            f"cannot save {len(meta)} tensors on the meta device (no data): {fmt._preview(meta)}"
        )
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
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
        os.replace(tmp, target)
        try:
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

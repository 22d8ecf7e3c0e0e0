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
(``_keys_to_ignore_on_load_unexpected``, e.g. the decoder for ``T5EncoderModel``; also legacy
buffers such as GPT-2's ``attn.masked_bias``, and a head's keys when a base model loads from the
folder of a model with that head, which ``from_pretrained`` loads too); weights it does
not save because ``_init_weights`` computes them (Marian's sinusoidal position embeddings), which
are computed the same way (only where that is deterministic: a random one is reported missing);
and, for a class that is one part of the saved model (``WhisperEncoder`` from a ``WhisperModel``
folder, ``BartEncoder`` from a BART folder whose ``encoder.embed_tokens`` is saved as the tied
``shared.weight``), the part of the checkpoint that holds its weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from copy import deepcopy
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fastinfer.loading._formats import Mapped, preview

__all__ = ["hf_remap", "recompute_buffers_"]

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


# Buffers older transformers saved (persistent then) that today's classes neither have nor all
# declare: GPT-2's constant mask fill value ``attn.masked_bias`` (-1e4). GPT-J and GPT-NeoX
# declare it in ``_keys_to_ignore_on_load_unexpected``; GPT-2 declares only ``attn.bias``.
_LEGACY_BUFFERS = re.compile(r"(^|\.)masked_bias$")


def _legacy_buffers(model: Any, mapped: Mapped, keys: set[str]) -> set[str]:
    """The ``keys`` that are such a legacy buffer: the name, one value, in a module the model has
    (under the base model's prefix or not)."""
    base = getattr(model, "base_model_prefix", "") or ""
    found = set()
    for key in keys:
        if not _LEGACY_BUFFERS.search(key) or mapped.tensors[key].numel() != 1:
            continue
        owner = key.rpartition(".")[0]
        for path in dict.fromkeys([owner, owner.removeprefix(f"{base}.") if base else owner]):
            try:
                model.get_submodule(path)
            except AttributeError:
                continue
            found.add(key)
            break
    return found


def _drop_head(model: Any, mapped: Mapped, model_keys: set[str], saved_keys: set[str]) -> Mapped:
    """A base model loaded from the folder of a model with a head (``BertModel`` from a
    ``BertForSequenceClassification`` folder): the base model's weights are under its prefix
    (``bert.``), the head's (``classifier.*``) are not, and the base model has no place for them.
    ``from_pretrained`` loads it and lists them as expected for another architecture; so are they
    left out here, with a note. Keys under the prefix that fit nowhere are still unexpected."""
    base = getattr(model, "base_model_prefix", "") or ""
    if not base or hasattr(model, base):
        return mapped
    prefix = f"{base}."
    if not any(k.startswith(prefix) for k in saved_keys):
        return mapped
    head = sorted(k for k in mapped.tensors if k not in model_keys and not k.startswith(prefix))
    if not head:
        return mapped
    for key in head:
        mapped.tensors.pop(key)
        mapped.zero_copy.discard(key)
    mapped.notes.append(
        f"loaded {type(model).__name__} from the {prefix!r} part of the checkpoint of a model "
        f"with a head: the head's {len(head)} keys were not used ({preview(head)})"
    )
    logger.info("%s", mapped.notes[-1])
    return mapped


def _drop_ignored(model: Any, mapped: Mapped, model_keys: set[str]) -> Mapped:
    """Drop the checkpoint keys the model class declares it does not load (transformers' rules),
    and legacy buffers older transformers saved (:data:`_LEGACY_BUFFERS`)."""
    unexpected = {k for k in mapped.tensors if k not in model_keys}
    if not unexpected:
        return mapped
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(unexpected))
    try:
        adjust(info)  # type: ignore[misc]
    except Exception as exc:  # another transformers: only the declared patterns
        logger.debug("transformers' key adjustment unavailable: %s", exc)
        patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        info.unexpected_keys = {k for k in unexpected if not any(re.search(p, k) for p in patterns)}
    ignored = unexpected - set(info.unexpected_keys)
    legacy = _legacy_buffers(model, mapped, set(info.unexpected_keys))
    for key in ignored | legacy:
        mapped.tensors.pop(key)
        mapped.zero_copy.discard(key)
    name = type(model).__name__
    if ignored:
        mapped.notes.append(
            f"{len(ignored)} checkpoint keys that {name} declares unused were not loaded "
            f"({preview(sorted(ignored))})"
        )
        logger.info("%s", mapped.notes[-1])
    if legacy:
        mapped.notes.append(
            f"{len(legacy)} legacy buffers that older transformers saved and {name} no longer "
            f"has were not loaded ({preview(sorted(legacy))})"
        )
        logger.info("%s", mapped.notes[-1])
    return mapped


def _declared_missing(model: Any, keys: set[str]) -> set[str]:
    """The ``keys`` the model class declares it may lack in a checkpoint (transformers' rules:
    ``_keys_to_ignore_on_load_missing`` patterns, ``_keys_to_ignore_on_save`` names)."""
    if not keys:
        return set()
    info = SimpleNamespace(missing_keys=set(keys), unexpected_keys=set())
    try:
        model._adjust_missing_and_unexpected_keys(info)
    except Exception as exc:  # another transformers: only the declared patterns
        logger.debug("transformers' key adjustment unavailable: %s", exc)
        patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
        info.missing_keys = {k for k in keys if not any(re.search(p, k) for p in patterns)}
    unsaved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    return (set(keys) - set(info.missing_keys)) | (set(keys) & unsaved)


def _find_part(available: set[str], required: set[str], model_keys: set[str]) -> str | None:
    """The one prefix under which ``available`` holds every ``required`` key, or None. Where
    several do (an encoder's keys are also a decoder's), the one holding nothing else wins."""
    probe = min(required)
    prefixes = {k[: -len(probe)] for k in available if k.endswith("." + probe)}
    fits = sorted(p for p in prefixes if all(p + k in available for k in required))
    exact = [
        p for p in fits if all(k[len(p) :] in model_keys for k in available if k.startswith(p))
    ]
    if len(exact) == 1:
        return exact[0]
    return fits[0] if len(fits) == 1 else None  # none, or several: not ours to pick


def _subtree(
    model: Any,
    mapped: Mapped,
    model_keys: set[str],
    saved: Callable[[], Any] | None,
    regenerated: set[str],
) -> Mapped:
    """For a class that is one part of the saved model, the part of the checkpoint it is in.

    The saved model does not write the copies of its tied weights (BART's ``encoder.embed_tokens``
    is saved as ``shared.weight``) nor the weights it computes (Marian's sinusoidal position
    embeddings): when the part is not found in the file as it is, it is looked for again with the
    saved class's ties and declared regenerated keys (``saved()`` builds that class on meta). The
    part's keys that the saved class regenerates are added to ``regenerated``.
    """
    tied = getattr(model, "all_tied_weights_keys", None)
    required = model_keys - set(tied or {})  # tied copies are not saved
    if not required or required <= mapped.tensors.keys():
        return mapped
    tensors = dict(mapped.tensors)
    zero_copy = set(mapped.zero_copy)
    aliases: dict[str, str] = {}
    computed: set[str] = set()
    prefix = _find_part(set(tensors), required, model_keys)
    whole = saved() if prefix is None and saved is not None else None
    if whole is not None:
        saved_ties = getattr(whole, "all_tied_weights_keys", None) or {}
        for target, source in dict(saved_ties).items():
            if target not in tensors and source in tensors:
                tensors[target] = tensors[source]
                aliases[target] = source
                if source in zero_copy:
                    zero_copy.add(target)
        saved_keys = set(whole.state_dict().keys())
        computed = _declared_missing(whole, saved_keys - tensors.keys())
        prefix = _find_part(set(tensors) | computed, required, model_keys)
    if prefix is None:
        return mapped
    out = Mapped(files=mapped.files, format=mapped.format, notes=list(mapped.notes))
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            out.tensors[key[len(prefix) :]] = tensor
            if key in zero_copy:
                out.zero_copy.add(key[len(prefix) :])
    regenerated.update(k[len(prefix) :] for k in computed if k.startswith(prefix))
    used = sum(1 for k in mapped.tensors if k.startswith(prefix))
    via = [f"{k[len(prefix) :]} from {aliases[k]}" for k in sorted(aliases) if k.startswith(prefix)]
    out.notes.append(
        f"loaded {type(model).__name__} from the checkpoint's {prefix!r} part; "
        f"{len(mapped.tensors) - used} keys of the other parts were not used"
        + (f"; tied in the saved model: {', '.join(via)}" if via else "")
    )
    return out


def _initialised(model: Any, key: str) -> torch.Tensor | None:
    """``key`` as transformers' ``_init_weights`` computes it, or None where that is random or
    does not set every element (two runs under different seeds, from different fill values, must
    agree). ``_init_weights`` runs on the owning module and then each module above it, each with
    its nearest ``PreTrainedModel``'s method, as ``initialize_weights`` does; the other tensors are
    still on meta (marked initialised), so nothing else is written."""
    from transformers import PreTrainedModel

    from fastinfer.loading._empty_init import empty_init

    guard: Callable[[], AbstractContextManager[Any]] = nullcontext
    try:
        from transformers.initialization import guard_torch_init_functions as guard
    except ImportError:  # another transformers: its init functions as they are
        pass

    path, _, name = key.rpartition(".")
    chain = [model]
    for part in path.split(".") if path else ():
        chain.append(getattr(chain[-1], part))
    owner = chain[-1]
    store = owner._parameters if name in owner._parameters else owner._buffers
    current = store.get(name)
    if current is None or not isinstance(model, PreTrainedModel):
        return None
    runs: list[torch.Tensor] = []
    for seed in (1, 2):
        fresh = torch.empty_like(current, device="cpu").fill_(seed % 2)
        grad = bool(current.requires_grad) and fresh.is_floating_point()
        value = nn.Parameter(fresh, requires_grad=grad) if name in owner._parameters else fresh
        store[name] = value
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), guard(), empty_init():
                torch.manual_seed(seed)
                for depth in range(len(chain) - 1, -1, -1):
                    init = next(
                        m for m in reversed(chain[: depth + 1]) if isinstance(m, PreTrainedModel)
                    )
                    init._init_weights(chain[depth])
        except Exception as exc:  # an initialiser that needs more of the model than this key
            logger.debug("could not initialise %s with _init_weights: %s", key, exc)
            return None
        finally:
            store[name] = current
        runs.append(value.detach())
    return runs[0] if torch.equal(runs[0], runs[1]) else None


def recompute_buffers_(model: nn.Module) -> int:
    """Recompute the model's floating non-persistent buffers with ``_init_weights``, as
    ``from_pretrained`` does after building under the model's dtype: a buffer keeps the dtype it
    was built in, with the values ``_init_weights`` computes under torch's usual default dtype
    (GPT-J's sinusoidal table built under bfloat16 rounds its frequencies; the recomputed one
    does not). A buffer ``_init_weights`` does not compute keeps its value. Returns the number
    of buffers changed."""
    new: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if buffer is None or buffer.is_meta or not buffer.is_floating_point():
                continue
            if id(buffer) in new:
                continue
            value = _initialised(model, f"{prefix}.{name}" if prefix else name)
            if value is not None and not torch.equal(value, buffer):
                new[id(buffer)] = value
    if new:  # a buffer two modules share stays shared
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and id(buffer) in new:
                    module._buffers[name] = new[id(buffer)]
    return len(new)


def _regenerate(model: Any, mapped: Mapped, model_keys: set[str], regenerated: set[str]) -> Mapped:
    """Add the weights the checkpoint lacks because the model class computes them (declared in
    ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_save``, or by the saved class for a
    part): each computed by ``_init_weights`` as ``from_pretrained`` computes it. A declared key
    whose ``_init_weights`` is random stays missing (reported, never silently random)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    base = getattr(model, "base_model_prefix", "") or ""
    missing = {
        k
        for k in model_keys - tied
        if k not in mapped.tensors and not (base and f"{base}.{k}" in mapped.tensors)
    }
    declared = _declared_missing(model, missing) | (regenerated & missing)
    if not declared:
        return mapped
    made: list[str] = []
    random: list[str] = []
    for key in sorted(declared):
        value = _initialised(model, key)
        if value is None:
            random.append(key)
            continue
        mapped.tensors[key] = value
        made.append(key)
    name = type(model).__name__
    if made:
        mapped.notes.append(
            f"{len(made)} weights the checkpoint does not hold (the model class computes them) "
            f"were computed by {name}._init_weights, as from_pretrained computes them: "
            + preview(made)
        )
    if random:
        mapped.notes.append(
            f"{len(random)} weights the model class declares it may lack are initialised at "
            f"random by {name}._init_weights, so they are reported missing: " + preview(random)
        )
        logger.warning("%s", mapped.notes[-1])
    return mapped


def hf_remap(
    model: nn.Module, *, saved: Callable[[], Any] | None = None
) -> Callable[[Mapped], Mapped]:
    """The key conversion ``from_pretrained`` would apply for ``model``, as a function of the
    mapped checkpoint (for :func:`fastinfer.loading._load.load_weights`), with the weights the
    model class computes instead of saving added. ``saved`` builds the class the checkpoint was
    saved from (on meta), when ``model`` may be one part of it; it is called only if needed."""

    def remap(mapped: Mapped) -> Mapped:
        model_keys = set(model.state_dict().keys())
        regenerated: set[str] = set()
        saved_keys = set(mapped.tensors)
        out = _convert(model, mapped)
        out = _subtree(model, out, model_keys, saved, regenerated)
        out = _drop_head(model, out, model_keys, saved_keys)
        out = _drop_ignored(model, out, model_keys)
        return _regenerate(model, out, model_keys, regenerated)

    return remap

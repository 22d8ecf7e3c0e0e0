"""swap_attention_ itself: discover candidates, reuse or make a decision, apply the winner, undo."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fastinfer import _torch_compat
from fastinfer._common.files import decision_not_stored
from fastinfer._common.manifest import environment_manifest
from fastinfer._common.padding import empty_batch
from fastinfer.attention import _decisions
from fastinfer.attention._candidate import Candidate
from fastinfer.attention._diagnose import diagnose, diagnose_static, native_modules
from fastinfer.attention._discover import discover
from fastinfer.attention._kernels_hf import FastHFEncoder
from fastinfer.attention._kernels_torch import PackedTorchEncoder
from fastinfer.attention._profile import PaddingProfile, profile_inputs
from fastinfer.attention._select import (
    Measured,
    check_inputs,
    measure,
    representative,
    rule_choice,
    verify_choice,
)
from fastinfer.attention._types import ORIGINAL, AttentionReport, PathResult
from fastinfer.attention._undo import DropAttr, Undo
from fastinfer.errors import AttentionSwapError, ConfigError

__all__ = ["DEFAULT_BUDGET_SECONDS", "swap_attention_", "undo_attention_swap_"]

logger = logging.getLogger("fastinfer.attention")

#: The default time budget of one measured choice (seconds, on the injected clock).
DEFAULT_BUDGET_SECONDS = 5.0

#: Where a swap's record ``(undo, report)`` lives: on the swapped model itself, so that
#: ``copy.deepcopy``, ``pickle`` and ``torch.save`` carry it to a copy (pointing at the copy's
#: own modules) and the copy can be undone, or refuses a second swap, like the original.
SWAP_RECORD = "_fastinfer_swap"


def _already_swapped(model: nn.Module) -> str:
    """Why ``model`` cannot be swapped again ("" when it can): it, or a module inside it, is
    swapped already (a second swap would wrap the replacement in another one)."""
    entry = model.__dict__.get(SWAP_RECORD)
    if entry is not None and entry[1].chosen != ORIGINAL:
        return (
            f"{type(model).__name__} is already swapped (to {entry[1].chosen}); "
            "call fastinfer.undo_attention_swap_(model) first"
        )
    for name, m in model.named_modules():
        entry = m.__dict__.get(SWAP_RECORD)
        if name and entry is not None and entry[1].chosen != ORIGINAL:
            return (
                f"{type(model).__name__}'s submodule {name!r} is already swapped (to "
                f"{entry[1].chosen}); undo that first: "
                f"fastinfer.undo_attention_swap_(model.get_submodule({name!r}))"
            )
        if isinstance(m, (FastHFEncoder, PackedTorchEncoder)):
            return (
                f"{type(model).__name__}'s submodule {name!r} is a {type(m).__name__}, put in by "
                "an earlier swap_attention_ whose record is not on this model; swap the model "
                "that swap was made on, after undo_attention_swap_, or a copy taken before it"
            )
    return ""


def swap_attention_(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    prefer: str | Sequence[str] | None = None,
    verify: bool = True,
    padding_profile: tuple[int, int, float] | None = None,
    repeat: int = 5,
    warmup: int = 1,
    rtol: float | None = None,
    atol: float | None = None,
    budget_seconds: float | None = DEFAULT_BUDGET_SECONDS,
    sample_rows: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> AttentionReport:
    """Switch ``model`` in place to its fastest correct attention path; return what was done.

    Args:
        example_inputs: a batch the model is called with (a dict of keyword arguments, a tuple of
            positional ones, or one tensor). With it every candidate path is verified on valid
            positions and timed, and the fastest correct one is kept. The padding mask is found
            by name (``attention_mask``: 1 = token; ``src_key_padding_mask`` /
            ``key_padding_mask``: True = padding) or, around torch's own encoders, as the one
            ``(B, T)`` bool argument.
        prefer: a path name (or names) to restrict the choice to, e.g. ``"hf:packed"``.
        verify: compare with the original and undo the swap on mismatch (needs example inputs).
        padding_profile: ``(batch_size, seq_len, padding_fraction)`` to synthesise example inputs
            (Hugging Face models and bare ``nn.TransformerEncoder``).
        repeat / warmup: interleaved timing rounds (paths still close after ``repeat`` rounds get
            up to ``repeat`` more; clearly slower ones are dropped after each round) and untimed
            calls per path.
        rtol / atol: override the shared per-dtype tolerances
            (:mod:`fastinfer._common.tolerances`), as in :func:`fastinfer.compile_model`.
        budget_seconds: time allowed for measuring (default 5 s; None: unbounded). Paths that do
            not fit are reported as not measured; a call is never started past the budget.
        sample_rows: rows of the example to time on (default: about 512 tokens, at least 2, picked
            to keep the example's padding profile); the batch size times the whole example.
        cache_dir: where measured decisions are kept (``<cache_dir>/decisions``; default
            ``$FASTINFER_CACHE_DIR``, none when unset). A decision is keyed by the model's
            structure, the input's shape class and the environment; a hit applies the stored
            choice without timing anything. ``refresh=True`` measures again.
        clock: the clock timing and the budget read (tests inject a fake one).

    Without inputs the path is chosen by rule (hf:packed for BERT-family encoders, hf:sdpa for
    other HF models, torch:fastpath-nested for nn.TransformerEncoder, registered replacements).

    Raises:
        AttentionSwapError: the model (a copy of a swapped model included) or a module inside
            it is already swapped, or a preferred path is unavailable.
        ConfigError: bad arguments.
    """
    started = clock()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"swap_attention_ needs an nn.Module, got {type(model).__name__}")
    swapped = _already_swapped(model)
    if swapped:
        raise AttentionSwapError(swapped)
    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}")
    if budget_seconds is not None and not budget_seconds > 0:
        raise ConfigError(f"budget_seconds must be > 0 or None, got {budget_seconds!r}")
    if padding_profile is not None:
        if example_inputs is not None:
            raise ConfigError("pass example_inputs or padding_profile, not both")
        example_inputs = profile_inputs(model, PaddingProfile(*padding_profile))
    if example_inputs is not None and (empty := empty_batch(example_inputs)):
        raise ConfigError(
            f"example_inputs has an empty batch ({empty} has 0 rows): nothing can be verified or "
            "timed on it; pass a batch of at least one row, like those you serve"
        )

    # timing the model as built and its nested candidates makes nested tensors: torch's
    # one-time prototype warning is nothing the user can act on
    _torch_compat.spend_nested_prototype_warning()
    kind, cands, notes = discover(model)
    wanted = [prefer] if isinstance(prefer, str) else list(prefer or [])
    names = [c.name for c in cands]
    for w in wanted:
        if w not in names:
            raise AttentionSwapError(
                f"path {w!r} does not exist for {type(model).__name__}; its paths are {names}"
            )

    results: dict[str, PathResult] = {}
    usable = []
    for c in cands:
        if c.unavailable:
            results[c.name] = PathResult(
                c.name, False, c.unavailable, compile_useful=c.compile_useful
            )
        elif wanted and c.name not in wanted:
            results[c.name] = PathResult(
                c.name, False, "not in prefer", compile_useful=c.compile_useful
            )
        else:
            usable.append(c)
    if wanted and not usable:
        raise AttentionSwapError(
            f"preferred path(s) {wanted} cannot run here: "
            + "; ".join(f"{n}: {results[n].reason}" for n in wanted)
        )
    by_name = {c.name: c for c in cands}

    undo = Undo()
    measured = example_inputs is not None
    deadline = None if budget_seconds is None else started + budget_seconds
    outcome: Measured | None = None
    measured_on: tuple[int, int] | None = None
    from_cache = False
    verified: bool | None = None
    reverted = False
    sample = example_inputs
    fast_before: tuple[tuple[str, str], ...] = ()
    if measured:
        folder = _decisions.decisions_dir(cache_dir) if usable else None
        cached: dict[str, Any] | None = None
        key, key_doc, manifest = "", dict[str, Any](), dict[str, Any]()
        if folder is not None:
            manifest = environment_manifest(compiler=False)
            key, key_doc = _decisions.decision_key(
                model,
                example_inputs,
                prefer=wanted,
                verify=verify,
                rtol=rtol,
                atol=atol,
                manifest=manifest,
            )
            if not refresh:
                cached, refused = _decisions.load(folder, key, manifest)
                if refused:
                    notes.append(refused)
        if cached is not None:
            fast_before = diagnose(model, check_inputs(model, example_inputs))
            chosen, undo, problem = _reuse(
                model, example_inputs, cached, by_name, verify, rtol, atol
            )
            if problem:
                notes.append(f"the cached decision ({cached['chosen']}) was not reused: {problem}")
                cached = None
            else:
                from_cache = True
                sample = check_inputs(model, example_inputs)
                results = {p.name: p for p in cached["paths"]}
                notes += [n for n in cached["notes"] if n not in notes]
                on = cached["measured_on"]
                measured_on = (int(on[0]), int(on[1])) if on else None
                verified = True if verify and chosen != ORIGINAL else None
        if cached is None:
            sample, measured_on = representative(model, example_inputs, sample_rows)
            outcome = measure(
                model,
                sample,
                usable,
                results,
                verify=verify,
                repeat=repeat,
                warmup=warmup,
                rtol=rtol,
                atol=atol,
                clock=clock,
                deadline=deadline,
                budget_seconds=budget_seconds,
                must_beat_original=not wanted,
            )
            chosen, results = outcome.chosen, outcome.results
            fast_before = outcome.fast_before
            notes += outcome.notes
            verified, reverted = _apply_measured(
                model, chosen, by_name, undo, results, verify, notes
            )
            if folder is not None and _worth_storing(outcome):
                try:
                    _decisions.store(
                        folder,
                        key,
                        key_doc,
                        manifest,
                        chosen=chosen,
                        paths=tuple(results[n] for n in [ORIGINAL, *names] if n in results),
                        notes=tuple(outcome.notes),
                        measured_on=measured_on,
                        selection_seconds=clock() - started,
                    )
                except OSError as exc:  # read-only, full, or a file where the folder goes
                    why = decision_not_stored(folder, exc)
                    logger.warning("%s", why)
                    notes.append(why)
    else:
        fast_before = diagnose_static(model)
        chosen = rule_choice([c.name for c in usable])
        for c in usable:
            results[c.name] = PathResult(c.name, True, compile_useful=c.compile_useful)
        if verify and chosen != ORIGINAL:
            notes.append("not verified: pass example_inputs (or padding_profile) to verify")
        if chosen != ORIGINAL:
            _apply(by_name[chosen], undo)
    fast_after = fast_before
    if chosen != ORIGINAL and native_modules(model):
        fits = (
            deadline is None or outcome is None or clock() + outcome.reference_seconds <= deadline
        )
        # One more call to say what the fastpath does now, if the budget still allows it.
        fast_after = diagnose(model, sample) if measured and fits else diagnose_static(model)

    kept = by_name.get(chosen)
    compile_useful, compile_reason = (
        (kept.compile_useful, kept.compile_reason) if kept else (True, "the model is unchanged")
    )
    report = AttentionReport(
        model=type(model).__name__,
        kind=kind,
        chosen=chosen,
        paths=tuple(results[n] for n in [ORIGINAL, *names] if n in results),
        verified=verified,
        reverted=reverted,
        compile_useful=compile_useful,
        compile_reason=compile_reason,
        fastpath_before=fast_before,
        fastpath_after=fast_after,
        notes=tuple(notes),
        measured=measured,
        selection_seconds=clock() - started,
        from_cache=from_cache,
        measured_on=measured_on,
        budget_seconds=budget_seconds,
    )
    if chosen != ORIGINAL:
        # Read by compile selectors (primitives do not import each other): compile or not.
        info = {"path": chosen, "compile_useful": compile_useful, "compile_reason": compile_reason}
        model.__dict__["_fastinfer_attention"] = info
        undo.push(DropAttr(model, "_fastinfer_attention"))
    model.__dict__[SWAP_RECORD] = (undo, report)  # undo is a no-op when the original was kept
    logger.info(
        "attention swap for %s: %s (%.2f s%s)",
        type(model).__name__,
        chosen,
        report.selection_seconds,
        ", cached decision" if from_cache else "",
    )
    return report


def _worth_storing(outcome: Measured) -> bool:
    """A decision is stored once at least one path besides the original was timed: one made with
    nothing measured (the budget spent on the reference call) would be reused forever."""
    return outcome.timed > 0 or (outcome.budget_skipped == 0 and outcome.chosen == ORIGINAL)


def _reuse(
    model: nn.Module,
    inputs: Any,
    cached: dict[str, Any],
    by_name: dict[str, Candidate],
    verify: bool,
    rtol: float | None,
    atol: float | None,
) -> tuple[str, Undo, str]:
    """Apply a cached choice; with ``verify``, check it on one row first. ``(chosen, undo, problem)``."""
    chosen = cached["chosen"]
    if chosen == ORIGINAL:
        return chosen, Undo(), ""
    cand = by_name.get(chosen)
    if cand is None or cand.unavailable:
        why = "no such path" if cand is None else cand.unavailable
        return chosen, Undo(), f"path {chosen} cannot run here ({why})"
    if not verify:
        undo = Undo()
        cand.apply(undo)
        return chosen, undo, ""
    undo, problem = verify_choice(model, check_inputs(model, inputs), cand, rtol, atol)
    return chosen, undo, problem


def _apply(cand: Candidate, undo: Undo) -> None:
    """Apply ``cand``; if that fails half-way, undo what it changed and re-raise."""
    try:
        cand.apply(undo)
    except Exception:
        undo()
        raise


def _apply_measured(
    model: nn.Module,
    chosen: str,
    by_name: dict[str, Candidate],
    undo: Undo,
    results: dict[str, PathResult],
    verify: bool,
    notes: list[str],
) -> tuple[bool | None, bool]:
    """Apply the measured winner; ``(verified, reverted)``."""
    if chosen != ORIGINAL:
        _apply(by_name[chosen], undo)
        return (bool(results[chosen].verified) if verify else None), False
    if verify:
        rejected = [r.name for r in results.values() if r.verified is False]
        if rejected:
            notes.append(
                "every candidate that ran was rejected by verification ("
                + ", ".join(rejected)
                + "); the model is left unchanged"
            )
            return False, True
    return None, False


def undo_attention_swap_(model: nn.Module) -> AttentionReport:
    """Restore the model exactly as it was before :func:`swap_attention_`; returns that report.

    A copy of a swapped model (``copy.deepcopy``, ``pickle``, ``torch.save``) carries the swap's
    record and is undone the same way, on its own modules.

    Raises:
        AttentionSwapError: the model is not swapped.
    """
    entry = model.__dict__.pop(SWAP_RECORD, None)
    if entry is None:
        raise AttentionSwapError(
            f"{type(model).__name__} has no attention swap to undo: swap_attention_ was not "
            "called on it, or it was already undone"
        )
    undo, report = entry
    undo()
    return report

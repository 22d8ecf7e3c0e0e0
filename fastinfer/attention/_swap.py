"""swap_attention_ itself: discover candidates, verify and time them, apply the winner, undo."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from fastinfer import _torch_compat
from fastinfer._common.timing import interleaved_samples, median
from fastinfer.attention._candidate import Candidate
from fastinfer.attention._diagnose import diagnose
from fastinfer.attention._discover import discover
from fastinfer.attention._outputs import call, compare, output_tensors, sync, valid_mask
from fastinfer.attention._profile import PaddingProfile, profile_inputs
from fastinfer.attention._types import ORIGINAL, AttentionReport, PathResult
from fastinfer.attention._undo import Undo
from fastinfer.errors import AttentionSwapError, ConfigError

__all__ = ["swap_attention_", "undo_attention_swap_"]

logger = logging.getLogger("fastinfer.attention")

_SWAPPED: weakref.WeakKeyDictionary[nn.Module, tuple[Undo, AttentionReport]] = (
    weakref.WeakKeyDictionary()
)


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
    clock: Callable[[], float] = time.perf_counter,
) -> AttentionReport:
    """Switch ``model`` in place to its fastest correct attention path; return what was done.

    Args:
        example_inputs: a batch the model is called with (a dict of keyword arguments, a tuple of
            positional ones, or one tensor). With it every candidate path is verified on valid
            positions and timed, and the fastest correct one is kept. The padding mask is found
            by name (``attention_mask``: 1 = token; ``src_key_padding_mask`` /
            ``key_padding_mask``: True = padding).
        prefer: a path name (or names) to restrict the choice to, e.g. ``"hf:packed"``.
        verify: compare with the original and undo the swap on mismatch (needs example inputs).
        padding_profile: ``(batch_size, seq_len, padding_fraction)`` to synthesise example inputs
            (Hugging Face models and bare ``nn.TransformerEncoder``).
        repeat / warmup: timed and untimed calls per candidate (timing is interleaved; median).
        rtol / atol: override the shared per-dtype tolerances
            (:mod:`fastinfer._common.tolerances`), as in :func:`fastinfer.compile_model`.

    Without inputs the path is chosen by rule (hf:packed for BERT-family encoders, hf:sdpa for
    other HF models, torch:fastpath-nested for nn.TransformerEncoder, registered replacements).

    Raises:
        AttentionSwapError: the model is already swapped, or a preferred path is unavailable.
        ConfigError: bad arguments.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"swap_attention_ needs an nn.Module, got {type(model).__name__}")
    if model in _SWAPPED and _SWAPPED[model][1].chosen != ORIGINAL:
        raise AttentionSwapError(
            f"{type(model).__name__} is already swapped (to {_SWAPPED[model][1].chosen}); "
            "call fastinfer.undo_attention_swap_(model) first"
        )
    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}")
    if padding_profile is not None:
        if example_inputs is not None:
            raise ConfigError("pass example_inputs or padding_profile, not both")
        example_inputs = profile_inputs(model, PaddingProfile(*padding_profile))

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

    fast_before = diagnose(model, example_inputs)
    if example_inputs is not None:
        chosen, results = _measure(
            model,
            example_inputs,
            usable,
            results,
            verify,
            repeat,
            warmup,
            rtol,
            atol,
            clock,
            must_beat_original=not wanted,
        )
        measured = True
    else:
        chosen = _rule_choice(kind, usable)
        measured = False
        for c in usable:
            results[c.name] = PathResult(c.name, True, compile_useful=c.compile_useful)
        if verify and chosen != ORIGINAL:
            notes.append("not verified: pass example_inputs (or padding_profile) to verify")

    undo = Undo()
    verified: bool | None = None
    reverted = False
    by_name = {c.name: c for c in cands}
    if chosen != ORIGINAL:
        try:
            by_name[chosen].apply(undo)
        except Exception:
            undo()
            raise
        if measured and verify:
            verified = bool(results[chosen].verified)
    elif measured and verify:
        rejected = [r.name for r in results.values() if r.verified is False]
        if rejected:
            reverted = True
            verified = False
            notes.append(
                "every candidate that ran was rejected by verification ("
                + ", ".join(rejected)
                + "); the model is left unchanged"
            )
    fast_after = diagnose(model, example_inputs) if chosen != ORIGINAL else fast_before

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
    )
    if chosen != ORIGINAL:
        # Read by compile selectors (primitives do not import each other): compile or not.
        info = {"path": chosen, "compile_useful": compile_useful, "compile_reason": compile_reason}
        model.__dict__["_fastinfer_attention"] = info
        undo.push(lambda: model.__dict__.pop("_fastinfer_attention", None))
    _SWAPPED[model] = (undo, report)  # undo is a no-op when the original was kept
    logger.info("attention swap for %s: %s", type(model).__name__, chosen)
    return report


def _rule_choice(kind: str, usable: list[Candidate]) -> str:
    names = [c.name for c in usable]
    order = [
        "registered",
        "hf:flash_attention_2",
        "hf:packed",
        "torch:fastpath-nested",
        "torch:fastpath",
        "hf:sdpa",
    ]
    for n in order:
        if n in names:
            return n
    return names[0] if names else ORIGINAL


def _measure(
    model: nn.Module,
    inputs: Any,
    usable: list[Candidate],
    results: dict[str, PathResult],
    verify: bool,
    repeat: int,
    warmup: int,
    rtol: float | None,
    atol: float | None,
    clock: Callable[[], float],
    *,
    must_beat_original: bool = True,
) -> tuple[str, dict[str, PathResult]]:
    valid = valid_mask(model, inputs)
    try:
        ref = [t.detach().clone() for t in output_tensors(call(model, inputs))]
    except Exception as exc:
        raise ConfigError(
            f"calling {type(model).__name__} with example_inputs failed ({type(exc).__name__}: "
            f"{exc}); pass what the model takes: a dict of keyword arguments, a tuple of "
            "positional arguments, or one tensor"
        ) from exc
    runners: dict[str, Candidate | None] = {ORIGINAL: None}
    errors: dict[str, tuple[float, str]] = {ORIGINAL: (0.0, "")}
    failed: dict[str, str] = {}
    results = dict(results)
    if must_beat_original and valid is not None and bool(valid.all()):
        # Without padding a nested-tensor path is its dense twin plus a conversion: not timed, so
        # that noise on a busy machine cannot pick it.
        for cand in [c for c in usable if c.skips_padding_only]:
            results[cand.name] = PathResult(
                cand.name,
                False,
                "the example inputs have no padding: nested tensors would only add a conversion",
                compile_useful=cand.compile_useful,
            )
        usable = [c for c in usable if not c.skips_padding_only]
    for cand in usable:
        undo = Undo()
        try:
            cand.apply(undo)
            got = output_tensors(call(model, inputs))
            errors[cand.name] = compare(ref, got, valid, rtol=rtol, atol=atol)
            for _ in range(max(warmup - 1, 0)):
                call(model, inputs)
            runners[cand.name] = cand
        except Exception as exc:  # a candidate that cannot run is reported, not fatal
            failed[cand.name] = f"{type(exc).__name__}: {exc}"
        finally:
            undo()
    for _ in range(warmup):
        call(model, inputs)

    def installed(name: str) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            runner = runners[name]
            undo = Undo()
            try:
                if runner is not None:
                    runner.apply(undo)
                yield
            finally:
                undo()

        return ctx()

    fns = {name: functools.partial(call, model, inputs) for name in runners}
    timing = functools.partial(
        interleaved_samples, fns, clock=clock, sync=lambda: sync(model), around=installed
    )
    samples = timing(rounds=repeat)
    # Second look at the contenders only: the two fastest correct paths and the original get
    # `repeat` more interleaved samples, so a noisy machine does not decide between close paths.
    correct = [n for n in runners if not (verify and errors[n][1])]
    contenders = sorted(correct, key=lambda n: median(samples[n]))[:2]
    second = list(dict.fromkeys([ORIGINAL, *contenders]))
    if len(second) > 1 and len(runners) > 2:
        timing(rounds=repeat, names=second, into=samples)
    out: dict[str, PathResult] = dict(results)
    for name, ts in samples.items():
        med = median(ts)
        err, problem = errors[name]
        ok = None if not verify else not problem
        runner = runners[name]
        out[name] = PathResult(
            name,
            True,
            problem,
            med,
            (max(ts) - min(ts)) / med if med else None,
            err,
            ok,
            None if runner is None else runner.compile_useful,
        )
    for name, why in failed.items():
        cu = next(x.compile_useful for x in usable if x.name == name)
        out[name] = PathResult(name, False, f"failed: {why}", compile_useful=cu)
    eligible = [n for n in samples if n != ORIGINAL and (not verify or out[n].verified)]
    rejected = [n for n in samples if verify and out[n].verified is False]
    for n in rejected:
        logger.warning("attention path %s rejected: %s", n, out[n].reason)
    if not eligible:
        return ORIGINAL, out
    best = min(eligible, key=lambda n: out[n].latency_seconds or float("inf"))
    base = out[ORIGINAL].latency_seconds or float("inf")
    # Keep the original when nothing beats it (unless the caller asked for a path with prefer=).
    if must_beat_original and (out[best].latency_seconds or float("inf")) >= base:
        return ORIGINAL, out
    return best, out


def undo_attention_swap_(model: nn.Module) -> AttentionReport:
    """Restore the model exactly as it was before :func:`swap_attention_`; returns that report.

    Raises:
        AttentionSwapError: the model is not swapped.
    """
    entry = _SWAPPED.pop(model, None)
    if entry is None:
        raise AttentionSwapError(
            f"{type(model).__name__} has no attention swap to undo: swap_attention_ was not "
            "called on it, or it was already undone"
        )
    undo, report = entry
    undo()
    return report

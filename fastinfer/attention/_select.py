"""Choosing by measurement, fast and bounded: a representative slice, a budget, early elimination.

* **Slice.** Paths are timed on a few rows of the example, not all of it: rows picked at evenly
  spaced quantiles of their valid length (the shortest and the longest included), so the slice
  keeps the example's padding profile and its padded length. About :data:`SAMPLE_TOKENS` tokens,
  at least two rows (``sample_rows=`` overrides; the batch size times the whole example).
* **Budget.** Every call is planned against a deadline on the injected clock: a candidate is
  verified only if a call (as long as the reference call) still fits, a timing round only if its
  expected cost fits (:func:`fastinfer._common.timing.race`). Candidates are tried in the order the
  rule-based choice prefers, so a short budget goes to the likely winners first.
* **Early elimination.** After every interleaved round, a path whose fastest sample is slower than
  the best path's median by more than noise explains is dropped (1.5x after one sample).
* **As served.** Every path is verified against the original as a service calls it: in
  ``eval()`` and without grad (:func:`served`), whatever mode ``swap_attention_`` is called in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastinfer._common.timing import median, race
from fastinfer.attention._candidate import Candidate
from fastinfer.attention._diagnose import diagnose_call
from fastinfer.attention._outputs import call, compare, output_tensors, sync, valid_mask
from fastinfer.attention._types import ORIGINAL, PathResult
from fastinfer.attention._undo import Undo
from fastinfer.errors import ConfigError

__all__ = [
    "MEASURE_ORDER",
    "RULE_ORDER",
    "SAMPLE_TOKENS",
    "Measured",
    "check_inputs",
    "measure",
    "representative",
    "rule_choice",
    "served",
    "verify_choice",
]

logger = logging.getLogger("fastinfer.attention")

#: About how many tokens (rows x padded length) the timing slice holds by default.
SAMPLE_TOKENS = 512

#: The order the rule-based choice prefers (also the order candidates are measured in).
RULE_ORDER = (
    "registered",
    "hf:flash_attention_2",
    "hf:packed",
    "torch:fastpath-nested",
    "torch:fastpath",
    "hf:sdpa",
)
#: The order paths are measured in under a budget: the likely winners (the benchmarks') first.
MEASURE_ORDER = (
    "registered",
    "hf:flash_attention_2",
    "hf:packed",
    "torch:packed",
    "torch:fastpath-nested",
    "hf:fused",
    "torch:fastpath",
    "hf:sdpa",
)


def finalists(
    runners: Mapping[str, Any],
    estimate: Mapping[str, float],
    left: float | None = None,
    favorite: str | None = None,
) -> list[str]:
    """The paths to time in interleaved rounds: all of them, or, when one round of all would
    not fit in ``left`` seconds, the fastest by their single call that do (the original always
    among them, so a path must beat it in the same rounds). Deciding on one cold call per path
    instead picked a 25%-slower path on BERT-base.

    ``favorite`` (the likeliest winner, :data:`MEASURE_ORDER`'s first) comes right after the
    fastest when its single call is within :data:`CLOSE` of it: that call is its least trustworthy
    estimate (the packed path builds oneDNN's kernels for the slice's shapes in it: 497 ms against
    442 ms warm on BERT-base b8), and on it the favorite lost its place to paths within 5% of it,
    so the benchmark served a path 15% slower than the one chosen alone."""
    names = list(runners)
    if left is None or sum(estimate[n] for n in names) <= left:
        return names
    others = sorted((n for n in names if n != ORIGINAL), key=lambda n: estimate[n])
    if not others:
        return names
    keep, cost = [ORIGINAL, others[0]], estimate[ORIGINAL] + estimate[others[0]]
    if (
        favorite in others
        and favorite not in keep
        and estimate[favorite] <= CLOSE * estimate[others[0]]
        and cost + estimate[favorite] <= left
    ):
        keep.append(favorite)
        cost += estimate[favorite]
    for n in others:
        if n in keep:
            continue
        if cost + estimate[n] > left:
            break
        keep.append(n)
        cost += estimate[n]
    return [n for n in names if n in keep]


#: How close (a ratio of single calls) the favorite must be to the fastest to race anyway.
CLOSE = 1.15


def rule_choice(names: list[str]) -> str:
    for n in RULE_ORDER:
        if n in names:
            return n
    return names[0] if names else ORIGINAL


def _favorite(runners: Mapping[str, Any]) -> str | None:
    """The likeliest winner among ``runners`` (the first of :data:`MEASURE_ORDER` present)."""
    return next((n for n in MEASURE_ORDER if n in runners), None)


def _by_likelihood(cands: list[Candidate]) -> list[Candidate]:
    rank = {n: i for i, n in enumerate(MEASURE_ORDER)}
    return sorted(cands, key=lambda c: rank.get(c.name, len(MEASURE_ORDER)))


# --------------------------------------------------------------------------------------------
# The representative slice
# --------------------------------------------------------------------------------------------


def _batch_size(inputs: Any, valid: torch.Tensor | None) -> int | None:
    if valid is not None:
        return int(valid.shape[0])
    if isinstance(inputs, Mapping):
        values = list(inputs.values())
    else:
        values = list(inputs) if isinstance(inputs, tuple | list) else [inputs]
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return None


def pick_rows(valid: torch.Tensor | None, batch: int, rows: int) -> list[int]:
    """``rows`` row indices at evenly spaced quantiles of the valid length (ascending index)."""
    if batch <= rows:
        return list(range(batch))
    if valid is None:
        return list(range(rows))
    lengths = valid.sum(1).tolist()
    order = sorted(range(batch), key=lambda i: (lengths[i], i))
    if rows == 1:
        return [order[-1]]
    return sorted({order[round(k * (batch - 1) / (rows - 1))] for k in range(rows)})


def take_rows(inputs: Any, rows: list[int], batch: int, seq: int | None) -> Any:
    """``inputs`` with only ``rows`` of the batch: tensors with the batch on dim 0 (or on dim 1
    after a sequence dim, for sequence-first inputs) are indexed; everything else is kept."""

    def take(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.is_nested:
            return v
        idx = torch.tensor(rows, device=v.device)
        if v.shape[0] == batch:
            return v.index_select(0, idx)
        if v.dim() >= 2 and v.shape[1] == batch and seq is not None and v.shape[0] == seq:
            return v.index_select(1, idx)  # (T, B, ...) sequence-first
        return v

    if isinstance(inputs, Mapping):
        return {k: take(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(take(v) for v in inputs)
    return take(inputs)


def representative(
    model: nn.Module, inputs: Any, sample_rows: int | None
) -> tuple[Any, tuple[int, int] | None]:
    """The timing slice of ``inputs`` and ``(rows, of_batch)`` (None when not sliced)."""
    valid = valid_mask(model, inputs)
    batch = _batch_size(inputs, valid)
    if batch is None:
        return inputs, None
    seq = int(valid.shape[1]) if valid is not None else None
    if sample_rows is None:
        rows = max(2, math.ceil(SAMPLE_TOKENS / max(seq or 1, 1)))
    else:
        if sample_rows < 1:
            raise ConfigError(f"sample_rows must be >= 1 or None, got {sample_rows!r}")
        rows = sample_rows
    if rows >= batch:
        return inputs, None
    return take_rows(inputs, pick_rows(valid, batch, rows), batch, seq), (rows, batch)


def check_inputs(model: nn.Module, inputs: Any) -> Any:
    """One row of ``inputs`` (the one with the fewest valid tokens): a cheap correctness check."""
    valid = valid_mask(model, inputs)
    batch = _batch_size(inputs, valid)
    if batch is None or batch == 1:
        return inputs
    row = pick_rows(valid, batch, 2)[0] if valid is not None else 0
    return take_rows(inputs, [row], batch, int(valid.shape[1]) if valid is not None else None)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    chosen: str
    results: dict[str, PathResult]
    notes: list[str] = field(default_factory=list)
    timed: int = 0  # candidates (besides the original) that got timed samples
    budget_skipped: int = 0  # candidates not measured because the budget was spent
    fast_before: tuple[tuple[str, str], ...] = ()
    reference_seconds: float = 0.0  # one call of the original on the slice


@contextlib.contextmanager
def in_eval(model: nn.Module) -> Iterator[None]:
    """The original in ``eval()``, as every candidate runs (each one's :meth:`Undo.freeze`),
    its modules' modes restored after. A model left in training mode (built from a config, or a
    wrapper whose own flag was never reset) was judged with dropout on: every path "differed",
    and that decision was cached. Grad flags are left as they are: what the original costs with
    them is what a swap that freezes them wins."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def served() -> Iterator[None]:
    """A call as a service makes it (under ``torch.inference_mode()``): without grad.

    The original and every path are verified in this mode, whatever mode the caller is in. In
    grad mode, with parameters requiring grad (as built), PyTorch's fastpath and nested tensors
    do not run in the original, and it can answer otherwise: its encoder leaves values, not the
    nested path's zeros, at padded positions, which a mean over all positions or a decoder
    attending to that memory unmasked reads (0.77 and 1.28 apart on the repros). Judged in grad
    mode, ``torch:fastpath`` (dense, frozen) matched there and changed the served answer by as
    much. A path's own call is served too: a swap freezes only what it replaces (an HF path, the
    HF model a wrapper holds), and the rest keeps its grad-mode route in grad mode.

    ``torch.no_grad()``, not ``inference_mode()``: every branch PyTorch and the replacement
    encoders take reads ``torch.is_grad_enabled()``, False under both, and an ``inference_mode``
    call inside a grad-mode swap could leave inference tensors cached in the model (BEiT's
    relative position bias) that the caller's next grad-mode call refuses."""
    with torch.no_grad():
        yield


def as_original() -> str:
    """What a path is compared with, as a mismatch names it."""
    if torch.is_grad_enabled():
        return "the original as served (both called without grad, as under inference_mode)"
    return "the original"


def call_failed(model: nn.Module, exc: Exception) -> ConfigError:
    """The error for the original failing on the example inputs."""
    fix = (
        "pass what the model takes: a dict of keyword arguments, a tuple of positional "
        "arguments, or one tensor"
    )
    if "inference tensor" in str(exc).lower():
        # a tensor the model cached during an earlier call under inference_mode (BEiT's
        # relative position bias) cannot take part in a grad-mode call
        fix = (
            "call swap_attention_ under torch.inference_mode() or torch.no_grad(), as the "
            "model is served: it holds tensors made under inference_mode by an earlier call"
        )
    return ConfigError(
        f"calling {type(model).__name__} with example_inputs failed ({type(exc).__name__}: "
        f"{exc}); {fix}"
    )


def _grad_mixed(model: nn.Module, inputs: Any) -> bool:
    """Whether some parameters require grad and others not, or an input tensor does: then a
    call without grad cannot tell which inputs of a native module would require grad."""
    flags = {p.requires_grad for p in model.parameters()}
    if isinstance(inputs, Mapping):
        values = list(inputs.values())
    else:
        values = list(inputs) if isinstance(inputs, tuple | list) else [inputs]
    return len(flags) > 1 or any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def reference(
    model: nn.Module, inputs: Any, diagnosis: bool = True
) -> tuple[list[torch.Tensor], tuple[tuple[str, str], ...]]:
    """The original's outputs on ``inputs`` as served (:func:`in_eval`, :func:`served`) and,
    from the same call, its fastpath diagnosis for the caller's mode (exact when every parameter
    requires grad, or none and no input does; otherwise, in grad mode, from one more call)."""
    grad = torch.is_grad_enabled()
    try:
        with in_eval(model), served():
            reasons, out = diagnose_call(model, inputs, grad=grad)
        if diagnosis and grad and reasons and _grad_mixed(model, inputs):
            with in_eval(model):
                reasons = diagnose_call(model, inputs)[0]
        return [t.detach().clone() for t in output_tensors(out)], reasons
    except Exception as exc:
        raise call_failed(model, exc) from exc


def call_original(model: nn.Module, inputs: Any) -> Any:
    """One timed call of the original in the caller's mode; a failure that only this mode
    meets (an inference tensor the model cached, in grad mode) gets :func:`call_failed`'s fix."""
    try:
        return call(model, inputs)
    except Exception as exc:
        raise call_failed(model, exc) from exc


def verify_choice(
    model: nn.Module,
    inputs: Any,
    cand: Candidate,
    rtol: float | None,
    atol: float | None,
) -> tuple[Undo, str]:
    """Apply ``cand`` and compare it with the original (as served) on ``inputs``;
    ``(undo, problem)``."""
    ref, _ = reference(model, inputs, diagnosis=False)
    undo = Undo()
    try:
        cand.apply(undo)
        with served():
            got = output_tensors(call(model, inputs))
    except Exception as exc:
        undo()
        return Undo(), f"failed: {type(exc).__name__}: {exc}"
    valid = valid_mask(model, inputs)
    _, problem = compare(ref, got, valid, rtol=rtol, atol=atol, original=as_original())
    if problem:
        undo()
        return Undo(), problem
    return undo, ""


def measure(
    model: nn.Module,
    inputs: Any,
    usable: list[Candidate],
    results: dict[str, PathResult],
    *,
    verify: bool,
    repeat: int,
    warmup: int,
    rtol: float | None,
    atol: float | None,
    clock: Callable[[], float],
    deadline: float | None,
    budget_seconds: float | None,
    must_beat_original: bool = True,
) -> Measured:
    """Verify and time ``usable`` on ``inputs`` within ``deadline``; the fastest correct one wins."""
    valid = valid_mask(model, inputs)
    t0 = clock()
    ref, fast_before = reference(model, inputs)
    estimate: dict[str, float] = {ORIGINAL: max(clock() - t0, 0.0)}
    out = dict(results)
    notes: list[str] = []
    if must_beat_original and valid is not None and bool(valid.all()):
        # Without padding a nested-tensor path is its dense twin plus a conversion: not timed, so
        # that noise on a busy machine cannot pick it.
        for cand in [c for c in usable if c.skips_padding_only]:
            out[cand.name] = PathResult(
                cand.name,
                False,
                "the example inputs have no padding: nested tensors would only add a conversion",
                compile_useful=cand.compile_useful,
            )
        usable = [c for c in usable if not c.skips_padding_only]

    def fits(cost: float) -> bool:
        return deadline is None or clock() + cost <= deadline

    spent = f"not measured: the time budget of {budget_seconds} s was spent (raise budget_seconds)"
    runners: dict[str, Candidate | None] = {ORIGINAL: None}
    errors: dict[str, tuple[float, str]] = {ORIGINAL: (0.0, "")}
    skipped = 0
    for cand in _by_likelihood(usable):
        if not fits(estimate[ORIGINAL]):
            out[cand.name] = PathResult(cand.name, True, spent, compile_useful=cand.compile_useful)
            skipped += 1
            continue
        undo = Undo()
        try:
            cand.apply(undo)
            t1 = clock()
            with served():  # as the original: a swap does not freeze what it does not replace
                got = output_tensors(call(model, inputs))
            estimate[cand.name] = max(clock() - t1, 0.0)
            errors[cand.name] = compare(
                ref, got, valid, rtol=rtol, atol=atol, original=as_original()
            )
            for _ in range(max(warmup - 1, 0)):
                if not fits(estimate[cand.name]):
                    break
                t1 = clock()
                call(model, inputs)
                estimate[cand.name] = max(clock() - t1, 0.0)
            if verify and errors[cand.name][1]:
                err, problem = errors[cand.name]
                out[cand.name] = PathResult(
                    cand.name, True, problem, None, None, err, False, cand.compile_useful
                )
                logger.warning("attention path %s rejected: %s", cand.name, problem)
            else:
                runners[cand.name] = cand
        except Exception as exc:  # a candidate that cannot run is reported, not fatal
            out[cand.name] = PathResult(
                cand.name,
                False,
                f"failed: {type(exc).__name__}: {exc}",
                compile_useful=cand.compile_useful,
            )
        finally:
            undo()
    if skipped:
        notes.append(
            f"{skipped} path(s) not measured within the {budget_seconds:g} s budget; "
            "pass a larger budget_seconds (or a smaller sample_rows) to measure them"
        )

    def installed(name: str) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            runner = runners[name]
            undo = Undo()
            try:
                if runner is not None:
                    runner.apply(undo)
                    yield
                else:
                    with in_eval(model):
                        yield
            finally:
                undo()

        return ctx()

    left = None if deadline is None else deadline - clock()
    fns = {
        name: functools.partial(call_original if name == ORIGINAL else call, model, inputs)
        for name in finalists(runners, estimate, left, _favorite(runners))
    }
    timing = race(
        fns,
        rounds=2 * repeat,
        clock=clock,
        deadline=deadline,
        estimate=estimate,
        sync=lambda: sync(model),
        around=installed,
    )
    samples = {n: ts for n, ts in timing.samples.items() if ts}
    if timing.rounds and len(fns) < len(runners):
        notes.append(
            f"timed {len(fns)} of {len(runners)} paths in interleaved rounds (the fastest by one "
            f"call, and the original): a round of all did not fit in the {budget_seconds:g} s budget"
        )
    if timing.rounds == 0 and len(runners) > 1:
        # Not even one interleaved round fitted: decide on the single calls already made.
        samples = {n: [estimate[n]] for n in runners}
        notes.append(
            "decided on one call per path: no interleaved timing round fitted in the "
            f"{budget_seconds:g} s budget"
        )
    timed = 0
    for name, runner in runners.items():
        if name not in fns:
            timing.dropped[name] = (
                f"not timed: one call ({estimate[name] * 1e3:.1f} ms) put it behind the paths "
                "that fitted the budget"
            )
        ts = samples.get(name) or [estimate[name]]
        med = median(ts)
        err, problem = errors[name]
        timed += bool(runner is not None and samples.get(name))
        out[name] = PathResult(
            name,
            True,
            timing.dropped.get(name, problem),
            med,
            (max(ts) - min(ts)) / med if med else None,
            err,
            None if not verify else not problem,
            None if runner is None else runner.compile_useful,
        )
    raced = fns if timing.rounds else runners  # an untimed path is not judged on one call
    eligible = [
        n for n in runners if n != ORIGINAL and n in raced and (not verify or out[n].verified)
    ]
    measured = Measured(ORIGINAL, out, notes, timed, skipped, fast_before, estimate[ORIGINAL])
    if not eligible:
        return measured
    best = min(eligible, key=lambda n: out[n].latency_seconds or float("inf"))
    base = out[ORIGINAL].latency_seconds or float("inf")
    # Keep the original when nothing beats it (unless the caller asked for a path with prefer=).
    if must_beat_original and (out[best].latency_seconds or float("inf")) >= base:
        return measured
    measured.chosen = best
    return measured

"""select_backend: measure candidate backends on the real inputs, keep the fastest correct one.

Candidates come from a registry keyed by name (:data:`BUILDERS`, :mod:`._builders`): each builder
says why it cannot run here (``skip``), about how long it takes to build (``estimate_seconds``) and
builds a callable; a name the registry does not know is tried as a dynamo backend. A
``(name, callable)`` pair is a ready-made candidate (an attention-swapped copy, a hand-written
variant). Selection is bounded by ``budget_seconds``: a build whose estimate does not fit in what is
left is skipped with the reason, timing rounds stop at the deadline, and clearly slower candidates
are dropped after each round (:func:`fastinfer._common.timing.race`). The decision is cached on
disk, keyed by the model's structure, the inputs' shape class and padding layout, the batch sizes,
the candidates and the environment, so a restart or a second worker reuses it without building or
timing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fastinfer import _env
from fastinfer._common.keys import batch_bucket, digest, padding_bucket, structure_key
from fastinfer._common.manifest import compiler_path, compiler_version, environment_manifest
from fastinfer._common.padding import empty_batch, padding_layout, valid_mask
from fastinfer._common.timing import median, race
from fastinfer.compiling._builders import BUILDERS, BuildContext, builder_for
from fastinfer.compiling._cache import InductorCache
from fastinfer.compiling._compile import eager_inputs, refuse_training
from fastinfer.compiling._decisions import load_decision, store_decision
from fastinfer.compiling._inputs import Inputs, check_batch_sizes, inputs_for, split, tensors
from fastinfer.compiling._report import BackendReport, CandidateResult, pick_winner
from fastinfer.compiling._verify import check_close, explain, max_error
from fastinfer.errors import ConfigError, VerificationError

__all__ = [
    "BUILDERS",
    "DEFAULT_BUDGET_SECONDS",
    "DEFAULT_CANDIDATES",
    "BackendReport",
    "CandidateResult",
    "input_spec",
    "pick_winner",
    "select_backend",
]

logger = logging.getLogger("fastinfer.compiling")

DEFAULT_CANDIDATES = (
    "eager",
    "inductor",
    "max-autotune-no-cudagraphs",
    "reduce-overhead",
    "aot",
    "onnxruntime",
    "openvino",
)
#: The default time budget of one selection (seconds); None measures everything.
DEFAULT_BUDGET_SECONDS = 10.0
CLOSE_CALL_ROUNDS = 3
Candidate = str | tuple[str, Callable[..., Any]]
_RUNTIMES = {"onnxruntime": "onnxruntime", "onnxrt": "onnxruntime", "openvino": "openvino"}


def input_spec(example_inputs: Inputs) -> list[Any]:
    """The inputs' shape class (the batch dimension left out: batch sizes are given apart): per
    argument its dtype, device and trailing shape, a sequence dimension (the length of a 2-D
    ``attention_mask``) rounded up to a power of two, and the padding fraction's bucket."""
    args, kwargs = split(example_inputs)
    mask = kwargs.get("attention_mask")
    seq = int(mask.shape[1]) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    out: list[Any] = []
    for k, v in [*enumerate(args), *kwargs.items()]:
        if isinstance(v, torch.Tensor):
            shape: list[Any] = list(v.shape)[1:]
            if seq is not None and shape and shape[0] == seq:
                shape[0] = f"t{batch_bucket(seq)}"
            out.append([str(k), str(v.dtype), shape, v.device.type])
        else:
            out.append([str(k), repr(v)])
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        out.append(["padding", padding_bucket(1.0 - float((mask != 0).float().mean()))])
    return out


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = _env.get("FASTINFER_CACHE_DIR")
    return Path(env).expanduser() if env else None


def _decision_environment(names: list[str]) -> dict[str, Any]:
    """The environment a decision depends on. Cheap on purpose (a cached decision must answer in
    well under a second): the eager manifest, the C++ compiler and the runtimes' versions, without
    importing inductor to read its settings (changing those in code needs ``refresh=True``)."""
    from importlib.metadata import PackageNotFoundError, version

    env = environment_manifest(compiler=False)
    cxx = compiler_path()
    env["compiler"] = compiler_version(cxx) if cxx else None
    for dist in sorted({_RUNTIMES[n] for n in names if n in _RUNTIMES}):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    return env


def _parse_candidates(candidates: Sequence[Candidate] | None) -> list[tuple[str, Any]]:
    named: list[tuple[str, Any]] = []
    for c in DEFAULT_CANDIDATES if candidates is None else candidates:
        if isinstance(c, str):
            named.append((c, c))
        elif isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str) and callable(c[1]):
            named.append(c)
        else:
            raise ConfigError(
                f"a candidate is a backend name or a (name, callable) pair, got {c!r}"
            )
    if "eager" not in [n for n, _ in named]:
        named.insert(0, ("eager", "eager"))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidate names must be unique, got {names}")
    return named


def select_backend(
    model: Callable[..., Any],
    example_inputs: Inputs,
    *,
    candidates: Sequence[Candidate] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    budget_seconds: float | None = DEFAULT_BUDGET_SECONDS,
    margin: float = 0.05,
    repeat: int = 7,
    rtol: float | None = None,
    atol: float | None = None,
    cache: InductorCache | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> BackendReport:
    """Measure each candidate on the real inputs and pick the fastest that beats eager by ``margin``.

    Candidates are names (``"eager"``, ``"inductor"``, ``"max-autotune-no-cudagraphs"``,
    ``"reduce-overhead"`` (CUDA only), ``"aot"`` (AOTInductor), ``"onnxruntime"`` and
    ``"openvino"`` (optional extras ``fastinfer[onnx]`` / ``fastinfer[openvino]``) or any other
    dynamo backend name) or ``(name, callable)`` pairs such as an attention-swapped copy of the
    model. A candidate that cannot work here is skipped with its reason; one whose outputs differ
    from eager beyond tolerance is rejected.

    ``budget_seconds`` (default 10 s; None: unbounded) bounds the whole selection on ``clock``: a
    candidate is built only when its estimated build time fits in what is left, timing rounds stop
    at the deadline (shared evenly by the batch sizes) and clearly slower candidates are dropped
    after each round; the candidates still racing after ``repeat`` rounds (a close call) get up
    to three times the rounds while the budget lasts. The decision is stored under ``cache_dir`` (default
    ``$FASTINFER_CACHE_DIR``) in ``decisions/``, keyed by the model's structure (not its weights),
    the inputs' shape class and padding layout (right, left, unpadded, mixed), the batch sizes,
    the candidates and the environment, so a restart reuses it without building or timing
    anything (``refresh=True`` measures again); exported ONNX / OpenVINO files are cached in
    ``artifacts/`` beside it. A runtime candidate (``onnxruntime``, ``openvino``) is verified
    also on the example laid out otherwise (its rows on the other padding side, a masked token
    inside a row) and rejected when it handles the example's layout only.
    """
    started = clock()
    sizes = check_batch_sizes(batch_sizes)
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin!r}")
    if budget_seconds is not None and not budget_seconds > 0:
        raise ConfigError(f"budget_seconds must be > 0 or None, got {budget_seconds!r}")
    if repeat < 1:
        raise ConfigError(f"repeat must be >= 1, got {repeat!r}")
    if empty := empty_batch(example_inputs):
        raise ConfigError(
            f"example_inputs has an empty batch ({empty} has 0 rows): nothing can be verified or "
            "timed on it; pass a batch of at least one row, like those you serve"
        )
    named = _parse_candidates(candidates)
    names = [n for n, _ in named]
    # Dropout on makes eager's reference random: every candidate would be "rejected" for it.
    refuse_training(model, "select_backend")
    for n, c in named:
        if not isinstance(c, str) and isinstance(c, torch.nn.Module) and c.training:
            raise ConfigError(
                f"candidate {n!r} is in training mode: call .eval() on it before select_backend"
            )

    key_doc = {
        "model": structure_key(model),
        "inputs": input_spec(example_inputs),
        # right, left, unpadded, mixed: a path may handle one layout only (a fused attention
        # that reads the mask as per-row lengths), so a decision is not reused for another
        "padding_layout": padding_layout(valid_mask(model, *split(example_inputs))),
        "batch_sizes": list(sizes),
        "candidates": [n if isinstance(c, str) else f"{n}={structure_key(c)}" for n, c in named],
        "margin": margin,
        "tolerance": [rtol, atol],
        "environment": _decision_environment(names),
    }
    key = digest(key_doc)
    root = _cache_root(cache_dir)
    record = root / "decisions" / f"{key[:32]}.json" if root else None
    # about this call's cache use, not the measurement: returned, never stored
    cache_notes: list[str] = []
    if record is not None and record.is_file() and not refresh:
        cached, ignored = load_decision(record, key=key, names=names, sizes=sizes, margin=margin)
        if cached is not None:
            logger.info("select_backend: reusing the decision in %s (%s)", record, cached.winner)
            return dataclasses.replace(cached, selection_seconds=clock() - started)
        cache_notes.append(ignored)

    args0, kwargs0 = inputs_for(example_inputs, sizes[-1])
    on_gpu = any(t.is_cuda for t in tensors(args0, kwargs0))
    reference_seconds: dict[int, float] = {}
    batches, expected, opaque = eager_inputs(model, example_inputs, sizes, reference_seconds, clock)
    deadline = None if budget_seconds is None else started + budget_seconds

    built: dict[str, Callable[..., Any]] = {}
    compiled_objs: dict[str, Any] = {}
    outcome: dict[str, CandidateResult] = {}
    one_call: dict[str, dict[int, float]] = {}  # seconds of each verification call
    notes: list[str] = []
    failed: dict[tuple[str, str], str] = {}  # artefact builds that failed, shared by candidates
    tmp = tempfile.TemporaryDirectory(prefix="fastinfer-select-")
    try:
        for name, spec in named:
            builder = builder_for(spec)
            ctx = BuildContext(
                model,
                example_inputs,
                sizes,
                cache,
                Path(tmp.name),
                on_gpu,
                opaque,
                artifacts=root,
                rtol=rtol,
                atol=atol,
                reference=expected[sizes[-1]],
                failed=failed,
            )
            skip = builder.skip(ctx)
            if skip:
                outcome[name] = CandidateResult(name, "skipped", skip)
                continue
            if deadline is not None and name != "eager":
                need, left = builder.estimate_seconds(ctx), deadline - clock()
                if need > left:
                    outcome[name] = CandidateResult(
                        name,
                        "skipped",
                        f"not built: building it takes about {need:.0f} s here (an estimate), "
                        f"{max(left, 0.0):.1f} s of the {budget_seconds:g} s budget were left; "
                        "pass budget_seconds=None (e.g. at image build time) to measure it: "
                        "the decision is then cached for every restart",
                    )
                    continue
            t0 = clock()
            try:
                fn, obj = builder.build(ctx)
            except VerificationError as exc:  # a runtime's own checks (another length, padding)
                outcome[name] = CandidateResult(
                    name, "rejected", str(exc).splitlines()[0][:600], clock() - t0
                )
                continue
            except Exception as exc:
                outcome[name] = CandidateResult(name, "failed", explain(exc)[:400])
                continue
            compile_s = clock() - t0
            err = 0.0
            one_call[name] = {}
            if spec == "eager":  # the reference calls were eager's: no second pass to verify it
                one_call[name] = dict(reference_seconds)
                built[name], compiled_objs[name] = fn, obj
                outcome[name] = CandidateResult(name, "ok", "", compile_s, max_error=0.0)
                continue
            try:
                for b in sizes:
                    t1 = clock()
                    with torch.inference_mode():
                        out = fn(*batches[b][0], **batches[b][1])
                    one_call[name][b] = max(clock() - t1, 0.0)
                    # valid positions only: what a padding-free candidate (an attention-swapped
                    # model) leaves in padded positions differs from eager's by design
                    valid = valid_mask(model, *batches[b])
                    err = max(err, max_error(out, expected[b], valid))
                    check_close(
                        out, expected[b], rtol=rtol, atol=atol, where=f"batch size {b}", valid=valid
                    )
            except VerificationError as exc:
                outcome[name] = CandidateResult(
                    name, "rejected", str(exc).splitlines()[0][:300], compile_s, max_error=err
                )
                continue
            except Exception as exc:
                outcome[name] = CandidateResult(name, "failed", explain(exc)[:400], compile_s)
                continue
            built[name] = fn
            compiled_objs[name] = obj
            outcome[name] = CandidateResult(
                name, "ok", "; ".join(ctx.notes), compile_s, max_error=err
            )

        latency, dropped = _time(built, batches, sizes, one_call, on_gpu, repeat, clock, deadline)
        for b, why in dropped.items():
            for n, reason in why.items():
                notes.append(f"bs={b}: {n} {reason}")
        for n in built:
            eager = latency["eager"]
            r = outcome[n]
            outcome[n] = CandidateResult(
                n,
                r.status,
                r.reason,
                r.compile_seconds,
                latency_seconds=dict(latency[n]),
                speedup={b: eager[b] / latency[n][b] for b in sizes},
                max_error=r.max_error,
            )
    finally:
        with contextlib.suppress(Exception):
            tmp.cleanup()

    results = tuple(outcome[n] for n in names)
    winner = pick_winner(results, margin)
    report = BackendReport(
        winner=winner,
        margin=margin,
        batch_sizes=sizes,
        results=results,
        key=key,
        compiled=compiled_objs.get(winner),
        selection_seconds=clock() - started,
        budget_seconds=budget_seconds,
        notes=tuple(notes),
    )
    skipped_for_budget = any(
        r.status == "skipped" and r.reason.startswith("not built") for r in results
    )
    if record is not None and (len(built) > 1 or not skipped_for_budget):
        unstored = store_decision(record, report)
        if unstored:  # the selection stands; only the next start pays for it
            cache_notes.append(unstored)
    if cache_notes:
        report = dataclasses.replace(report, notes=(*cache_notes, *report.notes))
    return report


def _time(
    built: Mapping[str, Callable[..., Any]],
    batches: Mapping[int, tuple[tuple[Any, ...], dict[str, Any]]],
    sizes: tuple[int, ...],
    one_call: Mapping[str, Mapping[int, float]],
    on_gpu: bool,
    repeat: int,
    clock: Callable[[], float],
    deadline: float | None,
) -> tuple[dict[str, dict[int, float]], dict[int, dict[str, str]]]:
    """Median seconds per call of each built candidate at each size, interleaved, within the
    deadline (shared evenly by the sizes), with clearly slower candidates dropped early.
    Returns the latencies and, per size, what was dropped or decided on one call."""
    latency: dict[str, dict[int, float]] = {n: {} for n in built}
    dropped: dict[int, dict[str, str]] = {}
    for i, b in enumerate(sizes):
        a, k = batches[b]

        def call(fn: Callable[..., Any], a: Any = a, k: Any = k) -> Callable[[], Any]:
            def run() -> Any:
                with torch.inference_mode():
                    out = fn(*a, **k)
                if on_gpu:
                    torch.cuda.synchronize()
                return out

            return run

        share = None if deadline is None else clock() + (deadline - clock()) / (len(sizes) - i)
        eager_one = one_call["eager"][b]
        number = max(1, min(1000, int(0.01 / max(eager_one, 1e-6))))  # ~10 ms per sample
        timing = race(
            {n: call(fn) for n, fn in built.items()},
            # Within a budget, what is left of it goes to close calls: the candidates that are
            # still racing get up to CLOSE_CALL_ROUNDS x the rounds (a 7% gap between two
            # finalists is within one round's noise on a shared machine).
            rounds=repeat if deadline is None else CLOSE_CALL_ROUNDS * repeat,
            clock=clock,
            deadline=share,
            estimate={n: one_call[n][b] for n in built},
            number=number,
        )
        why = dict(timing.dropped)
        for n in built:
            ts = timing.samples[n]
            if not ts:
                ts = [one_call[n][b]]
                why[n] = "timed by its verification call only (no timing round fitted the budget)"
            latency[n][b] = median(ts)
        if why:
            dropped[b] = why
    return latency, dropped

"""select_backend: measure candidate backends on the real inputs, keep the fastest correct one.

Candidates come from a registry keyed by name (:data:`BUILDERS`): each builder says why it cannot
run here (``skip``) or builds a callable (``build``); a name the registry does not know is tried as
a dynamo backend. A ``(name, callable)`` pair is a ready-made candidate (an attention-swapped copy,
a hand-written variant). The decision is cached on disk, keyed by the model, the inputs, the
candidates and the environment manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfer import _env
from fastinfer._common.files import atomic_write_text
from fastinfer._common.tables import render_table
from fastinfer._common.timing import calls_per_sample, interleaved_samples, median
from fastinfer.compiling._aot import export_aot, load_aot
from fastinfer.compiling._cache import InductorCache
from fastinfer.compiling._compile import compile_model
from fastinfer.compiling._inputs import Inputs, check_batch_sizes, inputs_for, split, tensors
from fastinfer.compiling._manifest import compiler_path, environment_manifest
from fastinfer.compiling._verify import (
    NO_COMPILER,
    OPAQUE_FIX,
    check_close,
    eager_reference,
    explain,
    max_error,
)
from fastinfer.errors import CompileError, ConfigError, VerificationError

__all__ = [
    "BUILDERS",
    "DEFAULT_CANDIDATES",
    "BackendReport",
    "CandidateResult",
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
    "onnxrt",
)
Candidate = str | tuple[str, Callable[..., Any]]


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's outcome: ``status`` is ok, skipped, failed or rejected (too inaccurate)."""

    name: str
    status: str
    reason: str = ""
    compile_seconds: float = 0.0
    latency_seconds: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    max_error: float = 0.0

    @property
    def geomean_speedup(self) -> float:
        if not self.speedup:
            return 0.0
        return math.exp(sum(math.log(s) for s in self.speedup.values()) / len(self.speedup))


@dataclass(frozen=True)
class BackendReport:
    """What :func:`select_backend` measured and chose; ``winner`` is "eager" unless one beat it."""

    winner: str
    margin: float
    batch_sizes: tuple[int, ...]
    results: tuple[CandidateResult, ...]
    key: str
    from_cache: bool = False
    compiled: Any = field(default=None, compare=False, repr=False)

    def result(self, name: str) -> CandidateResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no candidate {name!r}; have {[r.name for r in self.results]}")

    def compile_kwargs(self) -> dict[str, Any]:
        """``backend``/``mode`` for :func:`compile_model` ({} for eager, aot or a custom variant)."""
        builder = BUILDERS.get(self.winner)
        if isinstance(builder, _Dynamo) and builder.backend == "inductor":
            return {"backend": builder.backend, "mode": builder.mode}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner,
            "margin": self.margin,
            "batch_sizes": list(self.batch_sizes),
            "key": self.key,
            "from_cache": self.from_cache,
            "results": [
                {
                    **asdict(r),
                    "latency_seconds": {str(k): v for k, v in r.latency_seconds.items()},
                    "speedup": {str(k): v for k, v in r.speedup.items()},
                    "max_error": r.max_error if math.isfinite(r.max_error) else None,
                }
                for r in self.results
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, from_cache: bool = False) -> BackendReport:
        results = tuple(
            CandidateResult(
                name=r["name"],
                status=r["status"],
                reason=r["reason"],
                compile_seconds=r["compile_seconds"],
                latency_seconds={int(k): v for k, v in r["latency_seconds"].items()},
                speedup={int(k): v for k, v in r["speedup"].items()},
                max_error=math.inf if r["max_error"] is None else r["max_error"],
            )
            for r in doc["results"]
        )
        return cls(
            winner=doc["winner"],
            margin=doc["margin"],
            batch_sizes=tuple(doc["batch_sizes"]),
            results=results,
            key=doc["key"],
            from_cache=from_cache,
        )

    def table(self) -> str:
        head = ["candidate", "status", "compile", *[f"bs={b}" for b in self.batch_sizes], "max err"]
        rows = []
        for r in self.results:
            cells = [r.name + (" *" if r.name == self.winner else ""), r.status]
            cells.append(f"{r.compile_seconds:.2f}s" if r.status == "ok" else "")
            for b in self.batch_sizes:
                lat, sp = r.latency_seconds.get(b), r.speedup.get(b)
                cells.append("" if lat is None else f"{lat * 1e3:.3f}ms ({sp:.2f}x)")
            cells.append(f"{r.max_error:.2g}" if r.status in ("ok", "rejected") else "")
            rows.append(cells)
        lines = [render_table(head, rows)]
        for r in self.results:
            if r.reason:
                lines.append(f"  {r.name}: {r.reason}")
        origin = " (cached decision)" if self.from_cache else ""
        lines.append(f"winner: {self.winner} (must beat eager by {self.margin:.0%}){origin}")
        return "\n".join(lines)

    __str__ = table


def pick_winner(results: Sequence[CandidateResult], margin: float) -> str:
    """The fastest ok candidate whose geometric-mean speed-up over eager is at least ``1+margin``
    and that is not slower than eager at any batch size; otherwise ``"eager"``."""
    best, best_score = "eager", 1.0 + margin
    for r in results:
        if r.name == "eager" or r.status != "ok" or not r.speedup:
            continue
        if min(r.speedup.values()) < 1.0:
            continue
        if r.geomean_speedup >= best_score:
            best, best_score = r.name, r.geomean_speedup
    return best


def _model_key(model: Callable[..., Any]) -> str:
    h = hashlib.sha256()
    classes = [type(m) for m in model.modules()] if isinstance(model, nn.Module) else [model]
    for cls in sorted(set(classes), key=lambda c: getattr(c, "__qualname__", repr(c))):
        h.update(getattr(cls, "__module__", "").encode() + b":" + str(cls).encode())
        try:
            h.update(inspect.getsource(cls).encode())  # type: ignore[arg-type]
        except (OSError, TypeError):
            pass
    if isinstance(model, nn.Module):
        h.update(repr(model).encode())
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def input_spec(example_inputs: Inputs) -> list[Any]:
    args, kwargs = split(example_inputs)
    out: list[Any] = []
    for k, v in [*enumerate(args), *kwargs.items()]:
        if isinstance(v, torch.Tensor):
            out.append([str(k), str(v.dtype), list(v.shape)[1:], v.device.type])
        else:
            out.append([str(k), repr(v)])
    return out


def _decisions_dir(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir) / "decisions"
    env = _env.get("FASTINFER_CACHE_DIR")
    return Path(env) / "decisions" if env else None


# ---------------------------------------------------------------------------------------------
# The candidate registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildContext:
    """What a builder may look at: the model, its inputs, where it runs, what eager showed."""

    model: Callable[..., Any]
    example_inputs: Inputs
    sizes: tuple[int, ...]
    cache: InductorCache | None
    tmp: Path
    on_gpu: bool
    opaque: tuple[str, ...]


class Builder:
    """Builds one kind of candidate. ``skip`` says why it cannot run here ("" when it can)."""

    def skip(self, ctx: BuildContext) -> str:
        return ""

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        raise NotImplementedError


class _Eager(Builder):
    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        return ctx.model, ctx.model


def _compiler_skip(ctx: BuildContext) -> str:
    if not ctx.on_gpu and compiler_path() is None:
        return NO_COMPILER
    if ctx.opaque:
        return OPAQUE_FIX.format(ops=list(ctx.opaque))
    return ""


@dataclass(frozen=True)
class _Dynamo(Builder):
    """``torch.compile(backend=..., mode=...)`` through :func:`compile_model`."""

    backend: str
    mode: str | None = None
    needs_cxx: bool = False
    needs_cuda_graphs: bool = False
    needs_module: str = ""  # an optional package the backend imports

    def skip(self, ctx: BuildContext) -> str:
        if self.needs_cuda_graphs and not ctx.on_gpu:
            return (
                "needs a CUDA GPU and inputs on it (CUDA graphs); no GPU here"
                if not torch.cuda.is_available()
                else "inputs are on the CPU; CUDA graphs need them on the GPU"
            )
        if self.needs_module:
            from fastinfer._optional import available

            if not available(self.needs_module):
                return f"{self.needs_module} is not installed (pip install {self.needs_module})"
        if self.needs_cxx and not ctx.on_gpu and compiler_path() is None:
            return NO_COMPILER
        if ctx.opaque:
            return OPAQUE_FIX.format(ops=list(ctx.opaque))
        if not self.needs_cxx and not self.needs_module:  # any other dynamo backend name
            known = torch.compiler.list_backends(exclude_tags=())
            if self.backend not in known:
                return f"unknown backend {self.backend!r}; known: {sorted(known)}"
        return ""

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        compiled = compile_model(
            ctx.model,
            ctx.example_inputs,
            backend=self.backend,
            mode=self.mode,
            batch_sizes=ctx.sizes,
            verify=False,
            cache=ctx.cache,
        )
        return compiled, compiled


class _Aot(Builder):
    def skip(self, ctx: BuildContext) -> str:
        return _compiler_skip(ctx)

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        if not isinstance(ctx.model, nn.Module):
            raise CompileError("the aot candidate needs an nn.Module")
        pkg = export_aot(
            ctx.model,
            ctx.example_inputs,
            ctx.tmp / "model.pt2",
            batch_sizes=ctx.sizes,
            verify=False,
            cache=ctx.cache,
        )
        loaded = load_aot(pkg)
        return loaded, loaded


@dataclass(frozen=True)
class _Given(Builder):
    """A ``(name, callable)`` candidate: already built by the caller."""

    fn: Callable[..., Any]

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        return self.fn, self.fn


#: Candidate name -> builder. A name not here is tried as a dynamo backend (``_Dynamo(name)``).
BUILDERS: dict[str, Builder] = {
    "eager": _Eager(),
    "inductor": _Dynamo("inductor", needs_cxx=True),
    "max-autotune-no-cudagraphs": _Dynamo("inductor", "max-autotune-no-cudagraphs", needs_cxx=True),
    "max-autotune": _Dynamo("inductor", "max-autotune", needs_cxx=True),
    "reduce-overhead": _Dynamo(
        "inductor", "reduce-overhead", needs_cxx=True, needs_cuda_graphs=True
    ),
    "aot": _Aot(),
    "onnxrt": _Dynamo("onnxrt", needs_module="onnxruntime"),
}


def _builder(spec: Any) -> Builder:
    if not isinstance(spec, str):
        return _Given(spec)
    return BUILDERS.get(spec) or _Dynamo(spec)


# ---------------------------------------------------------------------------------------------
# select_backend
# ---------------------------------------------------------------------------------------------


def _time_candidates(
    fns: Mapping[str, Callable[[], Any]], *, repeat: int, target_seconds: float = 0.01
) -> dict[str, float]:
    """Median seconds per call of each fn, trials interleaved round-robin."""
    for fn in fns.values():
        fn()
        fn()
    number = calls_per_sample(next(iter(fns.values())), target_seconds=target_seconds)
    samples = interleaved_samples(fns, rounds=repeat, number=number)
    return {k: median(v) for k, v in samples.items()}


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
    budget_seconds: float = 300.0,
    margin: float = 0.05,
    repeat: int = 7,
    rtol: float | None = None,
    atol: float | None = None,
    cache: InductorCache | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
) -> BackendReport:
    """Measure each candidate on the real inputs and pick the fastest that beats eager by ``margin``.

    Candidates are names (``"eager"``, ``"inductor"``, ``"max-autotune-no-cudagraphs"``,
    ``"reduce-overhead"`` (CUDA only), ``"aot"`` (AOTInductor), ``"onnxrt"`` or any other dynamo
    backend name) or ``(name, callable)`` pairs such as an attention-swapped copy of the model.
    A candidate that cannot work here is skipped with its reason; one whose outputs differ from
    eager beyond tolerance is rejected. Candidates not reached within ``budget_seconds`` are skipped.
    The decision is stored under ``cache_dir`` (default ``$FASTINFER_CACHE_DIR/decisions``), keyed
    by the model's code and weights, the input spec, the candidates and the environment, so a
    restart reuses it instead of re-benchmarking (``refresh=True`` forces a new measurement).
    """
    sizes = check_batch_sizes(batch_sizes)
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin!r}")
    if budget_seconds <= 0:
        raise ConfigError(f"budget_seconds must be > 0, got {budget_seconds!r}")
    named = _parse_candidates(candidates)
    names = [n for n, _ in named]

    key_doc = {
        "model": _model_key(model),
        "inputs": input_spec(example_inputs),
        "batch_sizes": list(sizes),
        "candidates": [
            n if isinstance(c, str) else f"{n}={_model_key(c) if isinstance(c, nn.Module) else n}"
            for n, c in named
        ],
        "margin": margin,
        "environment": environment_manifest(),
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()
    decisions = _decisions_dir(cache_dir)
    record = decisions / f"{key[:32]}.json" if decisions else None
    if record is not None and record.is_file() and not refresh:
        try:
            report = BackendReport.from_dict(json.loads(record.read_text()), from_cache=True)
            logger.info("select_backend: reusing the decision in %s (%s)", record, report.winner)
            return report
        except (ValueError, KeyError) as exc:
            logger.warning("select_backend: ignoring unreadable decision %s: %s", record, exc)

    args0, kwargs0 = inputs_for(example_inputs, sizes[-1])
    on_gpu = any(t.is_cuda for t in tensors(args0, kwargs0))
    batches, expected, opaque = eager_reference(model, example_inputs, sizes)

    deadline = time.monotonic() + budget_seconds
    built: dict[str, Callable[..., Any]] = {}
    compiled_objs: dict[str, Any] = {}
    outcome: dict[str, CandidateResult] = {}
    tmp = tempfile.TemporaryDirectory(prefix="fastinfer-select-")
    try:
        for name, spec in named:
            if time.monotonic() > deadline and name != "eager":
                outcome[name] = CandidateResult(
                    name, "skipped", f"budget of {budget_seconds:g}s spent"
                )
                continue
            builder = _builder(spec)
            ctx = BuildContext(model, example_inputs, sizes, cache, Path(tmp.name), on_gpu, opaque)
            skip = builder.skip(ctx)
            if skip:
                outcome[name] = CandidateResult(name, "skipped", skip)
                continue
            t0 = time.perf_counter()
            try:
                fn, obj = builder.build(ctx)
            except Exception as exc:
                outcome[name] = CandidateResult(name, "failed", explain(exc)[:400])
                continue
            compile_s = time.perf_counter() - t0
            err = 0.0
            try:
                for b in sizes:
                    with torch.inference_mode():
                        out = fn(*batches[b][0], **batches[b][1])
                    err = max(err, max_error(out, expected[b]))
                    check_close(out, expected[b], rtol=rtol, atol=atol, where=f"batch size {b}")
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
            outcome[name] = CandidateResult(name, "ok", "", compile_s, max_error=err)

        latency: dict[str, dict[int, float]] = {n: {} for n in built}
        for b in sizes:
            a, k = batches[b]

            def call(fn: Callable[..., Any], a: Any = a, k: Any = k) -> Callable[[], Any]:
                def run() -> Any:
                    with torch.inference_mode():
                        out = fn(*a, **k)
                    if on_gpu:
                        torch.cuda.synchronize()
                    return out

                return run

            medians = _time_candidates({n: call(fn) for n, fn in built.items()}, repeat=repeat)
            for n, m in medians.items():
                latency[n][b] = m
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
    )
    if record is not None:
        atomic_write_text(record, report.to_json())
    return report

"""Compile a model so that every compilation happens before the first request, and pick a backend.

:func:`compile_model` compiles and immediately warms up at every batch size the service will send
(batch size 1 included), checks the outputs against eager within a per-dtype tolerance, counts
graphs and recompilations, then forbids compiling at serve time: ``torch.compile`` is lazy, so a
``try``/``except`` around it catches nothing and failures would otherwise arrive with the first
request. :func:`select_backend` measures the candidates on the real inputs and caches the decision
on disk. :func:`export_aot` / :func:`load_aot` write and load an AOTInductor package, which loads
with no JIT and no C++ compiler.

    >>> compiled = fastinfer.compile_model(model, (x,), batch_sizes=(1, 8, 32))
    >>> compiled(x)                      # never compiles; an unwarmed shape raises RecompileError
    >>> compiled.statistics().graphs
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
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastinfer import _env
from fastinfer.errors import (
    CacheMismatchError,
    CompileError,
    ConfigError,
    RecompileError,
    VerificationError,
)
from fastinfer.inductor_cache import (
    InductorCache,
    _counters,
    _cxx,
    environment_manifest,
    manifest_diff,
)

__all__ = [
    "BackendReport",
    "CandidateResult",
    "CompileStatistics",
    "CompiledModel",
    "compile_model",
    "export_aot",
    "load_aot",
    "select_backend",
]

logger = logging.getLogger(__name__)

# Per-dtype (rtol, atol) for compiled-vs-eager checks: fused kernels reorder float reductions.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
# Fused ops that compiling cannot see into (nn.TransformerEncoder / MultiheadAttention fastpath).
OPAQUE_FUSED_OPS = (
    "_transformer_encoder_layer_fwd",
    "_native_multi_head_attention",
    "_transformer_decoder_only_layer_fwd",
)
_NO_COMPILER = (
    "no working C++ compiler found (looked for $CXX, g++, c++, clang++ on PATH): install g++ "
    "(e.g. apt-get install g++), set CXX, or ship an AOTInductor package (fastinfer.export_aot) "
    "that loads without one"
)
_OPAQUE_FIX = (
    "compiling gains nothing here: the model runs the opaque fused op(s) {ops} "
    "(nn.TransformerEncoder/MultiheadAttention fastpath), which the compiler cannot see into. "
    "Fix: call torch.backends.mha.set_fastpath_enabled(False) before compiling so the attention "
    "and feed-forward ops are compiled, or keep the model eager"
)
_warm_lock = threading.Lock()  # warm-up attributes dynamo's global counters to one model at a time
_logged: set[str] = set()

Inputs = Any  # a tensor, a tuple/list of positional args, or a dict of keyword args


# ---------------------------------------------------------------------------------------------
# inputs and numerics
# ---------------------------------------------------------------------------------------------


def _split(example_inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ConfigError(
        "example_inputs must be a tensor, a tuple/list of positional arguments or a dict of "
        f"keyword arguments, got {type(example_inputs).__name__}"
    )


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    ts = [t for t in _tensors(args, kwargs) if t.dim() > 0]
    return int(ts[0].shape[0]) if ts else None


def _resize(value: Any, batch: int) -> Any:
    """``value`` with ``batch`` rows along dim 0 (rows repeated cyclically), others unchanged."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    n = value.shape[0]
    if n == 0:
        raise ConfigError("example inputs have an empty batch dimension; give at least one row")
    reps = math.ceil(batch / n)
    return torch.cat([value] * reps)[:batch].clone()  # (batch, ...)


def inputs_for(example_inputs: Inputs, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = _split(example_inputs)
    return (
        tuple(_resize(a, batch) for a in args),
        {k: _resize(v, batch) for k, v in kwargs.items()},
    )


def _leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]


def max_error(actual: Any, expected: Any) -> float:
    """Largest absolute difference between two outputs' tensors (inf when the structure differs)."""
    a, e = _leaves(actual), _leaves(expected)
    if len(a) != len(e) or any(x.shape != y.shape for x, y in zip(a, e)):
        return math.inf
    err = 0.0
    for x, y in zip(a, e):
        if x.numel() and (x.is_floating_point() or y.is_floating_point()):
            err = max(err, (x.double() - y.double()).abs().max().item())
        elif x.numel() and not torch.equal(x, y):
            return math.inf
    return err


def _check_close(
    actual: Any, expected: Any, *, rtol: float | None, atol: float | None, where: str
) -> None:
    a, e = _leaves(actual), _leaves(expected)
    if len(a) != len(e):
        raise VerificationError(f"{where}: {len(a)} output tensors, eager gives {len(e)}")
    for i, (x, y) in enumerate(zip(a, e)):
        rt, at = TOLERANCES.get(y.dtype, (0.0, 0.0))
        rt, at = rtol if rtol is not None else rt, atol if atol is not None else at
        try:
            torch.testing.assert_close(x, y, rtol=rt, atol=at, equal_nan=True)
        except AssertionError as exc:
            raise VerificationError(
                f"{where}: output {i} ({y.dtype}, shape {tuple(y.shape)}) differs from eager "
                f"beyond rtol={rt:g}, atol={at:g} (max error {max_error(x, y):.3g}). This is what "
                "a cache built for another CPU ISA looks like; fix: use a matching cache or "
                "backend, or loosen rtol/atol if the difference is expected.\n"
                f"{str(exc)[:500]}"
            ) from None


def _opaque_ops(model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run eager once, recording aten ops; returns (output, opaque fused ops seen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class _Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = str(func)
            if any(op in name for op in OPAQUE_FUSED_OPS):
                seen.add(name.split(".")[1] if name.startswith("aten.") else name)
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), _Spy():
        out = model(*args, **kwargs)
    return out, tuple(sorted(seen))


def _log_once(key: str, level: int, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


# ---------------------------------------------------------------------------------------------
# compile_model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileStatistics:
    """A snapshot of a :class:`CompiledModel` (maps to ``fastinfer_compile_seconds`` and
    ``fastinfer_compile_cache_total{result}``)."""

    backend: str
    mode: str | None
    graphs: int
    recompiles: int
    compile_seconds: float
    warmed_batch_sizes: tuple[int, ...]
    max_error: float
    fallback: str | None
    opaque_fused_ops: tuple[str, ...]
    cache_hits: int
    cache_misses: int
    cache_bypasses: int
    calls: int
    unwarmed_calls: int
    recompiles_refused: int


class CompiledModel:
    """A compiled, warmed-up model that never compiles at serve time.

    Calls run under ``torch.inference_mode()`` (the grad mode it was warmed up in) and, for a
    compiled backend, under ``torch.compiler.set_stance("fail_on_recompile")`` (or
    ``"eager_on_recompile"``) for the duration of the call. The stance is process-wide while a call
    runs, so do not warm up another model in a second thread while this one serves.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        compiled: Callable[..., Any],
        *,
        stats: dict[str, Any],
        on_recompile: str,
        uses_dynamo: bool,
    ) -> None:
        self.model = model
        self.compiled = compiled
        self._stats = stats
        self._uses_dynamo = uses_dynamo
        self._lock = threading.Lock()
        self.on_recompile = on_recompile

    @property
    def on_recompile(self) -> str:
        return self._on_recompile

    @on_recompile.setter
    def on_recompile(self, value: str) -> None:
        if value not in ("error", "eager"):
            raise ConfigError(f"on_recompile must be 'error' or 'eager', got {value!r}")
        self._on_recompile = value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = _batch_of(args, kwargs)
        with self._lock:
            self._stats["calls"] += 1
            if batch is not None and batch not in self._stats["warmed_batch_sizes"]:
                self._stats["unwarmed_calls"] += 1
        if not self._uses_dynamo:
            with torch.inference_mode():
                return self.compiled(*args, **kwargs)
        stance = "fail_on_recompile" if self._on_recompile == "error" else "eager_on_recompile"
        try:
            with torch.inference_mode(), torch.compiler.set_stance(stance):
                return self.compiled(*args, **kwargs)
        except Exception as exc:
            if "Detected recompile" not in str(exc):
                raise
            with self._lock:
                self._stats["recompiles_refused"] += 1
            shapes = [tuple(t.shape) for t in _tensors(args, kwargs)]
            raise RecompileError(
                f"a call with input shapes {shapes} needs a new compilation, which is forbidden "
                f"after warm-up (warmed batch sizes: {list(self._stats['warmed_batch_sizes'])}). "
                "Fix: add the batch size to compile_model(batch_sizes=...), pad requests to a "
                "warmed size, or pass on_recompile='eager' to run such calls eagerly.\n"
                f"{str(exc).splitlines()[0]}"
            ) from exc

    forward = __call__

    def statistics(self) -> CompileStatistics:
        with self._lock:
            s = dict(self._stats)
        s["warmed_batch_sizes"] = tuple(s["warmed_batch_sizes"])
        return CompileStatistics(**s)

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"CompiledModel(backend={s.backend!r}, mode={s.mode!r}, graphs={s.graphs}, "
            f"batch_sizes={list(s.warmed_batch_sizes)}, fallback={s.fallback!r})"
        )


def _check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    sizes = tuple(sorted(set(batch_sizes)))
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    return sizes


def _cpu_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return all(t.device.type == "cpu" for t in _tensors(args, kwargs))


def _resolve_cache(cache: InductorCache | None, backend: Any) -> InductorCache | None:
    if cache is not None or not (isinstance(backend, str) and backend == "inductor"):
        return cache
    path = _env.get("FASTINFER_CACHE_DIR")
    if not path:
        _log_once(
            "no-cache",
            logging.INFO,
            "compiling into torch's default cache in the temporary directory (wiped on restart); "
            "pass cache=fastinfer.InductorCache(path) or set FASTINFER_CACHE_DIR to start warm",
        )
    return InductorCache(path) if path else None


def _explain(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    markers = ("cppcompileerror", "invalidcxxcompiler", "no such file or dir")
    if any(s in lowered for s in markers) and any(s in lowered for s in ("g++", "c++", "compiler")):
        return f"{_NO_COMPILER}. Cause: {text[:800]}"
    if "constraintviolation" in lowered or "specialized" in lowered:
        return (
            f"{text[:1200]}\nFix: the model fixes the batch size in its code; pass dynamic=False "
            "to compile one graph per batch size"
        )
    return text[:1500]


def _new_stats(backend: str, mode: str | None, **values: Any) -> dict[str, Any]:
    """The mutable counters behind :meth:`CompiledModel.statistics`, all zero but ``values``."""
    stats: dict[str, Any] = {
        "backend": backend,
        "mode": mode,
        "graphs": 0,
        "recompiles": 0,
        "compile_seconds": 0.0,
        "warmed_batch_sizes": (),
        "max_error": 0.0,
        "fallback": None,
        "opaque_fused_ops": (),
        "cache_hits": 0,
        "cache_misses": 0,
        "cache_bypasses": 0,
        "calls": 0,
        "unwarmed_calls": 0,
        "recompiles_refused": 0,
    }
    stats.update(values)
    return stats


def compile_model(
    model: Callable[..., Any],
    example_inputs: Inputs,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    batch_sizes: Sequence[int] = (1,),
    dynamic: bool | None = None,
    fallback: Literal["error", "eager"] = "error",
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    on_recompile: Literal["error", "eager"] = "error",
    cache: InductorCache | None = None,
    options: dict[str, Any] | None = None,
) -> CompiledModel:
    """Compile ``model`` and warm it up at every batch size, so serving never compiles.

    ``example_inputs`` is one request batch (a tensor, a tuple of positional args or a dict of
    keyword args); it is resized along dim 0 to each of ``batch_sizes`` (batch size 1 is always
    added: it always gets its own graph). ``dynamic=None`` compiles one graph with a dynamic batch
    dimension for sizes >= 2 (plus one for size 1); ``dynamic=False`` one graph per size, with a
    per-model recompile limit that fits them all. ``cache`` (default ``$FASTINFER_CACHE_DIR``)
    holds inductor's compile cache; one process compiles into it while others wait.

    Raises :class:`CompileError` with the cause and the fix (``fallback="eager"`` instead returns
    the eager model, recorded in ``statistics().fallback`` and logged once), and
    :class:`VerificationError` when outputs differ from eager beyond the per-dtype tolerance.
    """
    if fallback not in ("error", "eager"):
        raise ConfigError(f"fallback must be 'error' or 'eager', got {fallback!r}")
    if on_recompile not in ("error", "eager"):
        raise ConfigError(f"on_recompile must be 'error' or 'eager', got {on_recompile!r}")
    if not callable(model):
        raise ConfigError(f"model must be callable, got {type(model).__name__}")
    if mode is not None and options is not None:
        raise ConfigError("pass either mode or options, not both")
    sizes = _check_batch_sizes((1, *batch_sizes))
    if isinstance(model, nn.Module) and model.training:
        raise ConfigError("model is in training mode: call model.eval() before compile_model")
    backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
    cache = _resolve_cache(cache, backend)

    args0, kwargs0 = inputs_for(example_inputs, sizes[-1])
    stats = _new_stats(backend_name, mode, warmed_batch_sizes=sizes)
    # Eager reference outputs, and a look for opaque fused ops (cheap: one eager pass each).
    batches = {b: inputs_for(example_inputs, b) for b in sizes}
    expected: dict[int, Any] = {}
    for b in sizes:
        if b == sizes[-1]:
            expected[b], opaque = _opaque_ops(model, *batches[b])
        else:
            with torch.inference_mode():
                expected[b] = model(*batches[b][0], **batches[b][1])
    stats["opaque_fused_ops"] = opaque
    if opaque:
        _log_once(
            f"opaque:{type(model).__qualname__}",
            logging.WARNING,
            "%s",
            _OPAQUE_FIX.format(ops=list(opaque)),
        )

    def give_up(reason: str, exc: BaseException | None) -> CompiledModel:
        if fallback == "error":
            raise CompileError(f"compiling with backend {backend_name!r} failed: {reason}") from exc
        stats["fallback"] = reason
        _log_once(
            f"fallback:{backend_name}:{reason[:80]}",
            logging.WARNING,
            "compile_model: backend %r failed, running eager as fallback='eager' asked: %s",
            backend_name,
            reason,
        )
        return CompiledModel(
            model, model, stats=stats, on_recompile=on_recompile, uses_dynamo=False
        )

    if backend_name in ("inductor",) and _cpu_inputs(args0, kwargs0) and _cxx() is None:
        return give_up(_NO_COMPILER, None)

    from torch import _dynamo

    limit = max(8, len(sizes) + 2)
    torch_compile: Any = torch.compile
    per_model: dict[str, Any] = {}
    if "recompile_limit" in inspect.signature(torch_compile).parameters:  # torch >= 2.12
        per_model = {"recompile_limit": limit, "isolate_recompiles": True}
    try:
        compiled = torch_compile(
            model,
            backend=backend,
            mode=mode,
            options=options,
            dynamic=False if dynamic is False else (True if dynamic else None),
            **per_model,
        )
    except Exception as exc:  # bad backend name, unsupported Python...
        return give_up(_explain(exc), exc)

    # Largest size first, batch dim marked dynamic: one graph covers 2..max; size 1 gets its own.
    order = sorted(sizes, reverse=True)
    mark = dynamic is None and len([b for b in sizes if b >= 2]) > 1
    ctx = contextlib.ExitStack()
    with _warm_lock, ctx:
        if cache is not None:
            if not cache.active:
                ctx.enter_context(cache)
            ctx.enter_context(cache.exclusive())
        from torch._dynamo.utils import counters

        g0, c0 = counters["stats"]["unique_graphs"], _counters()
        t0 = time.perf_counter()
        first_graphs = None
        try:
            for b in order:
                args, kwargs = batches[b]
                if mark and b >= 2:
                    for t in _tensors(args, kwargs):
                        if t.dim() > 0:
                            _dynamo.mark_dynamic(t, 0, min=2, max=max(sizes))
                with torch.inference_mode():
                    out = compiled(*args, **kwargs)
                if first_graphs is None:
                    first_graphs = counters["stats"]["unique_graphs"] - g0
                err = max_error(out, expected[b])
                stats["max_error"] = max(stats["max_error"], err)
                if verify:
                    _check_close(out, expected[b], rtol=rtol, atol=atol, where=f"batch size {b}")
        except VerificationError:
            raise
        except Exception as exc:
            return give_up(_explain(exc), exc)
        stats["compile_seconds"] = time.perf_counter() - t0
        stats["graphs"] = counters["stats"]["unique_graphs"] - g0
        stats["recompiles"] = stats["graphs"] - (first_graphs or 0)
        c1 = _counters()
        stats["cache_hits"], stats["cache_misses"], stats["cache_bypasses"] = (
            c1[0] - c0[0],
            c1[1] - c0[1],
            c1[2] - c0[2],
        )
    result = CompiledModel(model, compiled, stats=stats, on_recompile="error", uses_dynamo=True)
    # Prove the warm-up stuck: every warmed size again, with compiling forbidden.
    for b in sizes:
        try:
            result(*batches[b][0], **batches[b][1])
        except RecompileError as exc:
            raise CompileError(
                f"warm-up did not cover batch size {b}: a second call still recompiles (unstable "
                f"guards in the model). {exc}"
            ) from exc
    with result._lock:
        stats["calls"] = 0
    result.on_recompile = on_recompile
    logger.info(
        "compiled %s with %s: %d graph(s), %.2fs, batch sizes %s",
        type(model).__name__,
        backend_name,
        stats["graphs"],
        stats["compile_seconds"],
        list(sizes),
    )
    return result


# ---------------------------------------------------------------------------------------------
# AOTInductor packages
# ---------------------------------------------------------------------------------------------

_AOT_MANIFEST = "extra/fastinfer-manifest.json"
_AOT_FIELDS = ("torch", "machine", "cpu_capability", "gpu", "cuda")


def export_aot(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    batch_sizes: Sequence[int] = (1, 8),
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    inductor_configs: dict[str, Any] | None = None,
    cache: InductorCache | None = None,
) -> Path:
    """Write an AOTInductor ``.pt2`` package with a dynamic batch dimension (dim 0 of each tensor).

    The batch dimension ranges over ``min(batch_sizes)..max(batch_sizes)``; every size in
    ``batch_sizes`` is checked against eager before the package is renamed into place. The package
    records the environment it was built for (torch, CPU ISA, GPU) and :func:`load_aot` checks it.
    The compile runs inside ``cache`` (default ``$FASTINFER_CACHE_DIR`` when set). Raises :class:`CompileError` (no C++ compiler, export failure) or :class:`VerificationError`.
    """
    sizes = _check_batch_sizes(batch_sizes)
    if not isinstance(model, nn.Module):
        raise ConfigError("export_aot needs an nn.Module (torch.export exports modules)")
    if model.training:
        raise ConfigError("model is in training mode: call model.eval() before export_aot")
    args, kwargs = inputs_for(example_inputs, max(sizes))
    if _cpu_inputs(args, kwargs) and _cxx() is None:
        raise CompileError(f"export_aot failed: {_NO_COMPILER}")
    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    from torch import _inductor
    from torch import export as torch_export

    def spec(value: Any, dim: Any) -> Any:
        return {0: dim} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    dim: Any = None
    if len(sizes) > 1:
        dim = torch_export.Dim("batch", min=min(sizes), max=max(sizes))
    dynamic_shapes: Any = None
    if dim is not None:
        dynamic_shapes = (
            {k: spec(v, dim) for k, v in kwargs.items()}
            if not args
            else tuple(spec(a, dim) for a in args)
        )
        if args and kwargs:
            dynamic_shapes = {
                **dict(zip(_positional_names(model, len(args)), dynamic_shapes)),
                **{k: spec(v, dim) for k, v in kwargs.items()},
            }
    cache = _resolve_cache(cache, "inductor")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".pt2")
    os.close(fd)
    try:
        try:
            ctx = contextlib.ExitStack()
            if cache is not None and not cache.active:
                ctx.enter_context(cache)
            with ctx, torch.inference_mode(False), torch.no_grad():
                ep = torch_export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
                _inductor.aoti_compile_and_package(
                    ep, package_path=tmp, inductor_configs=inductor_configs
                )
        except Exception as exc:
            raise CompileError(f"export_aot failed: {_explain(exc)}") from exc
        import zipfile

        with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_STORED) as zf:
            root = zf.namelist()[0].split("/")[0]
            zf.writestr(f"{root}/{_AOT_MANIFEST}", json.dumps(environment_manifest()))
        if verify:
            loaded = load_aot(tmp)
            for b in sizes:
                a, k = inputs_for(example_inputs, b)
                with torch.inference_mode():
                    expected = model(*a, **k)
                _check_close(
                    loaded(*a, **k), expected, rtol=rtol, atol=atol, where=f"AOT batch {b}"
                )
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _positional_names(model: nn.Module, n: int) -> list[str]:
    params = list(inspect.signature(model.forward).parameters)
    return params[:n]


def _load_runner(path: str) -> Any:
    # torch's own load_package first probes this CPU's vector ISA by compiling test programs
    # (seconds, and it needs a C++ compiler) only to warn on a mismatch; fastinfer checks its own
    # manifest instead, so go straight to the package loader.
    try:
        from torch._inductor.package.package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
        return AOTICompiledModel(loader)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other torch versions
        from torch import _inductor

        return _inductor.aoti_load_package(path)


def load_aot(path: str | os.PathLike[str], *, check_environment: bool = True) -> CompiledModel:
    """Load an AOTInductor package written by :func:`export_aot`: no JIT, no C++ compiler needed.

    Raises :class:`~fastinfer.CacheMismatchError` when the package was built for another
    environment (torch version, CPU ISA, GPU) and :class:`~fastinfer.LoadError`-like
    :class:`CompileError` when the file is not a package.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"AOT package {p} does not exist; build one with fastinfer.export_aot")
    import zipfile

    built: dict[str, Any] | None = None
    try:
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                if name.endswith(_AOT_MANIFEST):
                    built = json.loads(zf.read(name))
    except zipfile.BadZipFile as exc:
        raise CompileError(f"{p} is not an AOTInductor .pt2 package ({exc})") from exc
    if check_environment and built is not None:
        here = environment_manifest()
        diff = manifest_diff(
            {k: built.get(k) for k in _AOT_FIELDS}, {k: here.get(k) for k in _AOT_FIELDS}
        )
        if diff:
            fields = "; ".join(f"{k}: built for {a!r}, here {b!r}" for k, (a, b) in diff.items())
            raise CacheMismatchError(
                f"AOT package {p} was built for another environment: {fields}. Fix: rebuild it "
                "here with fastinfer.export_aot or `fastinfer warm --aot`"
            )
    t0 = time.perf_counter()
    try:
        runner = _load_runner(str(p))
    except Exception as exc:
        raise CompileError(f"loading AOT package {p} failed: {_explain(exc)}") from exc
    stats = _new_stats("aot", None, compile_seconds=time.perf_counter() - t0)
    return CompiledModel(runner, runner, stats=stats, on_recompile="error", uses_dynamo=False)


# ---------------------------------------------------------------------------------------------
# select_backend
# ---------------------------------------------------------------------------------------------

DEFAULT_CANDIDATES = (
    "eager",
    "inductor",
    "max-autotune-no-cudagraphs",
    "reduce-overhead",
    "aot",
    "onnxrt",
)
_MODES = {
    "inductor": ("inductor", None),
    "max-autotune-no-cudagraphs": ("inductor", "max-autotune-no-cudagraphs"),
    "max-autotune": ("inductor", "max-autotune"),
    "reduce-overhead": ("inductor", "reduce-overhead"),
}
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
        if self.winner in _MODES:
            backend, mode = _MODES[self.winner]
            return {"backend": backend, "mode": mode}
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
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
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


def _input_spec(example_inputs: Inputs) -> list[Any]:
    args, kwargs = _split(example_inputs)
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


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2


def _time_interleaved(
    fns: Mapping[str, Callable[[], Any]], *, repeat: int, target_s: float = 0.01
) -> dict[str, float]:
    """Median seconds per call of each fn, trials interleaved round-robin."""
    for fn in fns.values():
        fn()
        fn()
    t0 = time.perf_counter()
    next(iter(fns.values()))()
    one = max(time.perf_counter() - t0, 1e-6)
    number = max(1, min(1000, int(target_s / one)))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - t) / number)
    return {k: _median(v) for k, v in samples.items()}


def select_backend(
    model: Callable[..., Any],
    example_inputs: Inputs,
    *,
    candidates: Sequence[Candidate] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    budget_s: float = 300.0,
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
    eager beyond tolerance is rejected. Candidates not reached within ``budget_s`` are skipped.
    The decision is stored under ``cache_dir`` (default ``$FASTINFER_CACHE_DIR/decisions``), keyed
    by the model's code and weights, the input spec, the candidates and the environment, so a
    restart reuses it instead of re-benchmarking (``refresh=True`` forces a new measurement).
    """
    sizes = _check_batch_sizes(batch_sizes)
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin!r}")
    if budget_s <= 0:
        raise ConfigError(f"budget_s must be > 0, got {budget_s!r}")
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

    key_doc = {
        "model": _model_key(model),
        "inputs": _input_spec(example_inputs),
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
    on_gpu = any(t.is_cuda for t in _tensors(args0, kwargs0))
    expected: dict[int, Any] = {}
    batches = {b: inputs_for(example_inputs, b) for b in sizes}
    for b in sizes:
        if b == sizes[-1]:
            expected[b], opaque = _opaque_ops(model, *batches[b])
        else:
            with torch.inference_mode():
                expected[b] = model(*batches[b][0], **batches[b][1])

    deadline = time.monotonic() + budget_s
    built: dict[str, Callable[..., Any]] = {}
    compiled_objs: dict[str, Any] = {}
    outcome: dict[str, CandidateResult] = {}
    tmp = tempfile.TemporaryDirectory(prefix="fastinfer-select-")
    try:
        for name, spec in named:
            if time.monotonic() > deadline and name != "eager":
                outcome[name] = CandidateResult(name, "skipped", f"budget of {budget_s:g}s spent")
                continue
            skip = _skip_reason(name, spec, on_gpu=on_gpu, opaque=opaque)
            if skip:
                outcome[name] = CandidateResult(name, "skipped", skip)
                continue
            t0 = time.perf_counter()
            try:
                fn, obj = _build(name, spec, model, example_inputs, sizes, cache, Path(tmp.name))
            except Exception as exc:
                outcome[name] = CandidateResult(name, "failed", _explain(exc)[:400])
                continue
            compile_s = time.perf_counter() - t0
            err = 0.0
            try:
                for b in sizes:
                    with torch.inference_mode():
                        out = fn(*batches[b][0], **batches[b][1])
                    err = max(err, max_error(out, expected[b]))
                    _check_close(out, expected[b], rtol=rtol, atol=atol, where=f"batch size {b}")
            except VerificationError as exc:
                outcome[name] = CandidateResult(
                    name, "rejected", str(exc).splitlines()[0][:300], compile_s, max_error=err
                )
                continue
            except Exception as exc:
                outcome[name] = CandidateResult(name, "failed", _explain(exc)[:400], compile_s)
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

            medians = _time_interleaved({n: call(fn) for n, fn in built.items()}, repeat=repeat)
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
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmpname = tempfile.mkstemp(dir=record.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(report.to_json())
        os.replace(tmpname, record)
    return report


def _skip_reason(name: str, spec: Any, *, on_gpu: bool, opaque: tuple[str, ...]) -> str:
    if not isinstance(spec, str) or spec == "eager":
        return ""
    if spec == "reduce-overhead" and not on_gpu:
        return (
            "needs a CUDA GPU and inputs on it (CUDA graphs); no GPU here"
            if not torch.cuda.is_available()
            else "inputs are on the CPU; CUDA graphs need them on the GPU"
        )
    if spec == "onnxrt":
        from fastinfer._optional import available

        if not available("onnxruntime"):
            return "onnxruntime is not installed (pip install onnxruntime)"
    if not on_gpu and spec in (*_MODES, "aot") and _cxx() is None:
        return _NO_COMPILER
    if opaque:
        return _OPAQUE_FIX.format(ops=list(opaque))
    if spec not in (*_MODES, "aot", "onnxrt"):
        from torch import _dynamo

        if spec not in _dynamo.list_backends(exclude_tags=()):
            return (
                f"unknown backend {spec!r}; known: {sorted(_dynamo.list_backends(exclude_tags=()))}"
            )
    return ""


def _build(
    name: str,
    spec: Any,
    model: Callable[..., Any],
    example_inputs: Inputs,
    sizes: tuple[int, ...],
    cache: InductorCache | None,
    tmp: Path,
) -> tuple[Callable[..., Any], Any]:
    if not isinstance(spec, str):
        return spec, spec
    if spec == "eager":
        return model, model
    if spec == "aot":
        if not isinstance(model, nn.Module):
            raise CompileError("the aot candidate needs an nn.Module")
        pkg = export_aot(
            model, example_inputs, tmp / "model.pt2", batch_sizes=sizes, verify=False, cache=cache
        )
        loaded = load_aot(pkg)
        return loaded, loaded
    backend, mode = _MODES.get(spec, (spec, None))
    compiled = compile_model(
        model,
        example_inputs,
        backend=backend,
        mode=mode,
        batch_sizes=sizes,
        verify=False,
        cache=cache,
    )
    return compiled, compiled

"""compile_model and CompiledModel: compile, warm up every batch size, then never compile again."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fastinfer import _env, _torch_compat
from fastinfer._common.export import counter, gauge, not_exported
from fastinfer.compiling._cache import InductorCache
from fastinfer.compiling._cache_files import call_repairing
from fastinfer.compiling._freezing import freezing_config, freezing_mode
from fastinfer.compiling._guards import batch_specialisation, recompile_message, settings
from fastinfer.compiling._inputs import (
    CallBinder,
    Inputs,
    batch_of,
    batched_keys,
    check_batch_sizes,
    cpu_inputs,
    inputs_for,
    non_batch_hint,
    normal_inputs,
    split,
    tensors,
)
from fastinfer.compiling._manifest import cache_counters, compiler_path
from fastinfer.compiling._verify import (
    NO_COMPILER,
    OPAQUE_FIX,
    check_close,
    eager_reference,
    explain,
    log_once,
    max_error,
    swap_refusal,
)
from fastinfer.errors import CompileError, ConfigError, RecompileError, VerificationError

__all__ = [
    "CompileStatistics",
    "CompiledModel",
    "compile_model",
    "eager_inputs",
    "new_stats",
    "refuse_training",
    "resolve_cache",
]

logger = logging.getLogger("fastinfer.compiling")

_warm_lock = threading.Lock()  # warm-up attributes dynamo's global counters to one model at a time
COMPILE_CACHE = "fastinfer_compile_cache_total"


@dataclass(frozen=True)
class CompileStatistics:
    """A snapshot of a :class:`CompiledModel` (maps to ``fastinfer_compile_seconds`` and
    ``fastinfer_compile_cache_total{result}``)."""

    backend: str = not_exported("text: the backend's name")
    mode: str | None = not_exported("text: the compile mode")
    graphs: int = gauge()
    recompiles: int = gauge()
    compile_seconds: float = gauge()
    warmed_batch_sizes: tuple[int, ...] = not_exported("a list of sizes, fixed after warm-up")
    max_error: float = gauge()
    fallback: str | None = not_exported("text: why the eager fallback was taken")
    opaque_fused_ops: tuple[str, ...] = not_exported("op names")
    cache_hits: int = counter(standard=COMPILE_CACHE, labels={"result": "hit"})
    cache_misses: int = counter(standard=COMPILE_CACHE, labels={"result": "miss"})
    cache_bypasses: int = counter(standard=COMPILE_CACHE, labels={"result": "bypass"})
    calls: int = gauge()
    unwarmed_calls: int = gauge()
    recompiles_refused: int = gauge()
    batch_dim: str = not_exported("text: 'dynamic' (one graph for 2..max) or 'static'")
    batch_dim_reason: str = not_exported("text: why the batch dimension is static")
    freezing: str = not_exported(
        "text: inductor freezing applied (on, prepack, off)", default="off"
    )


class CompiledModel:
    """A compiled, warmed-up model that never compiles at serve time.

    Calls run under ``torch.inference_mode()`` (the grad mode it was warmed up in), whatever mode
    the caller is in (``torch.no_grad()``, ``torch.inference_mode()`` or neither), with input
    tensors normalised to the kind that was warmed: tensors made under ``inference_mode`` are
    copied to normal tensors, tensors that require grad are detached. For a compiled backend the
    call runs under ``torch.compiler.set_stance("fail_on_recompile")`` (or ``"eager_on_recompile"``).
    The stance is process-wide while a call runs, so do not warm up another model in a second
    thread while this one serves. With ``binder`` (compile_model's), a call's arguments are bound
    to the model's signature and passed as they were at warm-up (positionally or by keyword), so
    ``cm(ids, attention_mask=m)`` runs the graphs warmed with ``cm(input_ids=ids, ...)``.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        compiled: Callable[..., Any],
        *,
        stats: dict[str, Any],
        on_recompile: str,
        uses_dynamo: bool,
        binder: CallBinder | None = None,
    ) -> None:
        self.model = model
        self.compiled = compiled
        self._stats = stats
        self._uses_dynamo = uses_dynamo
        self._binder = binder
        # dynamo guards on these (thread count, autocast...): named only when they changed
        self._settings = settings()
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
        batch = batch_of(args, kwargs)
        with self._lock:
            self._stats["calls"] += 1
            if batch is not None and batch not in self._stats["warmed_batch_sizes"]:
                self._stats["unwarmed_calls"] += 1
        if not self._uses_dynamo:
            with torch.inference_mode():
                return self.compiled(*args, **kwargs)
        args, kwargs = normal_inputs(args), normal_inputs(kwargs)
        note = None
        if self._binder is not None:
            args, kwargs, note = self._binder.prepare(args, kwargs)
        stance = "fail_on_recompile" if self._on_recompile == "error" else "eager_on_recompile"
        try:
            with torch.inference_mode(), torch.compiler.set_stance(stance):
                return self.compiled(*args, **kwargs)
        except Exception as exc:
            if "Detected recompile" not in str(exc):
                raise
            with self._lock:
                self._stats["recompiles_refused"] += 1
            shapes = [tuple(t.shape) for t in tensors(args, kwargs)]
            warmed = self._stats["warmed_batch_sizes"]
            text = recompile_message(
                str(exc),
                shapes,
                warmed,
                compiled=self._settings,
                call=note,
            )
            raise RecompileError(text) from exc

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
            f"batch_sizes={list(s.warmed_batch_sizes)}, batch_dim={s.batch_dim!r}, "
            f"fallback={s.fallback!r})"
        )


@contextlib.contextmanager
def _quiet_guard_errors(active: bool) -> Iterator[None]:
    """Silence dynamo's ERROR log (with traceback) of a guard it cannot build, while a dynamic
    batch dimension is tried: a specialised batch dimension is handled (one graph per size) and
    any other failure is raised with its cause, so the log would only alarm."""
    log = _torch_compat.guard_error_logger()
    level = log.level
    if active:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def refuse_training(model: Any, what: str) -> None:
    """Raise :class:`ConfigError` for a module in training mode: dropout makes eager's outputs
    random, so no compiled or exported candidate could be verified against them."""
    if isinstance(model, nn.Module) and model.training:
        raise ConfigError(f"model is in training mode: call model.eval() before {what}")


def eager_inputs(
    model: Callable[..., Any],
    example_inputs: Inputs,
    sizes: tuple[int, ...],
    seconds: dict[int, float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[int, tuple[tuple[Any, ...], dict[str, Any]]], dict[int, Any], tuple[str, ...]]:
    """:func:`eager_reference`, its ConfigError for inputs the model fails on naming a tensor
    that was resized only because its leading dimension equals the batch size."""
    try:
        return eager_reference(model, example_inputs, sizes, seconds, clock)
    except ConfigError as exc:
        hint = non_batch_hint(example_inputs)
        if not hint:
            raise
        raise ConfigError(f"{exc}{hint}") from exc.__cause__


def resolve_cache(cache: InductorCache | None, backend: Any) -> InductorCache | None:
    if cache is not None or not (isinstance(backend, str) and backend == "inductor"):
        return cache
    path = _env.get("FASTINFER_CACHE_DIR")
    if not path:
        log_once(
            "no-cache",
            logging.INFO,
            "compiling into torch's default cache in the temporary directory (wiped on restart); "
            "pass cache=fastinfer.InductorCache(path) or set FASTINFER_CACHE_DIR to start warm",
        )
    return InductorCache(path) if path else None


def new_stats(backend: str, mode: str | None, **values: Any) -> dict[str, Any]:
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
        "freezing": "off",
        "batch_dim": "static",
        "batch_dim_reason": "",
    }
    stats.update(values)
    return stats


def _static_reason(sizes: tuple[int, ...]) -> str:
    """Why ``dynamic=None`` compiled static graphs for ``sizes`` (no size above 2), and the fix."""
    fix = (
        "pass the largest batch size you serve, e.g. batch_sizes=(1, 8), for one dynamic graph "
        "covering 2..8"
    )
    if sizes[-1] == 1:
        return (
            "batch_sizes holds no size above 1, so only batch size 1 was compiled (another size "
            f"would compile at serve time, which is refused): {fix}"
        )
    return (
        f"the only batch size above 1 is {sizes[-1]}, so a dynamic batch dimension "
        f"(2..max(batch_sizes)) would cover that one size: compiled a static graph for it; {fix}"
    )


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
    freezing: Literal["auto", "off", "prepack"] = "auto",
) -> CompiledModel:
    """Compile ``model`` and warm it up at every batch size, so serving never compiles.

    ``example_inputs`` is one request batch (a tensor, a tuple of positional args or a dict of
    keyword args); it is resized along dim 0 to each of ``batch_sizes`` (batch size 1 is always
    added: it always gets its own graph). ``dynamic=None`` compiles one graph with a dynamic batch
    dimension covering 2..max(batch_sizes) (plus one for size 1), as soon as that range holds
    more than one size: ``(1, 8)`` serves every size up to 8; ``dynamic=False`` one graph per
    size, with a per-model recompile limit that fits them all. ``cache`` (default
    ``$FASTINFER_CACHE_DIR``) holds inductor's compile cache; one process compiles into it while
    others wait.
    ``freezing="auto"`` compiles inductor on CPU with freezing (weights as constants: folded,
    laid out once), still FX-graph cacheable; ``"prepack"`` adds oneDNN weight prepacking (not
    cacheable); ``"off"`` is torch.compile's default (see :mod:`._freezing`).

    Raises :class:`CompileError` with the cause and the fix (``fallback="eager"`` instead returns
    the eager model, recorded in ``statistics().fallback`` and logged once),
    :class:`VerificationError` when outputs differ from eager beyond the per-dtype tolerance, and
    :class:`ConfigError` up front for a model whose attention ``swap_attention_`` swapped to a
    path it marks as not worth compiling (``fallback="eager"`` returns the swapped model as it
    is instead).
    """
    if fallback not in ("error", "eager"):
        raise ConfigError(f"fallback must be 'error' or 'eager', got {fallback!r}")
    if on_recompile not in ("error", "eager"):
        raise ConfigError(f"on_recompile must be 'error' or 'eager', got {on_recompile!r}")
    if not callable(model):
        raise ConfigError(f"model must be callable, got {type(model).__name__}")
    if mode is not None and options is not None:
        raise ConfigError("pass either mode or options, not both")
    sizes = check_batch_sizes((1, *batch_sizes))
    refuse_training(model, "compile_model")
    backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
    # A model swap_attention_ marked as not worth compiling: refused before any work.
    refused = swap_refusal(model, f"compiling with {backend_name!r}")
    if refused and fallback == "error":
        raise ConfigError(refused)
    cache = resolve_cache(cache, backend)

    args0, kwargs0 = inputs_for(example_inputs, sizes[-1])
    frozen = freezing_mode(freezing, backend_name, cpu_inputs(args0, kwargs0), options)
    stats = new_stats(backend_name, mode, warmed_batch_sizes=sizes, freezing=frozen)
    batches, expected, opaque = eager_inputs(model, example_inputs, sizes)
    stats["opaque_fused_ops"] = opaque
    if opaque:
        log_once(
            f"opaque:{type(model).__qualname__}",
            logging.WARNING,
            "%s",
            OPAQUE_FIX.format(ops=list(opaque)),
        )

    def give_up(reason: str, exc: BaseException | None) -> CompiledModel:
        if fallback == "error":
            raise CompileError(f"compiling with backend {backend_name!r} failed: {reason}") from exc
        stats["fallback"], stats["freezing"] = reason, "off"
        log_once(
            f"fallback:{backend_name}:{reason[:80]}",
            logging.WARNING,
            "compile_model: backend %r failed, running eager as fallback='eager' asked: %s",
            backend_name,
            reason,
        )
        return CompiledModel(
            model, model, stats=stats, on_recompile=on_recompile, uses_dynamo=False
        )

    if refused:  # fallback="eager": the swapped model runs as it is
        return give_up(refused, None)
    if backend_name in ("inductor",) and cpu_inputs(args0, kwargs0) and compiler_path() is None:
        return give_up(NO_COMPILER, None)

    limit = max(8, len(sizes) + 2)
    torch_compile: Any = torch.compile
    per_model: dict[str, Any] = {}
    if "recompile_limit" in inspect.signature(torch_compile).parameters:  # torch >= 2.12
        per_model = {"recompile_limit": limit, "isolate_recompiles": True}

    def compile_with(dyn: bool) -> Any:
        # dynamic=False, never None: with None, dynamo makes a dimension dynamic on its own
        # ("automatic dynamic") once its per-code-object record saw it change, and that record is
        # shared by every compile of the code (two compile_model calls on one module, even other
        # modules): a static compile could serve unwarmed sizes from a dynamic graph. The batch
        # dimension is marked dynamic explicitly instead (mark_dynamic works with False).
        return torch_compile(
            model, backend=backend, mode=mode, options=options, dynamic=dyn, **per_model
        )

    try:
        compiled = compile_with(bool(dynamic))
    except Exception as exc:  # bad backend name, unsupported Python...
        return give_up(explain(exc), exc)

    # Largest size first, batch dim marked dynamic: one graph covers 2..max; size 1 gets its own
    # (torch specialises a size of 1). A single size above 1 is enough: (1, 8) serves 2..8 too.
    order = sorted(sizes, reverse=True)
    mark = dynamic is None and sizes[-1] > 2
    stats["batch_dim"] = "dynamic" if mark or dynamic else "static"
    if dynamic is None and not mark:
        stats["batch_dim_reason"] = _static_reason(sizes)

    first_graphs: list[int | None] = [None]  # graphs made by the first call (not recompiles)
    batched = batched_keys(example_inputs)  # tensors passed as is (no batch dim) stay static

    def warm_up(fn: Any, mark: bool) -> None:
        for b in order:
            args, kwargs = batches[b]
            if mark and b >= 2:
                for key, t in [*enumerate(args), *kwargs.items()]:
                    if key in batched and isinstance(t, torch.Tensor) and t.dim() > 0:
                        _torch_compat.mark_dynamic(t, 0, min=2, max=max(sizes))
            with torch.inference_mode():
                out = call_repairing(cache, fn, *args, **kwargs)
            if first_graphs[0] is None:
                first_graphs[0] = _torch_compat.dynamo_unique_graphs() - g0
            err = max_error(out, expected[b])
            stats["max_error"] = max(stats["max_error"], err)
            if verify:
                check_close(out, expected[b], rtol=rtol, atol=atol, where=f"batch size {b}")

    ctx = contextlib.ExitStack()
    with _warm_lock, ctx:
        if cache is not None:
            if not cache.active:
                ctx.enter_context(cache)
            ctx.enter_context(cache.exclusive())
        ctx.enter_context(freezing_config(frozen))  # compiling happens lazily, in the warm-up
        g0, c0 = _torch_compat.dynamo_unique_graphs(), cache_counters()
        t0 = time.perf_counter()
        try:
            try:
                with _quiet_guard_errors(mark):
                    warm_up(compiled, mark)
            except VerificationError:
                raise
            except Exception as exc:
                guard = batch_specialisation(exc) if mark else None
                if guard is None:
                    raise
                # The model's code pins the batch size (a branch on it, a kernel chosen by it):
                # one graph per warmed size instead of one dynamic graph.
                stats["batch_dim"] = "static"
                stats["batch_dim_reason"] = (
                    f"the model specialises the batch dimension (dynamo's guard: {guard}), so it "
                    "cannot be one dynamic graph: compiled one graph per warmed batch size"
                )
                log_once(
                    f"static-batch:{type(model).__qualname__}",
                    logging.INFO,
                    "compile_model: %s",
                    stats["batch_dim_reason"],
                )
                first_graphs[0] = None
                batches = {b: inputs_for(example_inputs, b) for b in sizes}  # unmarked tensors
                g0 = _torch_compat.dynamo_unique_graphs()
                compiled = compile_with(False)
                warm_up(compiled, False)
        except VerificationError:
            raise
        except Exception as exc:
            return give_up(explain(exc), exc)
        stats["compile_seconds"] = time.perf_counter() - t0
        stats["graphs"] = _torch_compat.dynamo_unique_graphs() - g0
        stats["recompiles"] = stats["graphs"] - (first_graphs[0] or 0)
        c1 = cache_counters()
        stats["cache_hits"], stats["cache_misses"], stats["cache_bypasses"] = (
            c1[0] - c0[0],
            c1[1] - c0[1],
            c1[2] - c0[2],
        )
    binder = CallBinder(model, *split(example_inputs))
    result = CompiledModel(
        model,
        compiled,
        stats=stats,
        on_recompile="error",
        uses_dynamo=True,
        binder=binder,
    )
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

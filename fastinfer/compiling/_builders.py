"""The registry of candidate builders select_backend draws from.

Each :class:`Builder` says why it cannot run here (``skip``), about how long it takes to build
(``estimate_seconds``, so a budget can refuse a build that would not fit) and builds a callable
(``build``). :data:`BUILDERS` maps a candidate name to its builder; a name it does not know is
tried as a dynamo backend. ONNX Runtime and OpenVINO builders live in :mod:`._runtimes`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfer.compiling._aot import export_aot, load_aot
from fastinfer.compiling._build import BuildContext, Builder
from fastinfer.compiling._cache import InductorCache
from fastinfer.compiling._compile import compile_model
from fastinfer.compiling._manifest import compiler_path
from fastinfer.compiling._runtimes import OnnxRuntimeBuilder, OpenVinoBuilder
from fastinfer.compiling._verify import NO_COMPILER, OPAQUE_FIX, swap_refusal
from fastinfer.errors import CompileError, ConfigError

__all__ = [
    "BUILDERS",
    "BuildContext",
    "Builder",
    "DynamoBuilder",
    "GivenBuilder",
    "build_backend",
    "builder_for",
]


class _Eager(Builder):
    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        return ctx.model, ctx.model


def _compiler_skip(ctx: BuildContext) -> str:
    refused = swap_refusal(ctx.model, "an AOTInductor export")
    if refused:
        return refused
    if not ctx.on_gpu and compiler_path() is None:
        return NO_COMPILER
    if ctx.opaque:
        return OPAQUE_FIX.format(ops=list(ctx.opaque))
    return ""


def _inductor_estimate(ctx: BuildContext) -> float:
    # A cold inductor compile on a 2-core CPU: ~10 s for a toy model, about a minute for
    # BERT-base; warm caches are faster, but a prior cannot know, so it assumes cold.
    return 10.0 + 0.4 * ctx.params_millions


@dataclass(frozen=True)
class DynamoBuilder(Builder):
    """``torch.compile(backend=..., mode=...)`` through :func:`compile_model`."""

    backend: str
    mode: str | None = None
    needs_cxx: bool = False
    needs_cuda_graphs: bool = False
    needs_module: str = ""  # an optional package the backend imports

    def skip(self, ctx: BuildContext) -> str:
        # A model swap_attention_ marked as not worth compiling: no time spent building it.
        refused = swap_refusal(ctx.model, f"compiling with {self.backend!r}")
        if refused:
            return refused
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

    def estimate_seconds(self, ctx: BuildContext) -> float:
        return _inductor_estimate(ctx) if self.backend == "inductor" else 1.0

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

    def estimate_seconds(self, ctx: BuildContext) -> float:
        return 1.5 * _inductor_estimate(ctx)

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
class GivenBuilder(Builder):
    """A ``(name, callable)`` candidate: already built by the caller."""

    fn: Callable[..., Any]

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        return self.fn, self.fn


#: Candidate name -> builder. A name not here is tried as a dynamo backend (``DynamoBuilder``).
BUILDERS: dict[str, Builder] = {
    "eager": _Eager(),
    "inductor": DynamoBuilder("inductor", needs_cxx=True),
    "max-autotune-no-cudagraphs": DynamoBuilder(
        "inductor", "max-autotune-no-cudagraphs", needs_cxx=True
    ),
    "max-autotune": DynamoBuilder("inductor", "max-autotune", needs_cxx=True),
    "reduce-overhead": DynamoBuilder(
        "inductor", "reduce-overhead", needs_cxx=True, needs_cuda_graphs=True
    ),
    "aot": _Aot(),
    "onnxruntime": OnnxRuntimeBuilder(),
    "onnxrt": OnnxRuntimeBuilder(),  # the name torch's removed dynamo backend had
    "openvino": OpenVinoBuilder(),
}


def builder_for(spec: Any) -> Builder:
    if not isinstance(spec, str):
        return GivenBuilder(spec)
    return BUILDERS.get(spec) or DynamoBuilder(spec)


def build_backend(
    name: str,
    model: Callable[..., Any],
    example_inputs: Any,
    *,
    batch_sizes: tuple[int, ...] = (1, 8),
    cache_dir: str | os.PathLike[str] | None = None,
    cache: InductorCache | None = None,
) -> Any:
    """Build the candidate ``name`` (a :data:`BUILDERS` name) for serving, without measuring it:
    the winner of a cached :func:`select_backend` decision, for instance. Runtime artefacts come
    from ``cache_dir`` (default ``$FASTINFER_CACHE_DIR``) when they were exported before.

    Raises :class:`ConfigError` (with the reason) when the candidate cannot run here. A runtime
    (``onnxruntime``, ``openvino``) is called once on the example and compared with eager, as
    :func:`select_backend` verifies it: :class:`CompileError` when it cannot run,
    :class:`VerificationError` when it answers otherwise. It is never handed back unverified.
    """
    from fastinfer import _env
    from fastinfer.compiling._inputs import check_batch_sizes, inputs_for, tensors
    from fastinfer.compiling._verify import opaque_ops

    sizes = check_batch_sizes(batch_sizes)
    root = cache_dir if cache_dir is not None else _env.get("FASTINFER_CACHE_DIR")
    args, kwargs = inputs_for(example_inputs, sizes[-1])
    on_gpu = any(t.is_cuda for t in tensors(args, kwargs))
    reference, opaque = opaque_ops(model, args, kwargs)
    with tempfile.TemporaryDirectory(prefix="fastinfer-build-") as tmp:
        ctx = BuildContext(
            model,
            example_inputs,
            sizes,
            cache,
            Path(tmp),
            on_gpu,
            opaque,
            artifacts=Path(root).expanduser() if root else None,
            reference=reference,
        )
        builder = builder_for(name)
        why = builder.skip(ctx)
        if why:
            raise ConfigError(f"backend {name!r} cannot be built here: {why}")
        fn, obj = builder.build(ctx)
        if isinstance(builder, (OnnxRuntimeBuilder, OpenVinoBuilder)):
            _verify_call(name, model, fn, args, kwargs, reference)
        return obj


def _verify_call(
    name: str,
    model: Callable[..., Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    reference: Any,
) -> None:
    """One call on the example, compared with eager's ``reference`` on valid positions."""
    from fastinfer._common.padding import valid_mask
    from fastinfer.compiling._inputs import batch_of
    from fastinfer.compiling._verify import check_close
    from fastinfer.errors import FastInferError

    try:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
    except FastInferError:
        raise
    except Exception as exc:
        raise CompileError(
            f"backend {name!r} built a model that fails on the example ({type(exc).__name__}: "
            f"{str(exc)[:300]}). Fix: serve the model in float32 with this candidate, or use "
            "eager / another candidate"
        ) from exc
    check_close(
        out,
        reference,
        rtol=None,
        atol=None,
        where=f"backend {name!r} on the example (batch size {batch_of(args, kwargs)})",
        valid=valid_mask(model, args, kwargs),
    )

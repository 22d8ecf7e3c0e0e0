"""Compile a model so that every compilation happens before the first request, and pick a backend.

:func:`compile_model` compiles and immediately warms up at every batch size the service will send
(batch size 1 included), checks the outputs against eager within the shared per-dtype tolerance,
counts graphs and recompilations, then forbids compiling at serve time: ``torch.compile`` is lazy,
so a ``try``/``except`` around it catches nothing and failures would otherwise arrive with the
first request. :func:`select_backend` measures the candidates on the real inputs and caches the
decision on disk. :func:`export_aot` / :func:`load_aot` write and load an AOTInductor package,
which loads with no JIT and no C++ compiler. :class:`InductorCache` makes the compile cache
persistent, environment-checked and shippable.

    >>> compiled = fastinfer.compile_model(model, (x,), batch_sizes=(1, 8, 32))
    >>> compiled(x)                      # never compiles; an unwarmed shape raises RecompileError
    >>> compiled.statistics().graphs

Layout: ``_compile`` (compile_model, CompiledModel), ``_freezing`` (inductor freezing for CPU
inference), ``_aot`` (AOTInductor packages), ``_selector`` (select_backend: budget, timing,
decision cache), ``_report`` (its report), ``_build`` / ``_builders`` (the registry of candidate
builders), ``_runtimes`` / ``_onnx`` / ``_artifacts`` (ONNX Runtime and OpenVINO candidates, the
export and its artefact cache), ``_cache`` (InductorCache), ``_cache_bundle`` (its tar bundles),
``_cache_files`` (its folder on disk: locks, the read-only overlay, repairing corrupt cached
modules), ``_manifest`` (the environment a compiled artifact depends on, from
``fastinfer._common.manifest``, and whether a manifest is well formed), ``_verify`` (numerics and
diagnosis), ``_inputs`` (resizing example inputs to each batch size, normalising serve-time
inputs), ``_guards`` (dynamo's failed guards in words; a batch dimension the model specialises).
"""

from fastinfer.compiling._aot import export_aot, load_aot
from fastinfer.compiling._builders import BUILDERS, build_backend
from fastinfer.compiling._cache import MANIFEST, CacheStatistics, InductorCache
from fastinfer.compiling._compile import CompiledModel, CompileStatistics, compile_model
from fastinfer.compiling._inputs import inputs_for
from fastinfer.compiling._manifest import environment_manifest, manifest_diff
from fastinfer.compiling._report import BackendReport, CandidateResult, pick_winner
from fastinfer.compiling._runtimes import RuntimeModel
from fastinfer.compiling._selector import (
    DEFAULT_BUDGET_SECONDS,
    DEFAULT_CANDIDATES,
    select_backend,
)
from fastinfer.compiling._verify import max_error

__all__ = [
    "BUILDERS",
    "DEFAULT_BUDGET_SECONDS",
    "DEFAULT_CANDIDATES",
    "MANIFEST",
    "BackendReport",
    "CacheStatistics",
    "CandidateResult",
    "CompileStatistics",
    "CompiledModel",
    "InductorCache",
    "RuntimeModel",
    "build_backend",
    "compile_model",
    "environment_manifest",
    "export_aot",
    "inputs_for",
    "load_aot",
    "manifest_diff",
    "max_error",
    "pick_winner",
    "select_backend",
]

"""AOTInductor packages: export once (with a C++ compiler), load anywhere matching (without one)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfer import _torch_compat
from fastinfer._common.files import atomic_path, writable_target
from fastinfer.compiling._cache import InductorCache
from fastinfer.compiling._compile import CompiledModel, new_stats, resolve_cache
from fastinfer.compiling._inputs import (
    Inputs,
    batched_keys,
    check_batch_sizes,
    cpu_inputs,
    inputs_for,
)
from fastinfer.compiling._manifest import compiler_path, environment_manifest, manifest_diff
from fastinfer.compiling._verify import NO_COMPILER, check_close, explain, swap_refusal
from fastinfer.errors import CacheMismatchError, CompileError, ConfigError

__all__ = ["export_aot", "load_aot"]

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
    """Write an AOTInductor ``.pt2`` package with a dynamic batch dimension (dim 0 of each batched
    tensor: one whose leading dimension is the example's batch size).

    The batch dimension ranges over ``min(batch_sizes)..max(batch_sizes)``; every size in
    ``batch_sizes`` is checked against eager before the package is renamed into place. The package
    records the environment it was built for (torch, CPU ISA, GPU) and :func:`load_aot` checks it.
    The compile runs inside ``cache`` (default ``$FASTINFER_CACHE_DIR`` when set). Raises
    :class:`ConfigError` when ``path`` is a folder or cannot be written (checked before
    compiling), :class:`CompileError` (no C++ compiler, export failure) or
    :class:`VerificationError`.
    """
    sizes = check_batch_sizes(batch_sizes)
    if not isinstance(model, nn.Module):
        raise ConfigError("export_aot needs an nn.Module (torch.export exports modules)")
    if model.training:
        raise ConfigError("model is in training mode: call model.eval() before export_aot")
    refused = swap_refusal(model, "an AOTInductor export")
    if refused:
        raise ConfigError(refused)
    out = writable_target(path, what="AOT package", example="model.pt2")  # before compiling
    args, kwargs = inputs_for(example_inputs, max(sizes))
    if cpu_inputs(args, kwargs) and compiler_path() is None:
        raise CompileError(f"export_aot failed: {NO_COMPILER}")
    from torch import (
        _inductor,  # aoti_compile_and_package is public API; the module is slow to import
    )
    from torch import export as torch_export

    batched = batched_keys(example_inputs)  # a (1, D) input beside (B, D) ones keeps its size

    def spec(key: int | str, value: Any, dim: Any) -> Any:
        return {0: dim} if key in batched and isinstance(value, torch.Tensor) else None

    dim: Any = None
    if len(sizes) > 1:
        dim = torch_export.Dim("batch", min=min(sizes), max=max(sizes))
    dynamic_shapes: Any = None
    if dim is not None:
        dynamic_shapes = (
            {k: spec(k, v, dim) for k, v in kwargs.items()}
            if not args
            else tuple(spec(i, a, dim) for i, a in enumerate(args))
        )
        if args and kwargs:
            dynamic_shapes = {
                **dict(zip(_positional_names(model, len(args)), dynamic_shapes)),
                **{k: spec(k, v, dim) for k, v in kwargs.items()},
            }
    cache = resolve_cache(cache, "inductor")
    with atomic_path(out, suffix=".pt2") as tmp_path:
        tmp = str(tmp_path)
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
            raise CompileError(f"export_aot failed: {explain(exc)}") from exc
        try:
            with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_STORED) as zf:
                root = zf.namelist()[0].split("/")[0]
                zf.writestr(f"{root}/{_AOT_MANIFEST}", json.dumps(environment_manifest()))
        except OSError as exc:  # a full disk: the package is left unpublished
            raise CompileError(
                f"export_aot could not write {out} ({exc.strerror or exc}); free space in "
                f"{out.parent} or pass another path"
            ) from exc
        if verify:
            loaded = load_aot(tmp)
            for b in sizes:
                a, k = inputs_for(example_inputs, b)
                with torch.inference_mode():
                    expected = model(*a, **k)
                check_close(loaded(*a, **k), expected, rtol=rtol, atol=atol, where=f"AOT batch {b}")
    return out


def _package_manifest(p: Path, raw: bytes | None) -> dict[str, Any]:
    """The environment manifest export_aot put in package ``p``; :class:`CacheMismatchError`
    when there is none usable (missing, ``null``, not JSON, not an object): without it the
    package cannot be checked against this machine, and a wrong CPU ISA gives wrong outputs."""
    problem = "has none" if raw is None else ""
    built: Any = None
    if raw is not None:
        try:
            built = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            problem = f"is not valid JSON ({type(exc).__name__})"
        else:
            if not isinstance(built, dict):
                problem = (
                    f"holds {'null' if built is None else type(built).__name__}, not an object"
                )
    if problem:
        raise CacheMismatchError(
            f"AOT package {p} has no usable fastinfer manifest ({_AOT_MANIFEST} {problem}), so "
            "the environment it was built for (torch, CPU ISA, GPU) cannot be checked: it was "
            "written by another tool or an older fastinfer, or damaged. Fix: re-export it with "
            "this fastinfer (fastinfer.export_aot or `fastinfer warm --aot`), or pass "
            "check_environment=False to load it unchecked"
        )
    return dict(built)


def _positional_names(model: nn.Module, n: int) -> list[str]:
    params = list(inspect.signature(model.forward).parameters)
    return params[:n]


def load_aot(path: str | os.PathLike[str], *, check_environment: bool = True) -> CompiledModel:
    """Load an AOTInductor package written by :func:`export_aot`: no JIT, no C++ compiler needed.

    Raises :class:`~fastinfer.CacheMismatchError` when the package was built for another
    environment (torch version, CPU ISA, GPU) or carries no usable manifest (unless
    ``check_environment=False``), :class:`ConfigError` when ``path`` is missing or a folder,
    and :class:`CompileError` when the file is not a package.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(
            f"AOT package {p} is a folder, not a .pt2 file; pass the file fastinfer.export_aot "
            "wrote (e.g. model.pt2)"
        )
    if not p.is_file():
        raise ConfigError(f"AOT package {p} does not exist; build one with fastinfer.export_aot")
    raw: bytes | None = None
    try:
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                if name.endswith(_AOT_MANIFEST):
                    raw = zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CompileError(f"{p} is not an AOTInductor .pt2 package ({exc})") from exc
    if check_environment:
        built = _package_manifest(p, raw)
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
        runner = _torch_compat.aoti_load_package_runner(str(p))
    except Exception as exc:
        raise CompileError(f"loading AOT package {p} failed: {explain(exc)}") from exc
    stats = new_stats("aot", None, compile_seconds=time.perf_counter() - t0)
    return CompiledModel(runner, runner, stats=stats, on_recompile="error", uses_dynamo=False)

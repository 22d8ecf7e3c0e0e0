"""load_model and load_pretrained: construct on meta, then load through the zero-copy path."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fastinfer._optional import require
from fastinfer.errors import CheckpointError, ConfigError, LoadError
from fastinfer.loading import _formats as fmt
from fastinfer.loading._empty_init import empty_init
from fastinfer.loading._hf import hf_remap, recompute_buffers_
from fastinfer.loading._load import load_weights, validate_options
from fastinfer.loading._report import LoadReport

__all__ = ["load_model", "load_pretrained"]

logger = logging.getLogger("fastinfer.loading")

M = TypeVar("M", bound=nn.Module)

# torch's default dtype is process-wide: two load_pretrained calls building at once take turns.
_default_dtype_lock = threading.Lock()
_DEFAULT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# torch's errors for reading a tensor that has no data ("Tensor.item() cannot be called on meta
# tensors", "Cannot copy out of meta tensor; no data!", "... on the meta device")
_META_ERROR = re.compile(r"\bmeta tensors?\b|\bmeta device\b|'Meta' backend")


def load_model(
    factory_or_class: Callable[..., M],
    checkpoint: str | os.PathLike[str],
    *args: Any,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mmap: bool = True,
    strip_prefix: str | Sequence[str] | None = None,
    trust_pickle: bool = False,
    progress: bool | None = None,
    touch: bool = True,
    on_report: Callable[[LoadReport], None] | None = None,
    **kwargs: Any,
) -> M:
    """Build ``factory_or_class(*args, **kwargs)`` under :func:`empty_init`, load, return it in eval.

    The :class:`LoadReport` goes to ``on_report`` when given (and is logged at DEBUG).

        model = fastinfer.load_model(RotaryMLP, "ckpt.pt", width=4096, layers=24)
    """
    if not callable(factory_or_class):
        raise ConfigError(f"factory_or_class must be callable, got {factory_or_class!r}")
    validate_options(dtype, device)  # before building: a bad option wastes no construction
    mem0 = fmt.memory()["anonymous"]
    t0 = time.perf_counter()
    try:
        with empty_init():
            model = factory_or_class(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as exc:
        if not _META_ERROR.search(str(exc)):
            raise  # the model's own error, not the empty construction's
        name = getattr(factory_or_class, "__qualname__", repr(factory_or_class))
        raise LoadError(
            f"{name}(...) failed when built under fastinfer.empty_init(), where parameters have "
            f"no data yet (meta device): {type(exc).__name__}: {exc}. Its __init__ reads a "
            "parameter's values (.item(), float(), a tensor computed from a weight). Fix: build "
            "the model normally and load with fastinfer.load_weights_(model, checkpoint), or "
            "compute that value after loading (in forward, or a method you call after)"
        ) from exc
    construct_seconds = time.perf_counter() - t0
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory_or_class returned a {type(model).__name__}, not an nn.Module")
    report = load_weights(
        model,
        checkpoint,
        strict=strict,
        dtype=dtype,
        device=device,
        mmap=mmap,
        strip_prefix=strip_prefix,
        trust_pickle=trust_pickle,
        progress=progress,
        touch=touch,
        construct_seconds=construct_seconds,
        memory_before=mem0,
    )
    logger.debug("%s", report)
    if on_report is not None:
        on_report(report)
    return model.eval()


def _record_dtype(config: Any, dtype: torch.dtype) -> None:
    config.dtype = dtype
    for name in getattr(config, "sub_configs", None) or ():
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "dtype"):
            sub.dtype = dtype


def _architecture(transformers: Any, config: Any, name: str) -> Any:
    """The class ``config.architectures`` names: exported by transformers, or only defined in its
    model's module (``WhisperEncoder``, saved from ``WhisperModel().encoder``)."""
    cls = getattr(transformers, name, None)
    if cls is not None:
        return cls
    model_type = str(getattr(config, "model_type", "") or "").replace("-", "_")
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None
    return getattr(module, name, None)


def _read_config(transformers: Any, folder: Path, config_kwargs: dict[str, Any]) -> Any:
    """``AutoConfig.from_pretrained(folder)``, with a damaged ``config.json`` (empty, not JSON,
    not an object, an unknown ``model_type`` or dtype) a :class:`CheckpointError` that names the
    file, what is wrong and the fix, instead of the raw ``OSError`` / ``TypeError`` /
    ``ValueError`` / ``AttributeError`` transformers raises."""
    path = folder / "config.json"
    fix = "fix: re-save the model with save_pretrained, or repair the file"

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"config file {str(path)!r} {problem}; {fix}")

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise bad(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise bad("is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(
            f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise bad("is not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
        raise bad(f"holds JSON {kind.get(type(doc), 'null')}, not an object of config fields")
    for key in ("dtype", "torch_dtype"):
        value = config_kwargs.get(key, doc.get(key))
        if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
            raise bad(
                f"records {key}={value!r}, which is not a torch dtype (expected a name such as "
                "'float32', 'float16' or 'bfloat16')"
            )
    try:
        return transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, **config_kwargs
        )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        given = f" (with the keyword arguments {sorted(config_kwargs)})" if config_kwargs else ""
        if "model_type" in first or "model type" in first:
            problem = (
                f"does not give a model_type transformers {transformers.__version__} knows "
                f"({type(exc).__name__}: {first})"
            )
            fix_hint = (
                "; fix: set 'model_type' to the model's type (as save_pretrained writes it), or "
                "upgrade transformers if the model is newer than it"
            )
        else:
            problem = f"does not make a transformers config{given} ({type(exc).__name__}: {first})"
            fix_hint = f"; {fix}"
        raise CheckpointError(f"config file {str(path)!r} {problem}{fix_hint}") from exc


@contextmanager
def _built_in(dtype: torch.dtype | None) -> Iterator[None]:
    """Build with torch's default dtype set to ``dtype``, as ``from_pretrained`` builds a model:
    tensors a module creates in the default dtype (the sinusoidal position tables of XGLM and
    M2M100, GPT's causal-mask ``bias``) are made in the model's dtype, while those it computes in
    float32 on purpose (rotary ``inv_freq``) stay float32. Restored in ``finally``."""
    if dtype not in _DEFAULT_DTYPES or dtype == torch.get_default_dtype():
        yield
        return
    with _default_dtype_lock:
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(before)


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    model_class: Any = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mmap: bool = True,
    trust_pickle: bool = False,
    progress: bool | None = None,
    touch: bool = True,
    on_report: Callable[[LoadReport], None] | None = None,
    **config_kwargs: Any,
) -> Any:
    """Load a Hugging Face ``transformers`` model saved with ``save_pretrained`` from a local folder.

    The class comes from ``config.architectures`` unless ``model_class`` is given (a model class,
    an ``Auto*`` class, or one part of the saved model such as ``WhisperEncoder`` from a
    ``WhisperModel`` folder: its weights are taken from that part of the checkpoint). It is built
    under :func:`empty_init` and loaded by the same zero-copy path as :func:`load_weights_`, with
    the key conversions ``from_pretrained`` applies (transformers' own conversion mapping: renamed
    keys, fused experts, weight-norm parametrizations); only converted weights are copied.
    ``dtype=None`` uses the ``dtype`` recorded in ``config.json``; the model is built in that dtype
    as ``from_pretrained`` builds it (computed buffers such as sinusoidal position tables follow
    it, rotary ``inv_freq`` stays float32). Weights the model class declares it does not save and
    computes in ``_init_weights`` (Marian's sinusoidal position embeddings) are computed as
    ``from_pretrained`` computes them; any other missing weight is reported, never initialised
    at random.

        model = fastinfer.load_pretrained("./my-bert")
    """
    validate_options(dtype, device)
    transformers = require("transformers", purpose="fastinfer.load_pretrained")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not a save_pretrained folder (no config.json); "
            "for a bare checkpoint use fastinfer.load_model"
        )
    mem0 = fmt.memory()["anonymous"]
    t0 = time.perf_counter()
    config = _read_config(transformers, folder, config_kwargs)
    archs = getattr(config, "architectures", None) or []
    saved_cls = _architecture(transformers, config, archs[0]) if archs else None
    cls = model_class if model_class is not None else saved_cls
    if cls is None:
        cls = transformers.AutoModel
    if dtype is None:
        recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(recorded, str):
            recorded = getattr(torch, recorded, None)
        dtype = recorded if isinstance(recorded, torch.dtype) else None
    elif dtype in _DEFAULT_DTYPES:
        _record_dtype(config, dtype)  # as from_pretrained(dtype=...): Auto* builds in it too
    with _built_in(dtype), empty_init():  # Auto* classes build through from_config
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    if dtype in _DEFAULT_DTYPES and dtype != torch.get_default_dtype():
        recompute_buffers_(model)  # as from_pretrained: values from _init_weights
    construct_seconds = time.perf_counter() - t0

    def build_saved() -> Any:
        """The class the folder was saved from, built on meta: what it ties and regenerates."""
        if saved_cls is None or type(model) is saved_cls:
            return None
        try:
            with _built_in(dtype), empty_init():
                return saved_cls(copy.deepcopy(config))
        except Exception as exc:  # a class that cannot be built from this config: no part info
            logger.debug("could not build %s to read its ties: %s", saved_cls.__name__, exc)
            return None

    extra: list[str] = []
    base = getattr(model, "base_model_prefix", "")
    if base and not hasattr(model, base):
        extra.append(f"{base}.")  # a base model loaded from a head model's checkpoint
    keep: set[str] = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    report = load_weights(
        model,
        folder,
        strict=strict,
        dtype=dtype,
        device=device,
        mmap=mmap,
        strip_prefix=None,
        trust_pickle=trust_pickle,
        progress=progress,
        touch=touch,
        construct_seconds=construct_seconds,
        memory_before=mem0,
        extra_prefixes=extra,
        # Every tensor takes the dtype it was built in (see _built_in), as from_pretrained loads:
        # RoPE inv_freq, DeBERTa's q_bias (made in float32 on purpose) stay float32.
        cast_unsaved_buffers=False,
        keep_fp32=sorted(keep),
        dtype_as_built=dtype in _DEFAULT_DTYPES,
        remap=hf_remap(model, saved=build_saved),
    )
    gen = folder / "generation_config.json"
    if gen.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    logger.debug("%s", report)
    if on_report is not None:
        on_report(report)
    return model.eval()

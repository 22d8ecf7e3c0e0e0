"""fastinfer: inference-acceleration primitives for PyTorch, as plain Python objects.

Importing this package is cheap and has no side effects: it imports no optional dependency,
changes no torch setting and configures no logging.

The primitives load on first use (PEP 562): ``import fastinfer`` costs only its error classes, and
``fastinfer.DynamicBatcher`` imports the batching package and nothing else.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from fastinfer.errors import (
    AttentionSwapError,
    BatchError,
    CacheLockTimeout,
    CacheMismatchError,
    CardinalityError,
    CheckpointError,
    ClientDisconnected,
    ClosedError,
    CompileError,
    ConfigError,
    DeadlineExceeded,
    FastInferError,
    InvalidInput,
    LoadError,
    MetricNameError,
    MissingDependencyError,
    NotReady,
    QueueFull,
    RecompileError,
    StateDictMismatch,
    UnsafeCheckpointError,
    VerificationError,
    WorkerCrashed,
    WorkerError,
    WorkerStartupError,
    WorkerTimeout,
    WouldBlockError,
)

if _TYPE_CHECKING:
    from fastinfer.attention import (
        AttentionReport,
        register_attention_swap,
        swap_attention_,
        undo_attention_swap_,
    )
    from fastinfer.batching import (
        BatcherConfig,
        BatcherStatistics,
        DynamicBatcher,
        batch,
    )
    from fastinfer.compiling import (
        BackendReport,
        CacheStatistics,
        CompiledModel,
        CompileStatistics,
        InductorCache,
        compile_model,
        export_aot,
        load_aot,
        select_backend,
    )
    from fastinfer.loading import (
        LoadReport,
        empty_init,
        load_model,
        load_pretrained,
        load_weights_,
        save_weights,
    )
    from fastinfer.metrics import (
        MetricsRecorder,
        MetricsSnapshot,
        RecorderStatistics,
    )
    from fastinfer.pool import (
        CorePlan,
        PinnedPool,
        PoolStatistics,
        configure_threads,
    )
    from fastinfer.profiling import (
        profile,
    )

# Public name -> the subpackage that defines it; resolved on first access by __getattr__ below.
_LAZY: dict[str, str] = {
    "AttentionReport": "fastinfer.attention",
    "BackendReport": "fastinfer.compiling",
    "BatcherConfig": "fastinfer.batching",
    "BatcherStatistics": "fastinfer.batching",
    "CacheStatistics": "fastinfer.compiling",
    "CompileStatistics": "fastinfer.compiling",
    "CompiledModel": "fastinfer.compiling",
    "CorePlan": "fastinfer.pool",
    "DynamicBatcher": "fastinfer.batching",
    "InductorCache": "fastinfer.compiling",
    "LoadReport": "fastinfer.loading",
    "MetricsRecorder": "fastinfer.metrics",
    "MetricsSnapshot": "fastinfer.metrics",
    "PinnedPool": "fastinfer.pool",
    "PoolStatistics": "fastinfer.pool",
    "RecorderStatistics": "fastinfer.metrics",
    "batch": "fastinfer.batching",
    "compile_model": "fastinfer.compiling",
    "configure_threads": "fastinfer.pool",
    "empty_init": "fastinfer.loading",
    "export_aot": "fastinfer.compiling",
    "load_aot": "fastinfer.compiling",
    "load_model": "fastinfer.loading",
    "load_pretrained": "fastinfer.loading",
    "load_weights_": "fastinfer.loading",
    "profile": "fastinfer.profiling",
    "register_attention_swap": "fastinfer.attention",
    "save_weights": "fastinfer.loading",
    "select_backend": "fastinfer.compiling",
    "swap_attention_": "fastinfer.attention",
    "undo_attention_swap_": "fastinfer.attention",
}

__version__ = "0.1.0"

__all__ = [
    "AttentionReport",
    "AttentionSwapError",
    "BackendReport",
    "BatchError",
    "BatcherConfig",
    "BatcherStatistics",
    "CacheLockTimeout",
    "CacheMismatchError",
    "CacheStatistics",
    "CardinalityError",
    "CheckpointError",
    "ClientDisconnected",
    "ClosedError",
    "CompileError",
    "CompileStatistics",
    "CompiledModel",
    "ConfigError",
    "CorePlan",
    "DeadlineExceeded",
    "DynamicBatcher",
    "FastInferError",
    "InductorCache",
    "InvalidInput",
    "LoadError",
    "LoadReport",
    "MetricNameError",
    "MetricsRecorder",
    "MetricsSnapshot",
    "MissingDependencyError",
    "NotReady",
    "PinnedPool",
    "PoolStatistics",
    "QueueFull",
    "RecompileError",
    "RecorderStatistics",
    "StateDictMismatch",
    "UnsafeCheckpointError",
    "VerificationError",
    "WorkerCrashed",
    "WorkerError",
    "WorkerStartupError",
    "WorkerTimeout",
    "WouldBlockError",
    "__version__",
    "batch",
    "compile_model",
    "configure_threads",
    "empty_init",
    "export_aot",
    "load_aot",
    "load_model",
    "load_pretrained",
    "load_weights_",
    "profile",
    "register_attention_swap",
    "save_weights",
    "select_backend",
    "swap_attention_",
    "undo_attention_swap_",
]


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastinfer' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""fastinfer: inference-acceleration primitives for PyTorch, as plain Python objects.

Importing this package is cheap and has no side effects: it imports no optional dependency,
changes no torch setting and configures no logging.
"""

from fastinfer.errors import (
    AttentionSwapError,
    BatchError,
    CacheMismatchError,
    CardinalityError,
    CheckpointError,
    ClosedError,
    CompileError,
    ConfigError,
    DeadlineExceeded,
    FastInferError,
    LoadError,
    MetricNameError,
    MissingDependencyError,
    QueueFull,
    RecompileError,
    StateDictMismatch,
    UnsafeCheckpointError,
    VerificationError,
    WorkerCrashed,
    WorkerError,
    WorkerStartupError,
    WorkerTimeout,
)
from fastinfer.loading import (
    LoadReport,
    empty_init,
    load_model,
    load_pretrained,
    load_weights_,
    save_weights,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionSwapError",
    "BatchError",
    "CacheMismatchError",
    "CardinalityError",
    "CheckpointError",
    "ClosedError",
    "CompileError",
    "ConfigError",
    "DeadlineExceeded",
    "FastInferError",
    "LoadError",
    "LoadReport",
    "MetricNameError",
    "MissingDependencyError",
    "QueueFull",
    "RecompileError",
    "StateDictMismatch",
    "UnsafeCheckpointError",
    "VerificationError",
    "WorkerCrashed",
    "WorkerError",
    "WorkerStartupError",
    "WorkerTimeout",
    "__version__",
    "empty_init",
    "load_model",
    "load_pretrained",
    "load_weights_",
    "save_weights",
]

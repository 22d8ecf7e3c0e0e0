"""fastinfer: inference-acceleration primitives for PyTorch, as plain Python objects.

Importing this package is cheap and has no side effects: it imports no optional dependency,
changes no torch setting and configures no logging.
"""

from fastinfer.attention import (
    AttentionReport,
    register_attention_swap,
    swap_attention_,
    undo_attention_swap_,
)
from fastinfer.batching import (
    DynamicBatcher,
    batch,
)
from fastinfer.compiling import (
    BackendReport,
    CompiledModel,
    compile_model,
    export_aot,
    load_aot,
    select_backend,
)
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
    InvalidInput,
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
from fastinfer.inductor_cache import (
    InductorCache,
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
)
from fastinfer.pool import (
    CorePlan,
    PinnedPool,
    configure_threads,
)
from fastinfer.profiling import (
    profile,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionReport",
    "AttentionSwapError",
    "BackendReport",
    "BatchError",
    "CacheMismatchError",
    "CardinalityError",
    "CheckpointError",
    "ClosedError",
    "CompileError",
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
    "PinnedPool",
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

"""The public API is curated: this list changes only on purpose."""

import fastinfer

EXPECTED = [
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


def test_all_is_the_curated_list() -> None:
    assert fastinfer.__all__ == EXPECTED


def test_all_is_sorted() -> None:
    assert fastinfer.__all__ == sorted(fastinfer.__all__)


def test_every_public_name_resolves() -> None:
    for name in fastinfer.__all__:
        assert getattr(fastinfer, name) is not None, name


def test_nothing_public_is_left_out() -> None:
    public = {n for n in vars(fastinfer) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(fastinfer, n)).__name__ == "module"}
    assert public - modules - set(fastinfer.__all__) == set()

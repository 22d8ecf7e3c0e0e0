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


def test_lazy_names_match_what_type_checkers_see() -> None:
    # Names load on first use (fastinfer.__getattr__); the TYPE_CHECKING imports are what IDEs and
    # mypy read. Both must list the same names from the same subpackages.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(fastinfer))
    guarded = next(
        n for n in tree.body if isinstance(n, ast.If) and "_TYPE_CHECKING" in ast.unparse(n.test)
    )
    seen = {
        alias.name: node.module
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == fastinfer._LAZY
    assert set(fastinfer._LAZY) <= set(fastinfer.__all__)


def test_import_fastinfer_loads_no_primitive_until_used() -> None:
    from conftest import run_python

    out = run_python(
        "import sys, fastinfer; print(sorted(m for m in sys.modules if m.startswith('fastinfer.')))"
    ).stdout
    assert out.strip() == "['fastinfer.errors']"
    out = run_python(
        "import sys, fastinfer; fastinfer.DynamicBatcher; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('fastinfer.')}))"
    ).stdout
    assert "attention" not in out and "compiling" not in out and "batching" in out, out

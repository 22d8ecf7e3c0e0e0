import inspect

import pytest

import fastinfer
from fastinfer import errors

ALL_ERRORS = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, Exception) and obj.__module__ == errors.__name__
]


def test_every_error_is_exported_and_rooted() -> None:
    assert sorted(e.__name__ for e in ALL_ERRORS) == sorted(errors.__all__)
    for exc in ALL_ERRORS:
        assert issubclass(exc, fastinfer.FastInferError), exc
        assert getattr(fastinfer, exc.__name__) is exc


@pytest.mark.parametrize(
    ("exc", "builtin"),
    [
        (errors.ConfigError, ValueError),
        (errors.MetricNameError, ValueError),
        (errors.InvalidInput, ValueError),
        (errors.MissingDependencyError, ImportError),
        (errors.ClosedError, RuntimeError),
        (errors.QueueFull, RuntimeError),
        (errors.DeadlineExceeded, TimeoutError),
        (errors.BatchError, RuntimeError),
        (errors.CardinalityError, ValueError),
        (errors.LoadError, RuntimeError),
        (errors.CheckpointError, ValueError),
        (errors.StateDictMismatch, KeyError),
        (errors.UnsafeCheckpointError, RuntimeError),
        (errors.CompileError, RuntimeError),
        (errors.RecompileError, RuntimeError),
        (errors.CacheMismatchError, RuntimeError),
        (errors.VerificationError, AssertionError),
        (errors.AttentionSwapError, RuntimeError),
        (errors.WorkerCrashed, RuntimeError),
        (errors.WorkerStartupError, RuntimeError),
        (errors.WorkerTimeout, TimeoutError),
    ],
    ids=lambda x: x.__name__,
)
def test_errors_also_inherit_their_builtin(exc: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(exc, builtin)
    with pytest.raises(builtin):
        raise exc("boom")
    with pytest.raises(fastinfer.FastInferError):
        raise exc("boom")


def test_tree_in_docstring_names_every_error() -> None:
    doc = errors.__doc__ or ""
    for exc in ALL_ERRORS:
        assert exc.__name__ in doc, f"{exc.__name__} is missing from the tree drawn in errors.py"


def test_state_dict_mismatch_message_is_readable() -> None:
    # KeyError normally repr()s its argument; the message must read as written.
    assert str(errors.StateDictMismatch("missing keys: a, b")) == "missing keys: a, b"


def test_queue_full_carries_retry_after() -> None:
    assert errors.QueueFull("full", retry_after=0.5).retry_after == 0.5


def test_missing_dependency_names_the_extra() -> None:
    from fastinfer._optional import require

    with pytest.raises(errors.MissingDependencyError, match=r"pip install"):
        require("fastinfer_no_such_module_xyz")

"""The fastinfer exception tree.

Every error fastinfer raises on purpose derives from :class:`FastInferError`. Each subclass also
inherits the builtin it behaves like, so ``except ValueError`` and ``except fastinfer.ConfigError``
both work. Messages say what failed, name the offending items and say the fix.

::

    FastInferError
    ├── ConfigError (ValueError)                  bad argument or config value
    │   └── MetricNameError                       name/label breaks Prometheus rules
    ├── InvalidInput (ValueError)                 a request's input is malformed (HTTP 422)
    ├── MissingDependencyError (ImportError)      an optional extra is not installed
    ├── ClosedError (RuntimeError)                the object was closed (or not started)
    ├── NotReady (RuntimeError)                   a service has not finished its setup (HTTP 503)
    ├── ClientDisconnected (ConnectionError)      the HTTP client left; its work was cancelled
    ├── WouldBlockError (RuntimeError)            a blocking call on a loop thread would deadlock
    ├── QueueFull (RuntimeError)                  backpressure: a queue limit was hit
    ├── DeadlineExceeded (TimeoutError)           a request timed out before it got a result
    ├── BatchError (RuntimeError)                 a batch function broke its contract
    ├── CardinalityError (ValueError)             too many label sets on one metric
    ├── LoadError (RuntimeError)                  loading weights failed
    │   ├── CheckpointError (ValueError)          unreadable, truncated or corrupt checkpoint
    │   ├── StateDictMismatch (KeyError)          missing/unexpected keys, shape/dtype mismatch
    │   └── UnsafeCheckpointError                 a pickle needs trust_pickle=True
    ├── CompileError (RuntimeError)               compiling or warming up a model failed
    │   └── RecompileError                        a compile was attempted at serve time
    ├── CacheMismatchError (RuntimeError)         a compile cache was built for another machine
    ├── CacheLockTimeout (TimeoutError)           waited too long for another process's compile
    ├── VerificationError (AssertionError)        outputs differ from eager beyond tolerance
    ├── AttentionSwapError (RuntimeError)         an attention path cannot be applied
    └── WorkerError (RuntimeError)                process-pool failures
        ├── WorkerCrashed                         a worker died while holding calls
        ├── WorkerStartupError                    a worker's init() raised
        └── WorkerTimeout (TimeoutError)          a call outlived its timeout

:class:`BatchError` carries the items it refers to in the message, never their data.
"""

from __future__ import annotations

__all__ = [
    "AttentionSwapError",
    "BatchError",
    "CacheLockTimeout",
    "CacheMismatchError",
    "CardinalityError",
    "CheckpointError",
    "ClientDisconnected",
    "ClosedError",
    "CompileError",
    "ConfigError",
    "DeadlineExceeded",
    "FastInferError",
    "InvalidInput",
    "LoadError",
    "MetricNameError",
    "MissingDependencyError",
    "NotReady",
    "QueueFull",
    "RecompileError",
    "StateDictMismatch",
    "UnsafeCheckpointError",
    "VerificationError",
    "WorkerCrashed",
    "WorkerError",
    "WorkerStartupError",
    "WorkerTimeout",
    "WouldBlockError",
]


class FastInferError(Exception):
    """Root of every error fastinfer raises on purpose."""


class ConfigError(FastInferError, ValueError):
    """An argument or config value is invalid. The message names it and the accepted values."""


class MetricNameError(ConfigError):
    """A metric or label name breaks the Prometheus naming rules."""


class InvalidInput(FastInferError, ValueError):
    """A request's input is malformed (wrong shape, type, length); HTTP services answer 422."""


class MissingDependencyError(FastInferError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class ClosedError(FastInferError, RuntimeError):
    """The object was used after ``close()`` (or before it was started)."""


class NotReady(FastInferError, RuntimeError):
    """A service has not finished its setup (load, compile, warm-up) yet: HTTP 503."""


class ClientDisconnected(FastInferError, ConnectionError):
    """The HTTP client left before its result was ready; its queued work was cancelled."""


class WouldBlockError(FastInferError, RuntimeError):
    """A blocking call was made where it would wait for itself (a deadlock): on the thread that runs
    the event loop it would wait for, inside the batched ``fn`` it would wait to finish (``close``),
    or on a :class:`~fastinfer.PinnedPool`'s own thread (a done-callback waiting on a call)."""


class QueueFull(FastInferError, RuntimeError):
    """A bounded queue is full; retry later (HTTP services map this to 503 with Retry-After)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(FastInferError, TimeoutError):
    """A request's deadline passed before its result was ready (HTTP services map this to 504)."""


class BatchError(FastInferError, RuntimeError):
    """A batch function broke its contract (for example it returned the wrong number of results)."""


class CardinalityError(FastInferError, ValueError):
    """A metric has reached its limit of distinct label sets."""


class LoadError(FastInferError, RuntimeError):
    """Loading a model or its weights failed."""


class CheckpointError(LoadError, ValueError):
    """A checkpoint file is unreadable, truncated, corrupt or of an unknown format."""


class StateDictMismatch(LoadError, KeyError):
    """Checkpoint keys, shapes or dtypes do not match the model."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class UnsafeCheckpointError(LoadError):
    """A checkpoint needs a full unpickle, which runs code; pass ``trust_pickle=True`` to allow it."""


class CompileError(FastInferError, RuntimeError):
    """Compiling or warming up a model failed; the message gives the cause and the fix."""


class RecompileError(CompileError):
    """A compilation was attempted at serve time, after warm-up forbade it."""


class CacheMismatchError(FastInferError, RuntimeError):
    """A compile cache or bundle was built for another environment (torch, ISA, threads, GPU...)."""


class CacheLockTimeout(FastInferError, TimeoutError):
    """Waiting for another process to finish compiling into a cache took longer than allowed."""


class VerificationError(FastInferError, AssertionError):
    """An optimised model's outputs differ from the eager model's beyond the tolerance."""


class AttentionSwapError(FastInferError, RuntimeError):
    """An attention path could not be applied to a model."""


class WorkerError(FastInferError, RuntimeError):
    """A process-pool worker failed."""


class WorkerCrashed(WorkerError):
    """A worker process died while it held calls (segfault, ``os._exit``, OOM kill)."""


class WorkerStartupError(WorkerError):
    """A worker's ``init()`` raised; the message carries the worker's traceback."""


class WorkerTimeout(WorkerError, TimeoutError):
    """A call ran past its timeout; its worker was replaced."""

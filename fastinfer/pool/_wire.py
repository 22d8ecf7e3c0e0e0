"""What travels between a PinnedPool and its workers, and the state a worker holds (a leaf).

Both sides import this module: the pool to encode calls, the worker process (after it has pinned
itself and imported torch) to encode results and to publish the state its ``init()`` returned.
Tensors above :data:`SMALL_TENSOR_BYTES` travel through shared memory (torch's own reduction),
smaller CPU tensors inline as bytes. Either way a tensor travels *by value*: the receiver gets its
own copy, never the sender's memory. A large CPU tensor is copied (one memcpy, on the sending side)
into a fresh shared-memory segment that only the message holds, not moved there as torch's
reduction alone would do (``share_memory_()`` swaps the sender's own storage into the segment, so a
worker changing its input in place would change the caller's tensor, and an idempotent retry would
run on the changed input). Imports only the standard library at module level.
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = [
    "SMALL_TENSOR_BYTES",
    "RemoteTraceback",
    "make_dumps",
    "rebuild_small_tensor",
    "remote_error",
    "set_worker_state",
    "worker_state",
]

_worker_state: Any = None  # set inside a worker process after init()


def worker_state() -> Any:
    """Inside a :class:`PinnedPool` worker: the object its ``init()`` returned (None elsewhere).

    Functions run with ``pool.submit_call(func, *args)`` use it to reach the model.
    """
    return _worker_state


def set_worker_state(state: Any) -> None:
    global _worker_state
    _worker_state = state


# Tensors up to this size travel as bytes inside the message: below it, copying is cheaper than
# passing a shared-memory file descriptor (a connection and handshake per tensor).
SMALL_TENSOR_BYTES = 256 * 1024


def rebuild_small_tensor(data: bytes, dtype: str, shape: tuple[int, ...], grad: bool) -> Any:
    import torch

    dt = getattr(torch, dtype)
    if not data:
        t = torch.empty(shape, dtype=dt)
    else:
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt).reshape(shape)
    return t.requires_grad_(grad) if grad else t


def shared_copy(t: Any) -> Any:
    """A copy of CPU tensor ``t`` in a fresh shared-memory segment (one memcpy); ``t`` itself is
    left as it was (its storage is not moved to shared memory)."""
    import torch

    src = t.detach()
    if src.is_contiguous() and not (src.is_conj() or src.is_neg()):
        try:
            # A second storage over t's bytes (numpy's buffer): share_memory_() allocates the
            # segment, copies into it and swaps *that* storage over, so the copy is the only one.
            raw = torch.from_numpy(src.reshape(-1).view(torch.uint8).numpy())
        except (RuntimeError, TypeError, ValueError):
            pass  # no numpy, or a tensor numpy cannot view: below
        else:
            out = raw.share_memory_().view(src.dtype).view(src.shape)
            return out.requires_grad_(t.requires_grad) if t.requires_grad else out
    # Strided and conjugate/negative views: an empty tensor moved into shared memory (the move
    # reads untouched pages, about half a copy more), then one strided copy.
    out = torch.empty_like(src).share_memory_()
    out.copy_(src)
    return out.requires_grad_(t.requires_grad) if t.requires_grad else out


def make_dumps() -> Any:
    """A ``dumps(obj) -> bytes`` that sends tensors by value: through a fresh shared-memory
    segment (torch's reductions, after :func:`shared_copy`), small CPU tensors inline. Imports
    torch: call it only after pinning."""
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch

    from fastinfer import _torch_compat

    shared = _torch_compat.shared_tensor_reducer()

    def reduce(t: Any) -> Any:
        if (
            t.device.type == "cpu"
            and t.layout == torch.strided
            and not t.is_quantized
            and t.numel() * t.element_size() <= SMALL_TENSOR_BYTES
            and (t.is_leaf or not t.requires_grad)
        ):
            try:
                c = t.detach().contiguous()
                raw = c.reshape(-1).view(torch.uint8).numpy().tobytes()
                name = str(c.dtype).removeprefix("torch.")
                return rebuild_small_tensor, (raw, name, tuple(c.shape), t.requires_grad)
            except (RuntimeError, TypeError):
                pass  # a dtype numpy or view() cannot take: share it instead
        if (
            t.device.type == "cpu"
            and t.layout == torch.strided
            and (t.is_leaf or not t.requires_grad)
        ):
            # By value: the receiver changing it in place must not reach the sender's tensor.
            # (Sparse and nested tensors reach here through their strided parts.)
            return shared(t.clone() if t.is_quantized else shared_copy(t))
        # A non-leaf that requires grad: torch's reduction refuses it with its own message.
        # Other devices: torch's IPC handles (by reference; see docs/pool.md).
        return shared(t)

    class _Pickler(ForkingPickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.dispatch_table[torch.Tensor] = reduce

    def dumps(obj: Any) -> bytes:
        buf = io.BytesIO()
        _Pickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
        return buf.getvalue()

    return dumps


def remote_error(blob: bytes | None, tb: str, described: str, where: str) -> BaseException:
    """The exception a call raised in a worker, as the caller should see it.

    ``blob`` is the pickled exception (None when it did not pickle), ``tb`` the worker's traceback
    text, ``described`` its ``Type('message')``, ``where`` names the worker. An ordinary exception
    keeps its type, with the worker's traceback as ``__cause__``. One that cannot be rebuilt here,
    and a ``BaseException`` that is not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``,
    which would tear down the caller's thread or event loop), become a :class:`WorkerError`
    carrying the traceback text (and the original, if any, as ``__cause__``).
    """
    from multiprocessing.reduction import ForkingPickler

    from fastinfer.errors import WorkerError

    if blob is None and not described:  # the call's result could not be sent
        return WorkerError(f"the call failed in {where}: {tb}")
    exc: Any = None
    why = "it cannot be pickled"
    if blob is not None:
        try:
            exc = ForkingPickler.loads(blob)
        except Exception as err:
            why = f"it cannot be rebuilt in this process: {type(err).__name__}: {err}"
    if isinstance(exc, Exception):
        exc.__cause__ = RemoteTraceback(tb)
        return exc
    if isinstance(exc, BaseException):
        exc.__cause__ = RemoteTraceback(tb)
        error = WorkerError(
            f"the call raised {described} in {where}; it is not an Exception, so it is not "
            "re-raised here (it would stop the caller's thread or event loop): the worker caught "
            f"it and keeps serving. The worker's traceback:\n{tb}"
        )
        error.__cause__ = exc
        return error
    return WorkerError(
        f"the call raised {described} in {where}, and {why}. The worker's traceback:\n{tb}"
    )


class RemoteTraceback(Exception):
    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'

"""How :class:`~fastinfer.integrations.fastapi.FastInferService` words a fault for a client: one
line, never a worker's traceback, and ``Retry-After`` only where retrying can help.

A worker crash is answered by what it means for the client:

- the pool gave up (its replacements' ``init`` keep failing): it runs no more calls, so 503
  ``unhealthy`` naming the pool, without ``Retry-After``, like a failed setup (readiness is 503
  too, so a load balancer sends the retry to another replica);
- the request ran alone in the call that crashed its worker (the batcher bisected its batch down
  to it, :data:`CRASHED_ALONE`): its input is what the worker dies on, and resending it would
  crash another worker, so 500 ``worker_crashed`` without ``Retry-After``;
- otherwise (a crash in a batch of several, no worker up for a moment): 503 ``worker_crashed``
  with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["CRASHED_ALONE", "cause_line", "crash_reply", "marking_lone_crashes", "one_line"]

#: set (True) on a ``WorkerCrashed`` whose call held this one request (``serve_model``'s pool
#: call marks it): the request's own input crashed the worker
CRASHED_ALONE = "fastinfer_crashed_alone"

_TRACEBACK = "Traceback (most recent call last)"
_CHAINED = (
    "The above exception was the direct cause of the following exception",
    "During handling of the above exception, another exception occurred",
)


def _lines(text: str) -> list[str]:
    """The non-empty lines of ``text`` with Python traceback blocks dropped: a block's header and
    its indented frames go; the exception line that ends it stays (it names the cause)."""
    out: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(_TRACEBACK):
            in_traceback = True
            continue
        if in_traceback and (not stripped or line[:1] in (" ", "\t")):
            continue  # a frame, its source line, its ^^^ marker
        if in_traceback and any(stripped in kept for kept in out):
            in_traceback = False
            continue  # the exception that ended it, named already
        in_traceback = False
        if stripped and not stripped.startswith(_CHAINED):
            out.append(stripped)
    # a heading that announced a traceback ("The worker's traceback:") announces nothing now
    return [line for line in out if not line.lower().endswith("traceback:")]


def one_line(text: str) -> str:
    """``text`` as one line, without any traceback: what a client may be sent."""
    return " ".join(_lines(text))


def cause_line(exc: BaseException) -> str:
    """The line of ``exc``'s message that names the cause: its first line, and when that only
    introduces what follows (``"worker 0's init() raised:"``) the last line too (the exception
    that ended the traceback), else ``exc``'s cause."""
    lines = _lines(str(exc))
    first = lines[0] if lines else ""
    if first and not first.endswith(":"):
        return first
    if len(lines) > 1:
        return f"{first} {lines[-1]}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return f"{first} {type(cause).__name__}: {cause_line(cause)}".strip()
    return first


def crash_reply(
    exc: BaseException, problems: Sequence[str], retry: dict[str, str]
) -> tuple[int, str, str, dict[str, str] | None]:
    """(status, code, detail, headers) for a ``WorkerCrashed``; ``problems`` are the service's
    health problems now (a pool that gave up says ``pool <name>: gave up: ...``)."""
    text = one_line(str(exc))
    gave_up = [p for p in problems if ": gave up: " in p]
    if gave_up:  # the pool runs no more calls: retrying cannot help
        why = "; ".join(one_line(p) for p in gave_up)
        return 503, "unhealthy", f"{why}; restart the service once the cause is fixed", None
    if "gave up" in text:
        return 503, "unhealthy", text, None
    if getattr(exc, CRASHED_ALONE, False):
        return (
            500,
            "worker_crashed",
            f"{text}; this request ran alone in that call, so its input is what the worker dies "
            "on: it was not retried, and sending it again would crash a worker again",
            None,
        )
    return 503, "worker_crashed", text, retry


def _one_item(batch: Any) -> bool:
    """Whether ``batch`` holds one request's item (a list padded with copies of it counts)."""
    if isinstance(batch, list | tuple):
        return bool(batch) and all(x is batch[0] for x in batch)
    if isinstance(batch, Mapping):
        return bool(batch) and all(_one_item(v) for v in batch.values())
    shape = getattr(batch, "shape", None)
    return shape is not None and len(shape) > 0 and int(shape[0]) == 1


def marking_lone_crashes(
    run: Callable[[Any], Any], gave_up: Callable[[], bool], crashed: type[BaseException]
) -> Callable[[Any], Any]:
    """``run`` (a pool's ``run``), marking a ``crashed`` error of a call that held one request
    (:data:`CRASHED_ALONE`): the batcher hands such an error to that request alone, after its
    bisection. A call refused because no worker is up (``retry_after``) or because the pool
    gave up (``gave_up()``) is not that request's fault and stays unmarked."""

    async def run_marked(batch: Any) -> Any:
        try:
            return await run(batch)
        except crashed as exc:
            if (
                getattr(exc, "retry_after", None) is None
                and "gave up" not in str(exc)
                and _one_item(batch)
                and not gave_up()
            ):
                setattr(exc, CRASHED_ALONE, True)
            raise

    return run_marked

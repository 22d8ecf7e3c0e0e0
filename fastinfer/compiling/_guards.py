"""Dynamo's guards in words: why a call would recompile, and when the model pins the batch size.

When a warmed model is called with something its graphs were not traced for, dynamo lists the
guard that failed for each graph ("triggered by the following guard failure(s): ..."). These
helpers turn that list into :class:`~fastinfer.errors.RecompileError` messages that name the kind
of change (shape, dtype, device, grad mode, a Python value) and the fix for it, and recognise the
constraint violation dynamo raises when the model's code specialises a dimension that was marked
dynamic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["GuardFailure", "batch_specialisation", "guard_failures", "recompile_message"]

_HEADER = "triggered by the following guard failure(s):"

# Kind of change -> what to do about it. Checked in this order (first match wins).
_KINDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "grad mode",
        ("dispatch key set mismatch", "requires_grad mismatch", "grad_mode", "global_state"),
        "call under torch.no_grad() or torch.inference_mode() with tensors that do not require "
        "grad (CompiledModel normalises inference tensors itself; a tensor that requires grad, or "
        "a tensor subclass, still differs from what was warmed)",
    ),
    (
        "dtype",
        ("dtype mismatch",),
        "cast the inputs to the dtype of the example inputs, or compile with example inputs of "
        "the dtype you serve",
    ),
    (
        "device",
        ("device mismatch", "device index mismatch", "device"),
        "move the inputs to the device the model was compiled on",
    ),
    (
        "memory layout",
        ("stride mismatch", "stride()"),
        "pass contiguous tensors (x.contiguous()), laid out like the example inputs: a "
        "transposed or sliced view has other strides, and the graphs were warmed for those",
    ),
    (
        "shape",
        ("size mismatch", "rank mismatch", "size()", "sizes"),
        "add the batch size to compile_model(batch_sizes=...), pad requests to a warmed size "
        "(DynamicBatcher(preferred_batch_sizes=..., pad_to_preferred=True)), keep other "
        "dimensions (sequence length, image size) as in the example inputs, or pass "
        "on_recompile='eager' to run such calls eagerly",
    ),
)
_VALUE_FIX = (
    "a Python value the model's code depends on (an int or bool argument, a flag, an attribute) "
    "changed since warm-up: pass the value used at warm-up, or make it a tensor"
)


_IDENTITY = re.compile(r"___check_(obj|type)_id\(")
_KEY_SETS = re.compile(r"expected DispatchKeySet\(([^)]*)\), actual DispatchKeySet\(([^)]*)\)")
_DEVICE_FIX = (
    "pass real tensors on the device the model was compiled on (a meta, sparse or other-backend "
    "tensor cannot run the compiled graphs): move them with .to(device) or build them there"
)


def _backend_changed(text: str) -> bool:
    """A dispatch-key-set guard that failed on the tensor's backend (CPU -> Meta, a sparse
    layout), not on its autograd or inference-mode keys (which the "grad mode" kind covers)."""
    match = _KEY_SETS.search(text)
    if match is None:
        return False
    expected, actual = ({k.strip() for k in g.split(",") if k.strip()} for g in match.groups())
    grad_keys = ("Autograd", "ADInplaceOrView", "Python", "Functionalize", "Inference")
    return any(not k.startswith(grad_keys) for k in expected ^ actual)


class GuardFailure:
    """One failed guard: its kind ("shape", "dtype", "device", "grad mode", "Python value")
    and dynamo's own text for it."""

    def __init__(self, text: str) -> None:
        self.text = text
        lowered = text.lower()
        self.kind, self.fix = "Python value", _VALUE_FIX
        if _backend_changed(text):
            self.kind, self.fix = "device", _DEVICE_FIX
            return
        for kind, markers, fix in _KINDS:
            if any(m in lowered for m in markers):
                self.kind, self.fix = kind, fix
                break

    def __repr__(self) -> str:
        return f"GuardFailure({self.kind!r}, {self.text!r})"


def guard_failures(message: str) -> list[GuardFailure]:
    """The failed guards listed in dynamo's recompile message, one per distinct reason.

    Dynamo lists one reason per cached graph (``- 0/1: ...``), each possibly followed by its user
    stack trace on continuation lines; only the guard itself is kept.
    """
    if _HEADER not in message:
        return []
    seen: dict[str, GuardFailure] = {}
    numbered = re.compile(r"^- \d+/\d+: ")
    for line in message.split(_HEADER, 1)[1].splitlines():
        line = line.strip()
        if not line.startswith("- "):
            if line and seen:
                break  # the end of the list
            continue
        if not numbered.match(line) and seen:
            continue  # a continuation line (the user stack trace of the previous guard)
        text = re.sub(r"\s+", " ", numbered.sub("", line).removeprefix("- ")).strip()
        seen.setdefault(text, GuardFailure(text))
    return list(seen.values())


def recompile_message(
    message: str, shapes: Sequence[tuple[int, ...]], warmed: Sequence[int]
) -> str:
    """The :class:`RecompileError` text for dynamo's ``fail_on_recompile`` ``message``."""
    failures = guard_failures(message)
    head = (
        f"a call with input shapes {list(shapes)} needs a new compilation, which is forbidden "
        f"after warm-up (warmed batch sizes: {list(warmed)})"
    )
    if not failures:
        first = message.splitlines()[0] if message else ""
        return (
            f"{head}; dynamo gave no guard failure. Fix: call with inputs like the example "
            f"inputs (shape, dtype, device), or pass on_recompile='eager'.\n{first}"
        )
    # Graphs cached for another instance of the same class (another model object in the same
    # process) fail on the identity of their own module/parameters: not this model's change.
    relevant = [f for f in failures if not _IDENTITY.match(f.text)] or failures
    kinds = list(dict.fromkeys(f.kind for f in relevant))
    if len(kinds) > 1 and "shape" in kinds:
        # Each cached graph reports its own failure: the graphs of the other batch sizes fail on
        # their size, which is not news when something else changed for the graph of this size.
        kinds.remove("shape")
    lines = [f"{head}: the {' and '.join(kinds)} changed."]
    for kind in kinds:
        fix = next(f.fix for f in relevant if f.kind == kind)
        lines.append(f"  {kind}: fix: {fix}")
    lines.append("  dynamo's failed guard(s):")
    lines += [f"    - {f.text}" for f in failures[:6]]
    if len(failures) > 6:
        lines.append(f"    ... and {len(failures) - 6} more")
    return "\n".join(lines)


def batch_specialisation(exc: BaseException) -> str | None:
    """The guard text when ``exc`` is dynamo refusing a dynamic batch dimension that the model's
    code specialises (a ``ConstraintViolationError``, e.g. ``16 <= batch``), else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ == "ConstraintViolationError" or "Constraints violated" in str(cur):
            text = str(cur)
            m = re.search(r"satisfy the generated guard (.+)", text)
            return (m.group(1) if m else text.splitlines()[0]).strip()
        cur = cur.__cause__ or cur.__context__
    return None

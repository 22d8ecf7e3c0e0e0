"""Dynamo's guards in words: why a call would recompile, and when the model pins the batch size.

When a warmed model is called with something its graphs were not traced for, dynamo lists the
guard that failed for each graph ("triggered by the following guard failure(s): ..."). These
helpers turn that list into :class:`~fastinfer.errors.RecompileError` messages that name the kind
of change (shape, dtype, device, grad mode, a Python value, a process-wide torch setting such as
the thread count or autocast) and the fix for it, and recognise the constraint violation dynamo
raises when the model's code specialises a dimension that was marked dynamic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "GuardFailure",
    "batch_specialisation",
    "guard_failures",
    "recompile_message",
    "settings",
]

_HEADER = "triggered by the following guard failure(s):"

# Kind of change -> what to do about it. Checked in this order (first match wins).
_KINDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "grad mode",
        ("dispatch key set mismatch", "requires_grad mismatch"),
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


_GLOBAL_STATE = "GLOBAL_STATE changed:"
_SETTING_FIX = "set it back to its value at compile time, or set it before compile_model"
_EAGER = "; or pass on_recompile='eager' to run such calls eagerly"
# Dynamo's global-state guard field -> (kind, fix). Fields dynamo does not document here fall back
# to a generic "process-wide torch setting" kind naming the field.
_GLOBAL_FIELDS: dict[str, tuple[str, str]] = {
    "num_threads": (
        "thread count",
        "torch's intra-op thread count differs from the one the model was compiled with, and "
        "dynamo guards on it (inductor writes its CPU kernels for that count). Set the thread "
        "count before compile_model and keep it: fastinfer.configure_threads(n) (or "
        "torch.set_num_threads(n)) at start-up, before compiling; a worker that sizes its own "
        "threads does so before it compiles (or loads its cache); or set it back with "
        "torch.set_num_threads(<the count at compile time>)",
    ),
    "grad_mode": (
        "grad mode",
        "the grad mode around the compiled graph differs from warm-up's; call the "
        "CompiledModel itself (it runs every call under torch.inference_mode())",
    ),
    "default_dtype": (
        "default dtype",
        f"torch.set_default_dtype changed since warm-up: {_SETTING_FIX}",
    ),
    "deterministic_algorithms": (
        "deterministic-algorithms setting",
        f"torch.use_deterministic_algorithms changed since warm-up: {_SETTING_FIX}",
    ),
    "allow_tf32": (
        "matmul precision setting",
        "torch.backends.cuda.matmul.allow_tf32 / torch.backends.cudnn.allow_tf32 (or "
        f"torch.set_float32_matmul_precision) changed since warm-up: {_SETTING_FIX}",
    ),
    "torch_function": (
        "torch function mode",
        "the call runs with torch function handling enabled/disabled otherwise than at warm-up "
        "(a torch function mode, or torch function disabled, around it): call it as at "
        "warm-up",
    ),
}
_GLOBAL_FIELDS["deterministic_algorithms_warn_only"] = _GLOBAL_FIELDS["deterministic_algorithms"]
_GLOBAL_FIELDS["allow_fp16_reduce"] = _GLOBAL_FIELDS["allow_tf32"]
_GLOBAL_FIELDS["allow_bf16_reduce"] = _GLOBAL_FIELDS["allow_tf32"]
_GLOBAL_FIELDS["torch_function_all_disabled"] = _GLOBAL_FIELDS["torch_function"]
_SETTING_KINDS = {k for k, _ in _GLOBAL_FIELDS.values()} - {"grad mode"} | {
    "autocast state",
    "process-wide torch setting",
}
_AUTOCAST = re.compile(r"autocast\((\w+)\)_(enabled|dtype)")


def _autocast_change(device: str, what: str) -> tuple[str, str]:
    where = f"torch.autocast({device!r})"
    if what == "dtype":
        state = f"this call runs under {where} with another dtype than the warm-up"
    else:
        try:
            now = torch.is_autocast_enabled(device)
        except (RuntimeError, TypeError):  # a device type this torch does not know
            now = None
        state = {
            True: f"this call runs under {where} and the model was warmed up outside it",
            False: f"the model was warmed up under {where} and this call runs outside it",
            None: f"{where} is on/off otherwise than at warm-up",
        }[now]
    return (
        "autocast state",
        f"{state}: call the model inside or outside autocast as it was warmed up, or call "
        f"compile_model under the same {where} you serve under (the warm-up runs under it)",
    )


def settings() -> dict[str, Any]:
    """The process-wide settings dynamo's GLOBAL_STATE guard checks that can be read with public
    torch calls, keyed by the guard's own field names (what :class:`CompiledModel` records at
    compile time, to tell this model's changed setting from another model's graph)."""
    now: dict[str, Any] = {
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_algorithms_warn_only": (
            torch.is_deterministic_algorithms_warn_only_enabled()
        ),
    }
    for device in ("cpu", "cuda"):
        try:
            now[f"autocast({device})_enabled"] = torch.is_autocast_enabled(device)
            now[f"autocast({device})_dtype"] = torch.get_autocast_dtype(device)
        except (RuntimeError, TypeError, AttributeError):  # pragma: no cover - older torch
            pass
    return now


def _global_state_changes(
    text: str, compiled: Mapping[str, Any] | None = None
) -> list[tuple[str, str]]:
    """One (kind, fix) per process-wide setting dynamo's GLOBAL_STATE guard reports changed.

    With ``compiled`` (:func:`settings` at compile time), a field whose value is the same now
    is left out: the guard belongs to another model's graph, compiled under other settings.
    """
    fields = text.split(_GLOBAL_STATE, 1)[1].split()
    if compiled is not None:
        now = settings()
        fields = [f for f in fields if f not in compiled or compiled[f] != now.get(f)]
        if not fields:
            return []
    changes: list[tuple[str, str]] = []
    for field in fields:
        autocast = _AUTOCAST.fullmatch(field)
        if autocast:
            change = _autocast_change(autocast.group(1), autocast.group(2))
        elif field.startswith("autocast"):  # autocast_cache_enabled
            change = (
                "autocast state",
                "torch.autocast(cache_enabled=...) differs from warm-up: call as at warm-up",
            )
        else:
            change = _GLOBAL_FIELDS.get(
                field,
                (
                    "process-wide torch setting",
                    f"the process-wide torch setting {field!r} changed since warm-up: "
                    f"{_SETTING_FIX}",
                ),
            )
        if change not in changes:
            changes.append(change)
    return changes or [("process-wide torch setting", f"a torch setting: {_SETTING_FIX}")]


_IDENTITY = re.compile(r"___check_(obj|type)_id\(")
# A guard on the compiled callable itself: dynamo's wrapper calls it ``fn``. Every module
# compiled with torch.compile runs through that one wrapper code, so dynamo lists the graphs of
# every compiled model in the process, and another model's graphs fail on ``fn`` (its identity,
# ``len(fn._modules)``): not this call's change, when this model's graphs report one.
_ROOT = re.compile(r"(?<![\w.'\[])fn\b")
# Dynamo's own note when its recompile-reason analysis disagrees with the runtime guards: not
# a change of the call, shown but never named as one.
_NOISE = "Unexpected recompilation"
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


def _classify(text: str) -> list[tuple[str, str]]:
    if _GLOBAL_STATE in text:
        return _global_state_changes(text)
    if text.startswith(_NOISE):
        return [("unexplained", "dynamo could not tell which guard failed")]
    if _backend_changed(text):
        return [("device", _DEVICE_FIX)]
    lowered = text.lower()
    for kind, markers, fix in _KINDS:
        if any(m in lowered for m in markers):
            return [(kind, fix)]
    return [("Python value", _VALUE_FIX)]


class GuardFailure:
    """One failed guard: its kind ("shape", "dtype", "device", "grad mode", "Python value", a
    process-wide setting such as "thread count" or "autocast state") and dynamo's own text for
    it. A global-state guard can report several settings at once: ``changes`` lists each
    (kind, fix); ``kind`` / ``fix`` are the first."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.changes = _classify(text)
        self.kind, self.fix = self.changes[0]

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
    numbered = re.compile(r"^- \d+/\d+\S*: ")
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


def _other_model(text: str) -> bool:
    guard = text.split(" # ", 1)[0]  # dynamo appends the source line after " # "
    # a graph compiled with another backend callable is another compile's, never this model's
    # (each compile_model call has its own backend)
    return bool(_IDENTITY.match(guard) or _ROOT.search(guard) or guard.startswith("BACKEND_MATCH"))


def recompile_message(
    message: str,
    shapes: Sequence[tuple[int, ...]],
    warmed: Sequence[int],
    *,
    compiled: Mapping[str, Any] | None = None,
    call: tuple[str, str] | None = None,
) -> str:
    """The :class:`RecompileError` text for dynamo's ``fail_on_recompile`` ``message``.

    ``compiled``: :func:`settings` at compile time (a setting is named only when it differs from
    it; the thread count with both values);
    ``call``: how the call's arguments differ from the warm-up's (``CallBinder.prepare``): a
    "call style" that could not be bound is the cause (first, with the fix), other "arguments"
    a detail after the guards' kinds.
    """
    failures = guard_failures(message)
    # What each graph's failure says changed: a setting as this model was compiled with is not
    # a change (another model's graph, compiled under other settings, fails on it).
    said = {
        id(f): _global_state_changes(f.text, compiled)
        if compiled is not None and _GLOBAL_STATE in f.text
        else f.changes
        for f in failures
    }
    # Another model's graphs (of this class: its module's identity; of another: its structure).
    # Dynamo's "Unexpected recompilation" note comes from a graph of another isolated compile.
    mine = [
        f for f in failures if said[id(f)] and f.kind != "unexplained" and not _other_model(f.text)
    ]
    others = len(failures) - len(mine) if mine else 0
    if not mine:
        said = {id(f): f.changes for f in failures}
    failures = mine or failures
    head = (
        f"a call with input shapes {list(shapes)} needs a new compilation, which is forbidden "
        f"after warm-up (warmed batch sizes: {list(warmed)})"
    )
    if not failures and call is None:
        first = message.splitlines()[0] if message else ""
        return (
            f"{head}; dynamo gave no guard failure. Fix: call with inputs like the example "
            f"inputs (shape, dtype, device), or pass on_recompile='eager'.\n{first}"
        )
    relevant = [f for f in failures if f.kind != "unexplained"] or failures
    changes: dict[str, str] = {}
    for f in relevant:
        for kind, fix in said[id(f)]:
            changes.setdefault(kind, fix)
    if call is not None and call[0] == "call style":
        # How the arguments arrive explains the guards on them (``not args``, ``len(kwargs)``).
        rest = {k: v for k, v in changes.items() if k != "Python value"}
        changes = {call[0]: call[1], **rest}
    changes.pop("unexplained", None)
    if len(changes) > 1 and "shape" in changes:
        # Each cached graph reports its own failure: the graphs of the other batch sizes fail on
        # their size, which is not news when something else changed for the graph of this size.
        del changes["shape"]
    if compiled is not None and "thread count" in changes:
        changes["thread count"] = (
            f"compiled with {compiled['num_threads']} thread(s), torch.get_num_threads() is now "
            f"{torch.get_num_threads()}: {changes['thread count']}"
        )
    kinds = list(changes) or ["call"]
    lines = [f"{head}: the {' and '.join(kinds)} changed."]
    for kind, fix in changes.items():
        end = _EAGER if kind in _SETTING_KINDS or kind == "call style" else ""
        lines.append(f"  {kind}: fix: {fix}{end}")
    if call is not None and call[0] == "arguments":
        lines.append(f"  arguments: {call[1]}")
    lines.append("  dynamo's failed guard(s):")
    lines += [f"    - {f.text}" for f in failures[:6]]
    if len(failures) > 6:
        lines.append(f"    ... and {len(failures) - 6} more")
    if others:
        lines.append(f"    ({others} failed guard(s) of other compiled models' graphs left out)")
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

"""Numerics and diagnosis shared by compile_model, export_aot and select_backend.

Outputs are compared with eager through the shared per-dtype tolerance table
(:mod:`fastinfer._common.tolerances`); opaque fused ops, a missing C++ compiler and dynamo's
errors are turned into messages that say the fix.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from fastinfer import _torch_compat
from fastinfer._common.padding import zero_padded
from fastinfer._common.tolerances import tolerance_for
from fastinfer.compiling._cache_files import causes, compiler_failure, disk_full
from fastinfer.compiling._inputs import inputs_for
from fastinfer.compiling._manifest import compiler_path
from fastinfer.errors import ConfigError, VerificationError

__all__ = [
    "MISMATCH_CAUSES",
    "NO_COMPILER",
    "OPAQUE_FIX",
    "OPAQUE_FUSED_OPS",
    "check_close",
    "explain",
    "leaves",
    "log_once",
    "max_error",
    "opaque_ops",
    "swap_refusal",
]

logger = logging.getLogger("fastinfer.compiling")

# Fused ops that compiling cannot see into (nn.TransformerEncoder / MultiheadAttention fastpath).
OPAQUE_FUSED_OPS = (
    "_transformer_encoder_layer_fwd",
    "_native_multi_head_attention",
    "_transformer_decoder_only_layer_fwd",
)
NO_COMPILER = (
    "no working C++ compiler found (looked for $CXX, g++, c++, clang++ on PATH): install g++ "
    "(e.g. apt-get install g++), set CXX, or ship an AOTInductor package (fastinfer.export_aot) "
    "that loads without one"
)
OPAQUE_FIX = (
    "compiling gains nothing here: the model runs the opaque fused op(s) {ops} "
    "(nn.TransformerEncoder/MultiheadAttention fastpath), which the compiler cannot see into. "
    "Fix: call torch.backends.mha.set_fastpath_enabled(False) before compiling so the attention "
    "and feed-forward ops are compiled, or keep the model eager"
)
# What an output that differs from eager may come from (which one cannot be told from it).
MISMATCH_CAUSES = (
    "Possible causes (the difference cannot tell which): the inputs are padded otherwise than "
    "the example the backend was built and verified on (left padding, or a masked token inside "
    "a row, where the example was right-padded: some fused attention paths handle one layout "
    "only), or a compile cache built for another CPU ISA or torch. Fix: build and verify the "
    "backend with an example padded like the batches you serve (select_backend keys its decision "
    "by the padding layout), use a cache built on this machine or another backend, or loosen "
    "rtol/atol if the difference is expected."
)
# What fastinfer.swap_attention_ records on a swapped model for compile selectors to read
# (primitives do not import each other): {"path", "compile_useful", "compile_reason"}.
SWAP_ATTRIBUTE = "_fastinfer_attention"
_logged: set[str] = set()


def leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return [x for x in _torch_compat.tree_leaves(out) if isinstance(x, torch.Tensor)]


def max_error(actual: Any, expected: Any, valid: torch.Tensor | None = None) -> float:
    """Largest absolute difference between two outputs' tensors (inf when the structure differs),
    on valid positions only when ``valid`` (the batch's ``(B, T)`` padding validity) is given."""
    a, e = leaves(actual), leaves(expected)
    if len(a) != len(e) or any(x.shape != y.shape for x, y in zip(a, e)):
        return math.inf
    err = 0.0
    for x, y in zip(a, e):
        x, y = zero_padded(x, valid), zero_padded(y, valid)
        if x.numel() and (x.is_floating_point() or y.is_floating_point()):
            err = max(err, (x.double() - y.double()).abs().max().item())
        elif x.numel() and not torch.equal(x, y):
            return math.inf
    return err


def check_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None,
    atol: float | None,
    where: str,
    valid: torch.Tensor | None = None,
) -> None:
    """Raise VerificationError unless the outputs agree within tolerance; with ``valid``, on
    valid positions only (a padding-free path leaves other values in padded positions)."""
    a, e = leaves(actual), leaves(expected)
    if len(a) != len(e):
        raise VerificationError(f"{where}: {len(a)} output tensors, eager gives {len(e)}")
    for i, (x, y) in enumerate(zip(a, e)):
        if valid is not None and x.shape == y.shape:
            x, y = zero_padded(x, valid), zero_padded(y, valid)
        rt, at = tolerance_for(y.dtype, rtol=rtol, atol=atol)
        try:
            torch.testing.assert_close(x, y, rtol=rt, atol=at, equal_nan=True)
        except AssertionError as exc:
            raise VerificationError(
                f"{where}: output {i} ({y.dtype}, shape {tuple(y.shape)}) differs from eager "
                f"beyond rtol={rt:g}, atol={at:g} (max error {max_error(x, y):.3g}). "
                f"{MISMATCH_CAUSES}\n"
                f"{str(exc)[:500]}"
            ) from None


def opaque_ops(model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run eager once, recording aten ops; returns (output, opaque fused ops seen)."""
    seen: set[str] = set()

    class _Spy(_torch_compat.torch_dispatch_mode()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = str(func)
            if any(op in name for op in OPAQUE_FUSED_OPS):
                seen.add(name.split(".")[1] if name.startswith("aten.") else name)
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), _Spy():
        out = model(*args, **kwargs)
    return out, tuple(sorted(seen))


def swap_refusal(model: Any, what: str) -> str:
    """Why ``what`` (compiling with a backend, an AOT export) is refused for ``model``: its
    attention (or a submodule's) was swapped by ``fastinfer.swap_attention_`` to a path the swap
    recorded as not worth compiling; "" when there is none. The packed paths run oneDNN linears
    on weights reordered once, which Inductor cannot lower (a ~35 s compile, then a
    ``LoweringException``), and their token count changes with every batch."""
    if not isinstance(model, torch.nn.Module):
        return ""
    for name, module in model.named_modules():
        info = module.__dict__.get(SWAP_ATTRIBUTE)
        if not isinstance(info, dict) or info.get("compile_useful") is not False:
            continue
        where = f"the model's submodule {name!r}" if name else "the model"
        path = info.get("path", "?")
        reason = str(info.get("compile_reason") or "the swap says compiling it is not useful")
        return (
            f"{where} runs the attention path {path!r} that fastinfer.swap_attention_ put in, "
            f"and the swap recorded that compiling it is not useful ({reason}), so {what} is "
            "refused up front: it adds compile time for no gain, and on the packed paths "
            "inductor fails after a long compile. Fix: serve the "
            "swapped model as it is, without compiling (it is the fast path already); or "
            "compile the unswapped model (fastinfer.undo_attention_swap_(model), or a copy "
            "taken before the swap) and let select_backend measure both side by side "
            "(candidates=['eager', 'inductor', ('swapped', swapped_model)])"
        )
    return ""


def eager_reference(
    model: Callable[..., Any],
    example_inputs: Any,
    sizes: tuple[int, ...],
    seconds: dict[int, float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[int, tuple[tuple[Any, ...], dict[str, Any]]], dict[int, Any], tuple[str, ...]]:
    """Inputs resized to each batch size, eager outputs at each, and the opaque fused ops seen
    (looked for once, at the largest size: one eager pass each). ``seconds``, when given, gets
    each size's call time (what the eager candidate's verification call would measure)."""
    batches = {b: inputs_for(example_inputs, b) for b in sizes}
    expected: dict[int, Any] = {}
    opaque: tuple[str, ...] = ()
    for b in sizes:
        t0 = clock()
        try:
            if b == sizes[-1]:
                expected[b], opaque = opaque_ops(model, *batches[b])
            else:
                with torch.inference_mode():
                    expected[b] = model(*batches[b][0], **batches[b][1])
        except Exception as exc:
            # The example inputs are the caller's: a model that cannot run on them (a meta
            # tensor, the wrong dtype) is a configuration problem, not a compiler failure.
            raise ConfigError(
                f"the model fails on example_inputs at batch size {b} ({type(exc).__name__}: "
                f"{str(exc)[:300]}); pass example inputs the model runs on eagerly (real tensors "
                "on its device, of the dtype it serves), like one request's batch"
            ) from exc
        if seconds is not None:
            seconds[b] = max(clock() - t0, 0.0)
    return batches, expected, opaque


def log_once(key: str, level: int, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def _compiler_missing(exc: BaseException, text: str) -> bool:
    """Whether ``exc`` says no C++ compiler runs here (not that one ran and failed)."""
    lowered = text.lower()
    if "invalidcxxcompiler" in lowered or "no working c++ compiler" in lowered:
        return True
    names = {
        "g++",
        "c++",
        "clang++",
        "gcc",
        "cc",
        os.path.basename(os.environ.get("CXX", "") or "g++"),
    }
    for e in causes(exc):
        missing = getattr(e, "filename", None) if isinstance(e, FileNotFoundError) else None
        if missing and os.path.basename(os.fsdecode(missing)) in names:
            return True
    return compiler_failure(exc) is not None and compiler_path() is None


def _first_errors(output: str, limit: int = 4) -> str:
    """The compiler's own first error lines (its warnings and include traces left out)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [
        line
        for line in lines
        if re.search(r"\b(error|fatal)\b|no space left|cannot find|undefined reference", line, re.I)
    ]
    return " / ".join(line[:200] for line in (errors or lines)[:limit]) or "(no output)"


def explain(exc: BaseException) -> str:
    """A short account of a compile failure with the fix: a full disk, no C++ compiler, the
    compiler's own first errors, a model that pins the batch size; else the error itself."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    failure = compiler_failure(exc)
    folder = disk_full(exc)
    if folder is not None:
        where = f" in {folder}" if folder else ""
        said = f" The compiler said: {_first_errors(failure[1])}." if failure else ""
        return (
            f"no space left on device: compiling could not write its output{where}.{said} Fix: "
            f"free space on that filesystem (df -h {folder or '.'}), or point the compile cache at "
            "a volume with room (InductorCache(path), FASTINFER_CACHE_DIR; TMPDIR for torch's "
            "default cache)"
        )
    if _compiler_missing(exc, text):
        return f"{NO_COMPILER}. Cause: {text[:800]}"
    if failure is not None:
        command, output = failure
        dirs = [os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""), tempfile.gettempdir()]
        spaced = [d for d in dirs if d and any(c.isspace() for c in d)]
        fix = (
            f"the folder {spaced[0]!r} contains whitespace, and torch passes paths to the compiler "
            "unquoted: use a path without spaces (InductorCache(path), FASTINFER_CACHE_DIR, TMPDIR)"
            if spaced
            else "read the compiler's error above; an error in generated code is a torch bug (run "
            "again with TORCHDYNAMO_VERBOSE=1 to report it), or pass fallback='eager' to serve eager"
        )
        return (
            f"the C++ compiler ({command.split(' ')[0] or compiler_path()}) is installed but failed: "
            f"{_first_errors(output)}. Fix: {fix}. Command: {command[:200]}"
            f"{'...' if len(command) > 200 else ''}"
        )
    if "constraintviolation" in lowered or "specialized" in lowered:
        return (
            f"{text[:1200]}\nFix: the model fixes the batch size in its code; pass dynamic=False "
            "to compile one graph per batch size"
        )
    return text[:1500]

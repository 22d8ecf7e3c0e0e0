"""Attention swap: route a model to its fastest correct attention path, say why, and undo.

:func:`swap_attention_` looks at what the model is built from and assembles candidate paths:

* Hugging Face models: the attention implementations the class supports and this machine can run
  (``eager``, ``sdpa``, ``flex_attention``, ``flash_attention_2`` on a GPU with fp16/bf16 and the
  kernel installed), switched in place with ``set_attn_implementation``;
* Hugging Face BERT-family encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT): the
  encoder replaced by one that runs the same weights either on the packed valid tokens
  (``hf:packed``) or through PyTorch's fused encoder-layer kernel with nested tensors
  (``hf:fused``), what optimum's BetterTransformer did;
* ``nn.TransformerEncoder`` / ``TransformerEncoderLayer`` / ``MultiheadAttention``: the native
  fastpath made to apply (``torch:fastpath``, ``torch:fastpath-nested``) or the packed encoder
  (``torch:packed``), with the reason PyTorch would give when its fastpath is not taken;
* classes registered with :func:`register_attention_swap`;
* optimum's legacy BetterTransformer, only where an optimum that ships it and a transformers it
  accepts are installed.

With ``example_inputs`` (or a ``padding_profile``) every candidate is verified against the
original on valid positions and timed (interleaved, median); the fastest correct one is kept.
:func:`undo_attention_swap_` restores the original exactly.

    >>> report = swap_attention_(model, example_inputs={"input_ids": ids, "attention_mask": mask})
    >>> print(report)
    >>> undo_attention_swap_(model)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastinfer.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "AttentionReport",
    "PathResult",
    "optimum_status",
    "register_attention_swap",
    "swap_attention_",
    "swapped_path",
    "undo_attention_swap_",
]

# torch is imported by the functions here, not at import time: `import torch` pulls in torch.hub
# (and tqdm), which `import fastinfer` must not pay for.

ORIGINAL = "original"

# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathResult:
    """One candidate path: whether it could run, how fast, and how far from the original."""

    name: str
    available: bool
    reason: str = ""  # why it is unavailable, failed, or was rejected
    latency_s: float | None = None  # median over the timed repetitions
    spread: float | None = None  # (max - min) / median of the repetitions
    max_abs_error: float | None = None  # vs the original, valid positions only
    verified: bool | None = None  # None: not checked (no example inputs)
    compile_useful: bool | None = None


@dataclass(frozen=True)
class AttentionReport:
    """What :func:`swap_attention_` did. ``print(report)`` shows a table; ``to_dict()`` is JSON-ready.

    ``fastpath_before`` / ``fastpath_after`` list, per native attention module, the reason PyTorch's
    fastpath is not taken (``""`` = taken), computed the way PyTorch computes it.
    """

    model: str
    kind: str  # hf-encoder | hf | torch | registered | none
    chosen: str
    paths: tuple[PathResult, ...]
    verified: bool | None
    reverted: bool
    compile_useful: bool
    compile_reason: str
    fastpath_before: tuple[tuple[str, str], ...] = ()
    fastpath_after: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    measured: bool = False

    def path(self, name: str) -> PathResult:
        for p in self.paths:
            if p.name == name:
                return p
        raise KeyError(f"no path {name!r}; paths: {[p.name for p in self.paths]}")

    @property
    def speedup(self) -> float | None:
        """Original latency / chosen latency (None when not measured)."""
        base = self.path(ORIGINAL).latency_s if self.measured else None
        chosen = self.path(self.chosen).latency_s if self.measured else None
        return base / chosen if base and chosen else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = self.speedup
        return d

    def __str__(self) -> str:
        head = ["path", "status", "latency", "vs original", "max err", "compile"]
        base = self.path(ORIGINAL).latency_s if self.measured else None
        rows = []
        for p in self.paths:
            if not p.available:
                status = "unavailable"
            elif p.verified is False:
                status = "rejected"
            else:
                status = "CHOSEN" if p.name == self.chosen else "ok"
            lat = "" if p.latency_s is None else f"{p.latency_s * 1e3:.2f} ms"
            ratio = "" if not (base and p.latency_s) else f"{base / p.latency_s:.2f}x"
            err = "" if p.max_abs_error is None else f"{p.max_abs_error:.1e}"
            comp = "" if p.compile_useful is None else ("useful" if p.compile_useful else "no")
            rows.append([p.name, status, lat, ratio, err, comp])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [f"attention swap for {self.model} ({self.kind}): {self.chosen}"]
        lines += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
        for p in self.paths:
            if p.reason:
                lines.append(f"  {p.name}: {p.reason}")
        if self.reverted:
            lines.append("outputs: NOT verified: the swap was undone, the model is unchanged")
        elif self.chosen == ORIGINAL:
            lines.append("outputs: the original path was kept (nothing faster and correct)")
        else:
            v = {None: "not verified (no example inputs)", True: "verified", False: "NOT verified"}
            lines.append(f"outputs: {v[self.verified]}")
        lines.append(
            f"compile: {'useful' if self.compile_useful else 'not useful'}: {self.compile_reason}"
        )
        for title, items in (("before", self.fastpath_before), ("after", self.fastpath_after)):
            for mod, why in items:
                lines.append(f"fastpath {title}: {mod}: {why or 'taken'}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Registry of user replacements
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {}
F_ = TypeVar("F_", bound=Callable[..., Any])


def register_attention_swap(
    module_class: type[nn.Module], factory: Callable[[nn.Module], nn.Module] | None = None
) -> Any:
    """Register ``factory(module) -> replacement`` for every instance of ``module_class``.

    The replacement becomes the ``registered`` candidate: it is verified and timed like the
    built-in paths; a factory that computes something else is caught by verification and the
    swap undone. Usable as a decorator (``@register_attention_swap(MyAttention)``); registering
    a class again replaces its factory. Returns the factory.
    """
    from torch import nn

    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise ConfigError(
            f"register_attention_swap needs an nn.Module subclass, got {module_class!r}"
        )

    def register(fn: F_) -> F_:
        if not callable(fn):
            raise ConfigError(f"the factory for {module_class.__name__} must be callable")
        _REGISTRY[module_class] = fn
        return fn

    return register if factory is None else register(factory)  # type: ignore[arg-type]


def _unregister_attention_swap(module_class: type[nn.Module]) -> None:
    _REGISTRY.pop(module_class, None)


def swap_attention_(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    prefer: str | Sequence[str] | None = None,
    verify: bool = True,
    padding_profile: tuple[int, int, float] | None = None,
    repeat: int = 5,
    warmup: int = 1,
    tolerance: tuple[float, float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> AttentionReport:
    """Switch ``model`` in place to its fastest correct attention path; return what was done.

    Args:
        example_inputs: a batch the model is called with (a dict of keyword arguments, a tuple of
            positional ones, or one tensor). With it every candidate path is verified on valid
            positions and timed, and the fastest correct one is kept. The padding mask is found
            by name (``attention_mask``: 1 = token; ``src_key_padding_mask`` /
            ``key_padding_mask``: True = padding).
        prefer: a path name (or names) to restrict the choice to, e.g. ``"hf:packed"``.
        verify: compare with the original and undo the swap on mismatch (needs example inputs).
        padding_profile: ``(batch_size, seq_len, padding_fraction)`` to synthesise example inputs
            (Hugging Face models and bare ``nn.TransformerEncoder``).
        repeat / warmup: timed and untimed calls per candidate (timing is interleaved; median).
        tolerance: ``(atol, rtol)`` overriding the per-dtype defaults in :data:`TOLERANCES`.

    Without inputs the path is chosen by rule (hf:packed for BERT-family encoders, hf:sdpa for
    other HF models, torch:fastpath-nested for nn.TransformerEncoder, registered replacements).

    Raises:
        AttentionSwapError: the model is already swapped, or a preferred path is unavailable.
        ConfigError: bad arguments.
    """
    from fastinfer import _attention_swap

    return _attention_swap.swap(
        model,
        example_inputs=example_inputs,
        prefer=prefer,
        verify=verify,
        padding_profile=padding_profile,
        repeat=repeat,
        warmup=warmup,
        tolerance=tolerance,
        clock=clock,
    )


def undo_attention_swap_(model: nn.Module) -> AttentionReport:
    """Restore the model exactly as it was before :func:`swap_attention_`; returns that report.

    Raises:
        AttentionSwapError: the model is not swapped.
    """
    from fastinfer import _attention_swap

    return _attention_swap.undo(model)


def swapped_path(model: nn.Module) -> str | None:
    """The path a model is swapped to, or None (what compile selectors may consult)."""
    from fastinfer import _attention_swap

    return _attention_swap.swapped_path(model)


def optimum_status(model: nn.Module | None = None) -> tuple[bool, str]:
    """Whether optimum's legacy BetterTransformer can be used here, and the message if not."""
    from fastinfer import _attention_swap

    return _attention_swap.optimum_status(model)

"""What swap_attention_ reports, and the registry of user replacements (a leaf module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from torch import nn

from fastinfer._common.tables import render_table
from fastinfer.errors import ConfigError

__all__ = ["ORIGINAL", "REGISTRY", "AttentionReport", "PathResult", "register_attention_swap"]

ORIGINAL = "original"


@dataclass(frozen=True)
class PathResult:
    """One candidate path: whether it could run, how fast, and how far from the original."""

    name: str
    available: bool
    reason: str = ""  # why it is unavailable, failed, or was rejected
    latency_seconds: float | None = None  # median over the timed repetitions
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
    selection_seconds: float = 0.0  # how long the choice took (discovery, measuring, applying)
    from_cache: bool = False  # the choice came from the decision cache: nothing was timed
    measured_on: tuple[int, int] | None = None  # (rows, of batch) when timed on a slice
    budget_seconds: float | None = None  # the time budget the choice was made under

    def path(self, name: str) -> PathResult:
        for p in self.paths:
            if p.name == name:
                return p
        raise KeyError(f"no path {name!r}; paths: {[p.name for p in self.paths]}")

    @property
    def reason(self) -> str:
        """Why the original path was kept ("" when another path was chosen). Never empty for a
        report that declines."""
        if self.chosen != ORIGINAL:
            return ""
        others = [p for p in self.paths if p.name != ORIGINAL]
        if not others:
            return (
                f"no attention path to swap in {self.model}: it is not a Hugging Face model and "
                "holds none, has no nn.TransformerEncoder, TransformerEncoderLayer or "
                "MultiheadAttention, and no class registered with "
                "fastinfer.register_attention_swap; register a replacement for its attention "
                "module to give it one"
            )
        if self.reverted:
            return "every candidate that ran was rejected by verification: " + "; ".join(
                f"{p.name}: {p.reason}" for p in others if p.verified is False
            )
        runnable = [p for p in others if p.available]
        if not runnable:
            return "no path can run here: " + "; ".join(f"{p.name}: {p.reason}" for p in others)
        if not self.measured:
            return "no candidate path applies without example inputs"
        timed = [p for p in runnable if p.latency_seconds and p.verified is not False]
        base = self.path(ORIGINAL).latency_seconds
        if timed and base:
            best = min(timed, key=lambda p: p.latency_seconds or float("inf"))
            return (
                f"no path was faster than the original: the fastest correct one, {best.name}, "
                f"took {(best.latency_seconds or 0) * 1e3:.3g} ms against "
                f"{base * 1e3:.3g} ms"
            )
        return "no path ran correctly: " + "; ".join(
            f"{p.name}: {p.reason}" for p in runnable if p.reason
        )

    @property
    def speedup(self) -> float | None:
        """Original latency / chosen latency (None when not measured)."""
        base = self.path(ORIGINAL).latency_seconds if self.measured else None
        chosen = self.path(self.chosen).latency_seconds if self.measured else None
        return base / chosen if base and chosen else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = self.speedup
        d["reason"] = self.reason
        return d

    def __str__(self) -> str:
        head = ["path", "status", "latency", "vs original", "max err", "compile"]
        base = self.path(ORIGINAL).latency_seconds if self.measured else None
        rows = []
        for p in self.paths:
            if not p.available:
                status = "unavailable"
            elif p.verified is False:
                status = "rejected"
            else:
                status = "CHOSEN" if p.name == self.chosen else "ok"
            lat = "" if p.latency_seconds is None else f"{p.latency_seconds * 1e3:.2f} ms"
            ratio = "" if not (base and p.latency_seconds) else f"{base / p.latency_seconds:.2f}x"
            err = "" if p.max_abs_error is None else f"{p.max_abs_error:.1e}"
            comp = "" if p.compile_useful is None else ("useful" if p.compile_useful else "no")
            rows.append([p.name, status, lat, ratio, err, comp])
        lines = [f"attention swap for {self.model} ({self.kind}): {self.chosen}"]
        lines.append(render_table(head, rows))
        for p in self.paths:
            if p.reason:
                lines.append(f"  {p.name}: {p.reason}")
        if self.reverted:
            lines.append("outputs: NOT verified: the swap was undone, the model is unchanged")
        elif self.chosen == ORIGINAL:
            lines.append(f"outputs: the original path was kept: {self.reason}")
        else:
            v = {None: "not verified (no example inputs)", True: "verified", False: "NOT verified"}
            lines.append(f"outputs: {v[self.verified]}")
        lines.append(
            f"compile: {'useful' if self.compile_useful else 'not useful'}: {self.compile_reason}"
        )
        lines.append(f"selection: {self._selection()}")
        for title, items in (("before", self.fastpath_before), ("after", self.fastpath_after)):
            for mod, why in items:
                lines.append(f"fastpath {title}: {mod}: {why or 'taken'}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _selection(self) -> str:
        took = f"{self.selection_seconds:.2f} s"
        if self.from_cache:
            return f"{took}, from the decision cache (nothing timed)"
        if not self.measured:
            return f"{took}, by rule (no example inputs)"
        on = (
            f"timed on {self.measured_on[0]} of {self.measured_on[1]} rows"
            if self.measured_on
            else "timed on the whole example"
        )
        budget = "no budget" if self.budget_seconds is None else f"budget {self.budget_seconds:g} s"
        return f"{took}, {on} ({budget})"


# --------------------------------------------------------------------------------------------
# Registry of user replacements
# --------------------------------------------------------------------------------------------

REGISTRY: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {}
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
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise ConfigError(
            f"register_attention_swap needs an nn.Module subclass, got {module_class!r}"
        )

    def register(fn: F_) -> F_:
        if not callable(fn):
            raise ConfigError(f"the factory for {module_class.__name__} must be callable")
        REGISTRY[module_class] = fn
        return fn

    return register if factory is None else register(factory)  # type: ignore[arg-type]


def unregister_attention_swap(module_class: type[nn.Module]) -> None:
    REGISTRY.pop(module_class, None)

"""Inductor freezing for CPU inference: weights become constants the compiler can fold.

Without freezing, Inductor treats every parameter as a graph input, so on CPU a compiled encoder is
little faster than eager. With ``torch._inductor.config.freezing`` (only meaningful when grad is
off, as in compile_model's warm-up under ``inference_mode``), parameters are constants: the
compiler folds what depends only on them (transposes, concatenations, dtype casts), picks weight
layouts once, and fuses more.

``compile_model(freezing=...)``:

* ``"auto"`` (default): freezing on for the inductor backend on CPU inputs, with oneDNN weight
  prepacking **off**: the frozen graph then still goes into the FX-graph cache (a warm start is all
  cache hits, as before).
* ``"prepack"``: freezing plus oneDNN weight prepacking (CPU). Prepacked weights are copies in a
  blocked layout that cannot be pickled: inductor bypasses the FX-graph cache for such graphs (a warm
  start re-runs lowering; the compiled kernels are still reused from the cache folder). Measure it
  against ``"auto"`` before choosing it.
* ``"off"``: torch.compile's default.

With freezing the weights are compile-time constants: after changing them, compile again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from fastinfer import _torch_compat
from fastinfer.errors import ConfigError

__all__ = ["FREEZING_MODES", "freezing_config", "freezing_mode"]

FREEZING_MODES = ("auto", "off", "prepack")


def freezing_mode(freezing: str, backend: str, cpu: bool, options: Mapping[str, Any] | None) -> str:
    """What compile_model applies: ``"on"``, ``"prepack"`` or ``"off"``."""
    if freezing not in FREEZING_MODES:
        raise ConfigError(f"freezing must be one of {list(FREEZING_MODES)}, got {freezing!r}")
    if options and "freezing" in options:  # the caller set it through inductor options
        return "on" if options["freezing"] else "off"
    if freezing == "off":
        return "off"
    if backend != "inductor":
        if freezing == "prepack":
            raise ConfigError(
                f"freezing='prepack' needs the inductor backend, got {backend!r}; "
                "use freezing='off' with other backends"
            )
        return "off"
    if freezing == "prepack":
        return "prepack"
    return "on" if cpu else "off"


@contextlib.contextmanager
def freezing_config(mode: str) -> Iterator[None]:
    """Inductor settings for ``mode`` while the block runs (the warm-up compiles inside it)."""
    if mode not in ("on", "prepack"):
        yield
        return
    with _torch_compat.inductor_config_patch(
        {"freezing": True, "cpp.weight_prepack": mode == "prepack"}
    ):
        yield

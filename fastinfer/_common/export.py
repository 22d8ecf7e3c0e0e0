"""How a ``statistics()`` field says which metric it is exported as.

Every long-lived object's frozen statistics dataclass declares, per field, how
:meth:`fastinfer.MetricsRecorder.track` exports it: as a counter or a gauge, whether it feeds one of
the standard ``fastinfer_*`` metrics (and with which constant labels), the label for a dict
field's keys, and the unit of a field in sub-units. The coupling goes one way: a primitive declares,
the metrics module reads; no primitive imports the metrics module, and renaming a field cannot
silently drop a standard metric (``tests/test_layout.py`` checks every field is declared and every
standard name exists).

    @dataclass(frozen=True)
    class FooStatistics:
        queue_depth: int = gauge(standard="fastinfer_queue_depth")
        requests_ok: int = counter(standard="fastinfer_requests_total", labels={"outcome": "ok"})
        max_wait_ms: float = gauge(unit="ms")        # exported as <prefix>_max_wait_seconds
        notes: tuple[str, ...] = not_exported("text")

The helpers return ``dataclasses.field(...)``; ``default=`` / ``default_factory=`` pass through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["METADATA_KEY", "Export", "counter", "export_of", "gauge", "not_exported"]

METADATA_KEY = "fastinfer.export"

#: Sub-units a field may be declared in, and their factor to the base unit (seconds).
SUBUNITS: dict[str, float] = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class Export:
    """One field's export declaration (``kind=None``: not exported, ``reason`` says why)."""

    kind: Literal["counter", "gauge"] | None
    standard: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    key_label: str = "key"
    unit: str = ""
    reason: str = ""


def _field(export: Export, field_options: Mapping[str, Any]) -> Any:
    unknown = set(field_options) - {"default", "default_factory"}
    if unknown:
        raise TypeError(f"unexpected field option(s) {sorted(unknown)}")
    return dataclasses.field(metadata={METADATA_KEY: export}, **field_options)


def _check(unit: str, labels: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    if unit and unit not in SUBUNITS:
        raise ValueError(f"unit must be one of {sorted(SUBUNITS)} or '', got {unit!r}")
    return tuple(sorted((labels or {}).items()))


def counter(
    *,
    standard: str | None = None,
    labels: Mapping[str, str] | None = None,
    key_label: str = "key",
    **field_options: Any,
) -> Any:
    """A monotonically increasing total (absolute, as the object counts it)."""
    return _field(Export("counter", standard, _check("", labels), key_label), field_options)


def gauge(
    *,
    standard: str | None = None,
    labels: Mapping[str, str] | None = None,
    key_label: str = "key",
    unit: str = "",
    **field_options: Any,
) -> Any:
    """A value that goes up and down. ``unit="ms"`` exports ``x_ms`` as ``x_seconds`` (scaled)."""
    return _field(Export("gauge", standard, _check(unit, labels), key_label, unit), field_options)


def not_exported(reason: str, **field_options: Any) -> Any:
    """A field that is not a number to export (text, nested records); ``reason`` says so."""
    if not reason:
        raise ValueError("not_exported() needs a reason")
    return _field(Export(None, reason=reason), field_options)


def export_of(f: dataclasses.Field[Any]) -> Export | None:
    """The declaration on a dataclass field, or None when it has none."""
    found = f.metadata.get(METADATA_KEY)
    return found if isinstance(found, Export) else None

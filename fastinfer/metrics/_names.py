"""Metric and label names, units and kinds: the Prometheus rules, checked where names enter."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal, cast

from fastinfer.errors import ConfigError, MetricNameError

__all__ = [
    "GAUGE_MODES",
    "LABEL_NAME",
    "GaugeMode",
    "Kind",
    "check_help",
    "check_unit",
    "validate_labels",
    "validate_name",
]

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
UNIT = re.compile(r"^[a-z][a-z0-9_]*$")
NON_BASE_UNITS = {
    "ms": "seconds", "milliseconds": "seconds", "us": "seconds", "microseconds": "seconds",
    "ns": "seconds", "nanoseconds": "seconds", "minutes": "seconds", "hours": "seconds",
    "kb": "bytes", "mb": "bytes", "gb": "bytes", "kilobytes": "bytes", "megabytes": "bytes",
}  # fmt: skip
GaugeMode = Literal["worker", "sum", "max", "min", "last"]
GAUGE_MODES = ("worker", "sum", "max", "min", "last")
Kind = Literal["counter", "gauge", "histogram"]


def validate_name(name: object, what: str = "metric") -> str:
    if not isinstance(name, str) or not METRIC_NAME.match(name):
        raise MetricNameError(
            f"invalid {what} name {name!r}: Prometheus names match [a-zA-Z_:][a-zA-Z0-9_:]* "
            "(letters, digits, '_' and ':'; not starting with a digit). "
            "Fix: use snake_case such as 'myapp_request_latency_seconds'."
        )
    if name.startswith("__"):
        raise MetricNameError(
            f"invalid {what} name {name!r}: names starting with '__' are reserved"
        )
    return name


def validate_labels(metric: str, labels: object, *, kind: str) -> tuple[str, ...]:
    if isinstance(labels, str):
        raise ConfigError(
            f"labels of {metric!r} must be a sequence of names, got the string {labels!r}; "
            f"write labels=({labels!r},)"
        )
    names = tuple(cast("Iterable[str]", labels))
    for label in names:
        if not isinstance(label, str) or not LABEL_NAME.match(label) or label.startswith("__"):
            raise MetricNameError(
                f"invalid label name {label!r} on metric {metric!r}: Prometheus label names match "
                "[a-zA-Z_][a-zA-Z0-9_]* and must not start with '__'. Fix: use snake_case."
            )
        if kind == "histogram" and label == "le":
            raise MetricNameError(
                f"label 'le' is reserved for histogram buckets (metric {metric!r}); rename it"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MetricNameError(f"metric {metric!r} repeats label names {dupes}; name each once")
    return names


def check_unit(name: str, unit: str) -> str:
    if not isinstance(unit, str) or (unit and not UNIT.match(unit)):
        raise MetricNameError(f"metric {name!r}: unit must be a lowercase word, got {unit!r}")
    suffix = name.rsplit("_", 1)[-1].lower() if "_" in name else ""
    for bad in (unit, suffix):
        if bad in NON_BASE_UNITS:
            base = NON_BASE_UNITS[bad]
            raise MetricNameError(
                f"metric {name!r} uses unit {bad!r}: record base units ({base}) as Prometheus does. "
                f"Fix: name it '..._{base}' and observe {base} (e.g. 0.012 for 12 ms)"
            )
    if unit and not name.endswith("_" + unit):
        raise MetricNameError(
            f"metric {name!r} has unit {unit!r} but its name does not end in '_{unit}'; "
            f"rename it to '{name}_{unit}' (Prometheus convention)"
        )
    return unit


def check_help(name: str, help: object) -> str:
    """A help text must be a ``str`` that can be written as UTF-8 (Prometheus text is UTF-8)."""
    if not isinstance(help, str):
        raise ConfigError(f"metric {name!r}: help must be a string, got {type(help).__name__}")
    if not help.isascii():
        try:
            help.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"metric {name!r}: help {help!r} is not valid Unicode text (a lone surrogate at "
                f"position {e.start}) and could not be exported; pass readable text"
            ) from None
    return help

"""The registry of private torch APIs: an entry per API, each with its probe."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ENTRIES", "TESTED_TORCH", "Entry", "check", "entry", "params"]

#: The torch release the whole suite runs on in CI; every probe below is checked there.
TESTED_TORCH = "2.13"


@dataclass(frozen=True)
class Entry:
    """One private torch API: what it is, who uses it, where it is known to work, and its probe.

    ``probe()`` returns ``""`` when the API has the expected shape on this torch, else why not.
    """

    name: str
    api: str
    used_by: str
    known_versions: str
    probe: Callable[[], str]


ENTRIES: dict[str, Entry] = {}


def entry(name: str, api: str, used_by: str, known_versions: str) -> Callable[..., Any]:
    def register(probe: Callable[[], str]) -> Callable[[], str]:
        ENTRIES[name] = Entry(name, api, used_by, known_versions, probe)
        return probe

    return register


def check(name: str) -> str:
    """The probe's verdict for entry ``name`` ("" when the API holds), never raising."""
    try:
        return ENTRIES[name].probe()
    except Exception as exc:  # a probe that crashes is a failed probe
        return f"probe raised {type(exc).__name__}: {exc}"


def params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []

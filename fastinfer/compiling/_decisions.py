"""select_backend's decision records: one is reused only when it answers the request that looks
it up, and a record that cannot be stored (a read-only, full or blocked cache folder) costs the
next start a measurement, never this selection."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastinfer._common.files import atomic_write_text, decision_not_stored
from fastinfer.compiling._report import BackendReport, pick_winner

__all__ = ["load_decision", "store_decision"]

logger = logging.getLogger("fastinfer.compiling")


def load_decision(
    record: Path, *, key: str, names: list[str], sizes: tuple[int, ...], margin: float
) -> tuple[BackendReport | None, str]:
    """``(report, "")`` when ``record`` holds the decision for this request; ``(None, note)``
    when it is ignored (unreadable, or edited or written for another request), the note saying
    which file, why, and that the selection measures again (also logged as a warning)."""
    try:
        report = BackendReport.from_dict(json.loads(record.read_text()), from_cache=True)
        why = _mismatch(report, key=key, names=names, sizes=sizes, margin=margin)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        why = f"it is unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if not why:
        return report, ""
    note = f"ignoring the cached decision in {record}: {why}: measuring again"
    logger.warning("select_backend: %s", note)
    return None, note


def _mismatch(
    report: BackendReport, *, key: str, names: list[str], sizes: tuple[int, ...], margin: float
) -> str:
    """Why a well-formed record does not answer this request ("" when it does)."""
    if report.key != key:
        return f"its key field is {report.key[:16]!r}, not this request's {key[:16]!r}"
    if report.batch_sizes != sizes:
        return f"it is for batch sizes {report.batch_sizes}, not {sizes}"
    have = [r.name for r in report.results]
    if have != names:
        return f"its candidates are {have}, not {names}"
    if report.margin != margin:
        return f"its margin is {report.margin!r}, not {margin!r}"
    if report.winner not in names:
        return f"its winner {report.winner!r} is not one of the candidates {names}"
    rule = pick_winner(report.results, report.margin)
    if report.winner != rule:
        return f"its winner {report.winner!r} is not the one its own results give ({rule!r})"
    return ""


def store_decision(record: Path, report: BackendReport) -> str:
    """Write ``report`` to ``record``; "" when stored, else a note (also logged as a warning)
    saying that it was not, why, and the fix."""
    try:
        atomic_write_text(record, report.to_json())
    except OSError as exc:  # read-only, full, or a file where the folder goes
        why = decision_not_stored(record.parent, exc)
        logger.warning("select_backend: %s", why)
        return why
    return ""

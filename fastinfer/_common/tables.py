"""Plain-text tables for reports (``print(report)``): one renderer, one look."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render_table"]


def render_table(
    head: Sequence[object], rows: Sequence[Sequence[object]], *, align: str = "left"
) -> str:
    """Columns separated by two spaces, a dashed rule under the header, trailing blanks stripped.

    ``align="right"`` right-aligns every column (figures); the default left-aligns them.
    """
    cells = [[str(c) for c in head], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in cells) for i in range(len(cells[0]))]

    def line(r: Sequence[str]) -> str:
        just = [c.rjust(w) if align == "right" else c.ljust(w) for c, w in zip(r, widths)]
        return "  ".join(just).rstrip()

    lines = [line(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in cells[1:]]
    return "\n".join(lines)

"""How a MetricsSnapshot prints: a text table, an HTML table for notebooks, a matplotlib plot."""

from __future__ import annotations

import functools
import html as _html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastinfer._common.tables import render_table
from fastinfer._optional import require
from fastinfer.errors import ConfigError

if TYPE_CHECKING:
    from fastinfer.metrics._snapshot import MetricsSnapshot

__all__ = ["fmt", "html", "plot", "text"]

HEAD = ("metric", "labels", "kind", "count/value", "mean", "p50", "p90", "p99", "p99.9", "max")


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "seconds":
        a = abs(v)
        if a >= 1 or a == 0:
            return f"{v:.3g} s"
        if a >= 1e-3:
            return f"{v * 1e3:.3g} ms"
        return f"{v * 1e6:.3g} µs"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def rows(snapshot: MetricsSnapshot) -> list[list[str]]:
    rows = []
    for m in snapshot.metrics.values():
        for s in m.series:
            labels = ",".join(f"{k}={v}" for k, v in s.labels.items())
            if m.kind == "histogram":
                f = functools.partial(fmt, unit=m.unit)
                rows.append(
                    [
                        m.name,
                        labels,
                        m.kind,
                        str(s.count),
                        f(s.mean),
                        f(s.p50),
                        f(s.p90),
                        f(s.p99),
                        f(s.p999),
                        f(s.max),
                    ]
                )
            else:
                rows.append([m.name, labels, m.kind, fmt(s.value, m.unit), *[""] * 6])
    return rows


def text(snapshot: MetricsSnapshot) -> str:
    body = rows(snapshot)
    if not body:
        return "(no metrics)"
    return render_table(HEAD, body)


def html(snapshot: MetricsSnapshot) -> str:
    head = "".join(f"<th>{_html.escape(h)}</th>" for h in HEAD)
    body = "".join(
        "<tr>" + "".join(f"<td>{_html.escape(c)}</td>" for c in r) + "</tr>" for r in rows(snapshot)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot(snapshot: MetricsSnapshot, names: Sequence[str] | None = None) -> Any:
    """Draw each histogram's distribution with its p50/p99 (matplotlib). Returns the figure."""
    plt = require("matplotlib.pyplot", purpose="MetricsSnapshot.plot()")
    hists = [
        m
        for m in snapshot.metrics.values()
        if m.kind == "histogram" and (names is None or m.name in names)
    ]
    if names is not None:
        missing = sorted(set(names) - {m.name for m in hists})
        if missing:
            raise ConfigError(
                f"plot(): no histogram named {missing}; have {sorted(snapshot.metrics)}"
            )
    if not hists:
        raise ConfigError("plot(): this snapshot has no histograms to draw")
    fig, axes = plt.subplots(len(hists), 1, figsize=(7, 2.6 * len(hists)), squeeze=False)
    for ax, m in zip(axes[:, 0], hists):
        for s in m.series:
            if not s.count:
                continue
            edges = [s.min if s.min is not None else 0.0, *m.buckets]
            lows = [max(edges[i], s.min or 0.0) for i in range(len(m.buckets))]
            highs = [min(b, s.max if s.max is not None else b) for b in m.buckets]
            xs, ys = [], []
            for lo, hi, c in zip(lows, highs, s.bucket_counts):
                if c and hi > lo:
                    xs.append((lo + hi) / 2)
                    ys.append(c / s.count / (hi - lo))
                elif c:
                    xs.append(hi)
                    ys.append(c / s.count)
            label = ",".join(f"{k}={v}" for k, v in s.labels.items()) or m.name
            ax.plot(xs, ys, marker=".", label=label)
            for q, style in ((s.p50, "--"), (s.p99, ":")):
                if q is not None:
                    ax.axvline(q, linestyle=style, color="gray")
        if m.unit == "seconds" or m.midpoint:
            ax.set_xscale("log")
        ax.set_title(f"{m.name} (dashed p50, dotted p99)")
        ax.set_xlabel(m.unit or "value")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig

"""Small SVG line charts drawn on the server: they show with JavaScript off and need no library.

`line_chart(points, ...)` scales (t, value) points into a fixed viewBox and draws a polyline,
the axis range and the last value. `series_from_metrics(records)` turns stored metrics records
(newest first, as `FleetStore.records` returns them) into per-function series of invocations,
error rate and p95 latency per interval; p95 comes from each interval's latency histogram
(`cloud_sync.rollout.metrics.Histogram.quantile`, the same estimate the rollout gates use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cloud_sync.platform.ui.html import Html, h
from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.metrics import Histogram

WIDTH, HEIGHT, PAD = 320, 90, 4
Series = list[tuple[float, float]]


def series_from_metrics(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Series]]:
    """function -> {"invocations", "error_rate", "p95_ms"} -> [(interval_end, value)].

    Oldest first (the records come newest first)."""
    out: dict[str, dict[str, Series]] = {}
    for rec in reversed(records):
        value = rec.get("value")
        if not isinstance(value, dict) or not isinstance(value.get("functions"), dict):
            continue
        t = value.get("interval_end")
        if not isinstance(t, int | float):
            continue
        for name, entry in value["functions"].items():
            if not isinstance(entry, dict):
                continue
            inv = _count(entry.get("invocations"))
            err = _count(entry.get("errors"))
            fn = out.setdefault(str(name), {"invocations": [], "error_rate": [], "p95_ms": []})
            fn["invocations"].append((float(t), float(inv)))
            fn["error_rate"].append((float(t), err / inv if inv else 0.0))
            p95 = _p95(entry.get("latency_ms"))
            if p95 is not None:
                fn["p95_ms"].append((float(t), p95))
    return out


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _p95(raw: Any) -> float | None:
    if not isinstance(raw, dict):
        return None
    try:
        hist = Histogram(
            tuple(float(b) for b in raw["bounds"]), tuple(int(c) for c in raw["counts"])
        )
    except (KeyError, TypeError, ValueError, MessageError):
        return None
    q = hist.quantile(0.95)
    if q is None:
        return None
    return q if math.isfinite(q) else hist.bounds[-1]


def line_chart(
    points: Series,
    *,
    title: str,
    unit: str = "",
    percent: bool = False,
    bound: float | None = None,
) -> Html:
    """The series as a polyline; with `bound`, a dashed line at it (a gate's limit) in scale."""

    def fmt(v: float) -> str:
        return f"{v * 100:.1f}%" if percent else f"{v:.4g}{unit}"

    if not points:
        return h('<figure class="chart"><figcaption>$t</figcaption><p class="muted">no data'
                 "</p></figure>", t=title)  # fmt: skip
    ts = [t for t, _ in points]
    vs = [v for _, v in points]
    t0, t1 = min(ts), max(ts)
    top = max([*vs, bound if bound is not None and math.isfinite(bound) else 0.0]) or 1.0
    span = (t1 - t0) or 1.0

    def y(v: float) -> float:
        return HEIGHT - PAD - max(0.0, v) / top * (HEIGHT - 2 * PAD)

    def xy(t: float, v: float) -> str:
        x = PAD + (t - t0) / span * (WIDTH - 2 * PAD)
        return f"{x:.1f},{y(v):.1f}"

    poly = " ".join(xy(t, v) for t, v in points)
    limit = Html("")
    if bound is not None and math.isfinite(bound):
        limit = h(
            '<line class="bound" x1="$x0" x2="$x1" y1="$y" y2="$y"><title>bound $b</title></line>',
            x0=PAD, x1=WIDTH - PAD, y=f"{y(bound):.1f}", b=fmt(bound),
        )  # fmt: skip
    return h(
        '<figure class="chart"><figcaption>$title <span class="muted">last $last, max $top$bnd'
        '</span></figcaption><svg viewBox="0 0 $w $ht" width="$w" height="$ht" role="img"'
        ' aria-label="$title"><rect x="0" y="0" width="$w" height="$ht" class="bg"/>$limit'
        '<polyline fill="none" class="line" points="$poly"/></svg></figure>',
        title=title, last=fmt(vs[-1]), top=fmt(top), w=WIDTH, ht=HEIGHT, poly=poly,
        bnd="" if bound is None else f", bound {fmt(bound)}", limit=limit,
    )  # fmt: skip


def gate_series(history: Any) -> dict[str, tuple[Series, float | None]]:
    """gate text -> ([(t, value)], its bound) from a rollout's `gate_history` (oldest first).

    Points without a value (not enough samples yet) are left out; the bound is the last one
    seen, since a relative gate's bound moves with the previous version's figures."""
    out: dict[str, tuple[Series, float | None]] = {}
    for point in history if isinstance(history, list) else ():
        t = point.get("t") if isinstance(point, dict) else None
        if not isinstance(t, int | float) or isinstance(t, bool):
            continue
        for g in point.get("gates") or ():
            if not isinstance(g, dict) or not isinstance(g.get("gate"), str):
                continue
            series, bound = out.get(g["gate"], ([], None))
            value, b = g.get("value"), g.get("bound")
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.append((float(t), float(value)))
            if isinstance(b, int | float) and not isinstance(b, bool):
                bound = float(b)
            out[g["gate"]] = (series, bound)
    return out


def progress_bar(done: int, total: int, *, label: str = "") -> Html:
    pct = 0.0 if total <= 0 else min(100.0, 100.0 * done / total)
    return h(
        '<div class="progress" title="$label"><div class="bar" style="width:$pct%"></div>'
        "<span>$done / $total</span></div>",
        label=label, pct=f"{pct:.1f}", done=done, total=total,
    )  # fmt: skip

"""Small SVG line charts drawn on the server: they show with JavaScript off and need no library.

`line_chart(points, ...)` scales (t, value) points into a fixed viewBox and draws a polyline,
the last and the largest value (and, with `marks`, a dot per point whose tooltip is its mark:
a single point is then still drawn, which a one-point polyline is not). `gate_series` reads a
rollout's `gate_history`. `series_from_metrics(records)` turns stored metrics records (newest
first, as `FleetStore.records` returns them) into per-function series of invocations,
error rate and p95 latency per interval; p95 comes from each interval's latency histogram
(`cloud_sync.rollout.metrics.Histogram.quantile`, the same estimate the rollout gates use).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from cloud_sync.platform.ui.html import Html, h, join
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
    marks: Sequence[str] | None = None,
) -> Html:
    """The series as a polyline; with `bound`, a dashed line at it (a gate's limit) in scale;
    with `marks` (one text per point), a dot per point with that text as its tooltip.

    The y axis runs from 0 to the largest of the values and the bound, so the bound is always
    in view; the caption's "max" is the largest value, not the axis top."""

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

    def x(t: float) -> float:
        return PAD + (t - t0) / span * (WIDTH - 2 * PAD)

    poly = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    dots = join(
        h('<circle class="dot" cx="$x" cy="$y" r="2.5"><title>$m</title></circle>',
          x=f"{x(t):.1f}", y=f"{y(v):.1f}", m=mark)
        for (t, v), mark in zip(points, marks or (), strict=False)
    )  # fmt: skip
    limit = Html("")
    if bound is not None and math.isfinite(bound):
        limit = h(
            '<line class="bound" x1="$x0" x2="$x1" y1="$y" y2="$y"><title>bound $b</title></line>',
            x0=PAD, x1=WIDTH - PAD, y=f"{y(bound):.1f}", b=fmt(bound),
        )  # fmt: skip
    return h(
        '<figure class="chart"><figcaption>$title <span class="muted">last $last, max $peak$bnd'
        '</span></figcaption><svg viewBox="0 0 $w $ht" width="$w" height="$ht" role="img"'
        ' aria-label="$title"><rect x="0" y="0" width="$w" height="$ht" class="bg"/>$limit'
        '<polyline fill="none" class="line" points="$poly"/>$dots</svg></figure>',
        title=title, last=fmt(vs[-1]), peak=fmt(max(vs)), w=WIDTH, ht=HEIGHT, poly=poly,
        bnd="" if bound is None else f", bound {fmt(bound)}", limit=limit, dots=dots,
    )  # fmt: skip


class GateSeries(NamedTuple):
    points: Series
    bound: float | None  # the last bound seen
    marks: list[str]  # per point: "wave W, HH:MM:SS UTC: value (outcome)", its tooltip


def gate_series(history: Any) -> dict[str, GateSeries]:
    """gate text -> its points, bound and marks from a rollout's `gate_history` (oldest first).

    Points without a value (not enough samples yet) are left out; the bound is the last one
    seen, since a relative gate's bound moves with the previous version's figures."""
    out: dict[str, GateSeries] = {}
    for point in history if isinstance(history, list) else ():
        t = _finite(point.get("t")) if isinstance(point, dict) else None
        if t is None or not 0 <= t < 1e11:  # a time a chart (and gmtime) can place
            continue
        when = time.strftime("%H:%M:%S", time.gmtime(t))
        for g in point.get("gates") or ():
            if not isinstance(g, dict) or not isinstance(g.get("gate"), str):
                continue
            series = out.setdefault(g["gate"], GateSeries([], None, []))
            value, bound = _finite(g.get("value")), _finite(g.get("bound"))
            if value is not None:
                series.points.append((t, value))
                outcome = f" ({g['outcome']})" if g.get("outcome") else ""
                wave = wave_number(point.get("wave"))
                series.marks.append(f"wave {wave}, {when} UTC: {value:.4g}{outcome}")
            if bound is not None:
                out[g["gate"]] = series._replace(bound=bound)
    return out


def wave_number(index: Any) -> str:
    """A stored wave index (from 0) as people number waves (from 1), as the controller's stop
    reasons and `edge-cloud rollout status` do; "?" for anything that is not an index."""
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 1000:
        return str(index + 1)
    return "?"


def _finite(value: Any) -> float | None:
    """A stored number as a float; None for anything else (text, booleans, inf, NaN)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past float's range (JSON allows any size)
        return None
    return number if math.isfinite(number) else None


def progress_bar(done: int, total: int, *, label: str = "") -> Html:
    pct = 0.0 if total <= 0 else min(100.0, 100.0 * done / total)
    return h(
        '<div class="progress" title="$label"><div class="bar" style="width:$pct%"></div>'
        "<span>$done / $total</span></div>",
        label=label, pct=f"{pct:.1f}", done=done, total=total,
    )  # fmt: skip

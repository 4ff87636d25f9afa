"""Page bodies of the console (Fleet, Device, Functions): data in, escaped `Html` out."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

from cloud_sync.platform.store import VersionRecord
from cloud_sync.platform.ui.charts import line_chart, series_from_metrics
from cloud_sync.platform.ui.fleet_view import STATES, FleetPage, FleetQuery
from cloud_sync.platform.ui.html import Html, h, join


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, (time.time() if now is None else now) - ts)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def _labels(labels: dict[str, Any], cls: str = "label") -> Html:
    return join(
        h('<span class="$c">$k=$v</span>', c=cls, k=k, v=v) for k, v in sorted(labels.items())
    )


def _extra(row: dict[str, Any]) -> dict[str, Any]:
    """Labels the device reports that enrolment did not set (the same ones shown once)."""
    enrolled = row["labels"]
    return {k: v for k, v in row["reported_labels"].items() if enrolled.get(k) != v}


def fleet_body(q: FleetQuery, page: FleetPage) -> Html:
    c = page.counts
    counts = h(
        '<div class="counts"><span class="online">online <b>$on</b></span>'
        '<span class="offline">offline <b>$off</b></span>'
        '<span class="unhealthy">unhealthy <b>$bad</b></span><span>total <b>$all</b></span></div>',
        on=c.get("online", 0), off=c.get("offline", 0), bad=c.get("unhealthy", 0),
        all=c.get("total", 0),
    )  # fmt: skip
    options = join(
        h(
            '<option value="$s"$sel>$s</option>',
            s=s,
            sel=Html(" selected") if q.state == s else Html(""),
        )
        for s in STATES
    )
    form = h(
        '<form method="get" class="filters" id="fleet-filter">'
        '<input name="q" placeholder="search id" value="$q">'
        '<input name="label" placeholder="label key=value" value="$label">'
        '<select name="state"><option value="">any state</option>$options</select>'
        '<button type="submit">filter</button></form>',
        q=q.search, label=q.label, options=options,
    )  # fmt: skip

    def sort_link(key: str, title: str) -> Html:
        desc = q.sort == key and not q.descending
        params = {"q": q.search, "label": q.label, "state": q.state, "sort": key,
                  "dir": "desc" if desc else "asc"}  # fmt: skip
        return h('<a href="?$p">$t</a>', p=urlencode(params), t=title)

    rows = join(
        h(
            '<tr class="device"><td><a href="/ui/devices/$id">$id</a></td>'
            '<td class="$cls">$state</td><td>$seen</td><td>$labels</td><td>$arch</td>'
            "<td>$agent</td><td>$fns</td></tr>",
            id=r["id"],
            cls="online" if r["online"] else "offline",
            state=("online" if r["online"] else "offline")
            + (" · unhealthy" if r["unhealthy"] else ""),
            seen=ago(r["last_seen"]),
            labels=join([_labels(r["labels"]), _labels(_extra(r), "label reported")]),
            arch=r["arch"] or "",
            agent=r["agent_version"] or "",
            fns=", ".join(f"{k}@{v}" for k, v in sorted(r["functions"].items())),
        )
        for r in page.rows
    )
    pages = max(1, -(-page.total // q.page_size))
    nav = []
    for label, target in (("« prev", q.page - 1), ("next »", q.page + 1)):
        if 1 <= target <= pages:
            params = {"q": q.search, "label": q.label, "state": q.state, "sort": q.sort,
                      "dir": "desc" if q.descending else "asc", "page": target}  # fmt: skip
            nav.append(h('<a href="?$p">$t</a>', p=urlencode(params), t=label))
    return h(
        "$counts$form<table id=\"fleet\"><thead><tr><th>$sid</th><th>$sstate</th><th>$sseen</th>"
        "<th>labels</th><th>$sarch</th><th>agent</th><th>functions</th></tr></thead>"
        '<tbody>$rows</tbody></table>'
        '<p class="pager">page $page of $pages ($total devices) $nav</p>',
        counts=counts, form=form, rows=rows or Html('<tr><td colspan="7">no devices</td></tr>'),
        sid=sort_link("id", "device"), sstate=sort_link("state", "state"),
        sseen=sort_link("last_seen", "last seen"), sarch=sort_link("arch", "arch"),
        page=q.page, pages=pages, total=page.total, nav=join(nav, " "),
    )  # fmt: skip


def _kv_table(doc: dict[str, Any]) -> Html:
    return join(
        h("<tr><th>$k</th><td>$v</td></tr>", k=k, v=_plain(v)) for k, v in sorted(doc.items())
    )


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def device_body(
    device: dict[str, Any],
    desired: dict[str, Any],
    reported: dict[str, Any],
    events: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
) -> Html:
    raw_rollouts = reported.get("rollouts")
    rollouts: dict[str, Any] = raw_rollouts if isinstance(raw_rollouts, dict) else {}
    fn_rows = join(
        h(
            "<tr><td>$n</td><td>$v</td><td>$prev</td><td>$state</td></tr>",
            n=name,
            v=version,
            prev=(rollouts.get(name) or {}).get("previous") or "",
            state=(rollouts.get(name) or {}).get("state") or "",
        )
        for name, version in sorted((device.get("functions") or {}).items())
    )
    applied: Any = reported.get("applied")
    effective: Any = applied.get("config") if isinstance(applied, dict) else None
    effective = effective if isinstance(effective, dict) else {}
    event_rows = join(
        h(
            "<tr><td>$at</td><td>$kind</td><td><code>$value</code></td></tr>",
            at=ago(e.get("received_at")),
            kind=e.get("kind"),
            value=json.dumps(e.get("value"), sort_keys=True)[:300],
        )
        for e in events
    )
    charts = join(
        h(
            '<section class="fn-charts"><h4>$name</h4><div class="charts">$a$b$c</div></section>',
            name=name,
            a=line_chart(s["invocations"], title="invocations / interval"),
            b=line_chart(s["error_rate"], title="error rate", percent=True),
            c=line_chart(s["p95_ms"], title="p95 latency", unit=" ms"),
        )
        for name, s in sorted(series_from_metrics(metrics).items())
    )
    status = "online" if device.get("online") else "offline"
    return h(
        '<h2>$id <span class="$status">$status</span></h2><p>last seen $seen · labels $labels'
        " · config $cs $err</p>"
        '<div class="grid"><section><h3>Hardware profile</h3><table>$profile</table></section>'
        "<section><h3>Functions</h3><table><thead><tr><th>function</th><th>version</th>"
        "<th>previous (rollback)</th><th>last step</th></tr></thead><tbody>$fns</tbody></table>"
        "</section></div>"
        '<div class="grid"><section><h3>Desired config (v$dv)</h3><pre>$desired</pre></section>'
        "<section><h3>Effective config (v$rv)</h3><pre>$effective</pre></section></div>"
        "<h3>Metrics</h3>$charts"
        "<h3>Recent events and rollout steps</h3><table><tbody>$events</tbody></table>",
        id=device.get("id"), status=status, seen=ago(device.get("last_seen")),
        labels=_labels(device.get("labels") or {}), cs=device.get("config_status") or "",
        err=json.dumps(device.get("config_error")) if device.get("config_error") else "",
        profile=_kv_table(device.get("profile") or {}), fns=fn_rows,
        dv=(device.get("config_version") or {}).get("desired"),
        rv=(device.get("config_version") or {}).get("reported"),
        desired=json.dumps(desired, indent=2, sort_keys=True),
        effective=json.dumps(effective, indent=2, sort_keys=True),
        charts=charts or Html('<p class="muted">no metrics stored</p>'),
        events=event_rows or Html('<tr><td>none</td></tr>'),
    )  # fmt: skip


def functions_body(
    functions: dict[str, list[VersionRecord]], distribution: dict[str, dict[str, int]]
) -> Html:
    sections = []
    for name in sorted(set(functions) | set(distribution)):
        rows = join(
            h(
                "<tr><td>$v</td><td>$pub</td><td>$arches</td><td>$size</td><td>$at</td>"
                "<td>$n</td></tr>",
                v=r.version,
                pub=r.publisher,
                arches=", ".join(r.arches) or "any",
                size=f"{r.size / 1024:.1f} KiB",
                at=r.published_at,
                n=distribution.get(name, {}).get(r.version, 0),
            )
            for r in functions.get(name, [])
        )
        dist = distribution.get(name, {})
        total = sum(dist.values())
        bars = join(
            h(
                '<div class="dist"><span>$v</span><div class="progress"><div class="bar"'
                ' style="width:$pct%"></div><span>$n</span></div></div>',
                v=v,
                n=n,
                pct=f"{100 * n / total:.1f}",
            )
            for v, n in sorted(dist.items())
        )
        sections.append(
            h(
                "<section><h3>$name</h3><table><thead><tr><th>version</th><th>publisher key</th>"
                "<th>arches</th><th>size</th><th>published</th><th>devices</th></tr></thead>"
                "<tbody>$rows</tbody></table>$bars</section>",
                name=name,
                rows=rows,
                bars=bars,
            )
        )
    return join(sections) or Html('<p class="muted">the registry is empty</p>')

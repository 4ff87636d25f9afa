"""The Rollouts pages, against a `RolloutSource`: the one seam to the rollout controller.

The controller's store provides the source (`list()`, `get(id)` returning
`cloud_sync.rollout.model.Rollout.status_view()` dicts; `act(id, action)` for pause / resume /
abort; `preview(spec)` for a dry run and `start(spec)` for a new rollout, both taking the
`RolloutSpec.to_dict()` shape). Without one the pages say that rollouts are not available on
this platform: the console never shows made-up data. The methods block (SQLite behind them);
the handlers call them through `asyncio.to_thread`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from cloud_sync.platform.ui.charts import gate_series, line_chart, progress_bar, wave_number
from cloud_sync.platform.ui.html import Html, h, join
from cloud_sync.rollout.states import DeviceState as D

Action = Literal["pause", "resume", "abort"]
ACTIONS: tuple[Action, ...] = ("pause", "resume", "abort")
# Device states that count as done for a wave's progress bar: a device there waits for nothing.
DONE_STATES = frozenset(
    s.value for s in (D.HEALTHY, D.FAILED, D.TIMED_OUT, D.REJECTED, D.ROLLED_BACK, D.CANCELED)
)


class RolloutSource(Protocol):
    def list(self) -> list[dict[str, Any]]: ...

    def get(self, rollout_id: str) -> dict[str, Any] | None: ...

    def act(self, rollout_id: str, action: Action) -> dict[str, Any]: ...

    def preview(self, spec: Mapping[str, Any]) -> dict[str, Any]: ...

    def start(self, spec: Mapping[str, Any]) -> dict[str, Any]: ...


NOT_AVAILABLE = Html('<p class="notice">Rollouts are not available on this platform.</p>')


def list_body(views: list[dict[str, Any]] | None) -> Html:
    if views is None:
        return NOT_AVAILABLE
    rows = join(
        h(
            '<tr><td><a href="/ui/rollouts/$id">$id</a></td><td>$fn</td><td>$v</td>'
            '<td class="state-$st">$st</td><td>$wave</td><td>$reason</td></tr>',
            id=v.get("id"),
            fn=v.get("function"),
            v=v.get("version"),
            st=v.get("state"),
            wave=wave_number(v.get("wave")),
            reason=v.get("reason") or "",
        )
        for v in views
    )
    return h(
        '<p><a class="button" href="/ui/rollouts/new">Start a rollout</a></p>'
        "<table><thead><tr><th>id</th><th>function</th><th>version</th><th>state</th>"
        "<th>wave</th><th>reason</th></tr></thead><tbody>$rows</tbody></table>",
        rows=rows or Html('<tr><td colspan="6">no rollouts yet</td></tr>'),
    )


def detail_body(view: dict[str, Any], csrf: str, state_filter: str) -> Html:
    waves = join(
        h(
            "<tr><td>$i</td><td>$pct%</td><td>$bar</td><td>$states</td></tr>",
            i=wave_number(w.get("index")),
            pct=w.get("percent"),
            bar=progress_bar(
                sum(n for s, n in (w.get("states") or {}).items() if s in DONE_STATES),
                int(w.get("devices") or 0),
            ),
            states=", ".join(f"{s}: {n}" for s, n in (w.get("states") or {}).items()),
        )
        for w in view.get("waves") or []
    )
    gates = join(_gate_row(g) for g in _gates(view.get("gates"), view.get("spec")))
    gate_charts = join(
        line_chart(s.points, title=gate, bound=s.bound, marks=s.marks)
        for gate, s in gate_series(view.get("gate_history")).items()
    )
    devices = [
        d for d in view.get("devices") or [] if not state_filter or d.get("state") == state_filter
    ]
    device_rows = join(
        h(
            '<tr><td><a href="/ui/devices/$d">$d</a></td><td>$w</td><td class="state-$s">$s</td>'
            "<td>$v</td><td>$c</td><td>$st</td><td>$fin</td></tr>",
            d=d.get("device"),
            w=wave_number(d.get("wave")),
            s=d.get("state"),
            v=d.get("version"),
            c=d.get("code") or "",
            st=d.get("started_at") or "",
            fin=d.get("finished_at") or "",
        )
        for d in devices
    )
    buttons = join(
        h(
            '<form method="post" action="/ui/rollouts/$id/$a" class="inline"'
            ' data-confirm="$a rollout $id?"><input type="hidden" name="csrf" value="$csrf">'
            '<button type="submit" name="action" value="$a">$a</button></form>',
            id=view.get("id"),
            a=a,
            csrf=csrf,
        )
        for a in ACTIONS
    )
    states = sorted({str(d.get("state")) for d in view.get("devices") or []})
    options = join(
        h(
            '<option value="$s"$sel>$s</option>',
            s=s,
            sel=Html(" selected") if s == state_filter else Html(""),
        )
        for s in states
    )
    return h(
        '<h2>$fn $v <span class="state-$st">$st</span></h2><p>$reason</p><div>$buttons</div>'
        "<h3>Waves</h3><table><thead><tr><th>wave</th><th>share</th><th>progress</th>"
        "<th>states</th></tr></thead><tbody>$waves</tbody></table>"
        "<h3>Gates</h3><table><thead><tr><th>gate</th><th>value</th><th>bound</th>"
        "<th>samples</th><th>result</th><th>why</th></tr></thead><tbody>$gates</tbody></table>"
        '<div class="charts gate-charts">$gate_charts</div>'
        '<h3>Devices</h3><form method="get"><select name="state"><option value="">all states'
        '</option>$options</select> <button type="submit">filter</button></form>'
        "<table><thead><tr><th>device</th><th>wave</th><th>state</th><th>version</th>"
        "<th>code</th><th>started</th><th>finished</th></tr></thead><tbody>$rows</tbody></table>",
        fn=view.get("function"), v=view.get("version"), st=view.get("state"),
        reason=f"stopped: {view['reason']}" if view.get("reason") else "",
        buttons=buttons, waves=waves, gates=gates, options=options, rows=device_rows,
        gate_charts=gate_charts,
    )  # fmt: skip


def _gates(verdict: Any, spec: Any) -> list[dict[str, Any]]:
    """The last verdict's gates (`gates.Verdict.to_dict()`), else the spec's, not yet judged."""
    if isinstance(verdict, dict) and isinstance(verdict.get("gates"), list):
        return [g for g in verdict["gates"] if isinstance(g, dict)]
    texts = spec.get("gates") if isinstance(spec, dict) else None
    return [{"gate": t, "outcome": "not evaluated yet"} for t in texts or []]


def _gate_row(g: dict[str, Any]) -> Html:
    return h(
        '<tr><td>$n</td><td>$v</td><td>$b</td><td>$samples</td><td class="gate-$r">$r</td>'
        "<td>$why</td></tr>",
        n=g.get("gate"), v=_num(g.get("value")), b=_num(g.get("bound")),
        samples=g.get("samples", ""), r=g.get("outcome") or "", why=g.get("reason") or "",
    )  # fmt: skip


def _num(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def new_form(
    csrf: str, preview: dict[str, Any] | None, values: Mapping[str, str], error: str = ""
) -> Html:
    shown = h('<p class="error">$e</p>', e=error) if error else Html("")
    if preview is not None:
        waves = preview.get("waves") or []
        shown = h(
            '<div class="preview"><h3>Dry run</h3><p>$n devices in $w waves; $i ineligible</p>'
            "<ol>$items</ol></div>",
            n=sum(len(w) for w in waves), w=len(waves), i=len(preview.get("ineligible") or []),
            items=join(h("<li>$d</li>", d=", ".join(map(str, w))) for w in waves),
        )  # fmt: skip
    return h(
        '<form method="post" action="/ui/rollouts/new" class="stack">'
        '<input type="hidden" name="csrf" value="$csrf">'
        '<label>function <input name="function" value="$fn" required></label>'
        '<label>version <input name="version" value="$v" required></label>'
        '<label>target (label selector) <input name="target" value="$t"></label>'
        '<label>waves (percent, comma separated) <input name="waves" value="$w"></label>'
        '<label>gates (one per line) <textarea name="gates">$g</textarea></label>'
        '<div><button name="mode" value="preview">dry run</button> '
        '<button name="mode" value="start">start</button></div></form>$shown',
        csrf=csrf, fn=values.get("function", ""), v=values.get("version", ""),
        t=values.get("target", ""), w=values.get("waves", "10,50,100"),
        g=values.get("gates", ""), shown=shown,
    )  # fmt: skip


def spec_from_form(form: Mapping[str, str]) -> dict[str, Any]:
    """The start form as a `RolloutSpec.to_dict()`-shaped dict; the source validates it."""
    spec: dict[str, Any] = {
        "function": form.get("function", "").strip(),
        "version": form.get("version", "").strip(),
        "target": form.get("target", "").strip(),
        "waves": form.get("waves", "").strip(),
        "gates": [line.strip() for line in form.get("gates", "").splitlines() if line.strip()],
    }
    return spec

"""The rollout page's gate charts in a real headless Chromium: drawn from the stored
`gate_history` in scale against the bound (JavaScript on), the same server-rendered SVG with
JavaScript off, hostile gate texts shown as text, and the chart following new evaluations
without a reload (the page's short polling).

The rollouts are the real pure core's (`tests.test_dashboard_rollouts.CoreSource`): every
evaluation is a `Tick` with the new version's metrics through `controller.step`, which is what
writes `gate_history` on the platform too. Values are read from the DOM, never from pixels.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.platform.ui.charts import HEIGHT, PAD, gate_series, line_chart
from cloud_sync.rollout.controller import Tick, step
from cloud_sync.rollout.metrics import Histogram, VersionMetrics
from cloud_sync.rollout.model import Rollout
from tests.browser import Browser, browser  # noqa: F401  (the session fixture)
from tests.test_dashboard_rollouts import TOKEN, CoreSource, _facts, console_over

IN_CHROMIUM = pytest.mark.ci_may_skip("needs Debian's chromium and chromium-driver")

GATES = ["error_rate<=0.05", "p95_ms<=200"]
BOUNDS = (10.0, 50.0, 100.0, 250.0, 500.0)
# One evaluation each: (errors of 200 invocations, latency histogram counts) and the figures
# the gates see: error rate, and p95 interpolated in its bucket (Histogram.quantile).
EVALS = [
    (2, (0, 100, 80, 20, 0, 0)),  # 0.01, 100 + 150 * 10/20 = 175
    (6, (0, 60, 110, 30, 0, 0)),  # 0.03, 100 + 150 * 20/30 = 200: on the bound
    (4, (20, 120, 60, 0, 0, 0)),  # 0.02, 50 + 50 * 50/60 = 91.67
    (1, (0, 150, 50, 0, 0, 0)),  # 0.005, 50 + 50 * 40/50 = 90
]
EXPECTED = {
    "error_rate<=0.05": ([0.01, 0.03, 0.02, 0.005], 0.05),
    "p95_ms<=200": ([175.0, 200.0, 50 + 50 * 50 / 60, 90.0], 200.0),
}
WAIT_S = 15.0  # the page polls every 3 s

# Every gate chart as the browser has it: caption, aria label, bound line, dots, polyline.
READ_CHARTS = """
return [...document.querySelectorAll('main .gate-charts figure.chart')].map((f) => {
  const svg = f.querySelector('svg'), line = f.querySelector('line.bound');
  const poly = f.querySelector('polyline.line');
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  return {
    caption: f.querySelector('figcaption').textContent,
    label: svg && svg.getAttribute('aria-label'),
    svg: svg && box(svg),
    bound: line && {y: +line.getAttribute('y1'), y2: +line.getAttribute('y2'),
                    title: line.querySelector('title').textContent},
    points: poly ? poly.getAttribute('points').trim().split(/\\s+/).length : 0,
    poly: poly && [poly.getBBox().width, poly.getBBox().height],
    dots: [...f.querySelectorAll('circle.dot')].map((c) => ({
      x: +c.getAttribute('cx'), y: +c.getAttribute('cy'), box: box(c),
      title: c.querySelector('title').textContent})),
  };
});
"""


class GateSource(CoreSource):
    """CoreSource plus `evaluate`: one gate evaluation of the new version's metrics."""

    def evaluate(self, rollout_id: str, now: float, errors: int, counts: tuple[int, ...]) -> None:
        current = VersionMetrics(invocations=200, errors=errors, latency=Histogram(BOUNDS, counts))
        with self.lock:
            r, _ = step(self.rollouts[rollout_id], Tick(now, current))
            self.rollouts[rollout_id] = r


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, GateSource]]:
    source = GateSource(_facts(10))
    with console_over(tmp_path, source) as url:
        yield url, source


def _seed(source: GateSource, evaluations: int) -> tuple[str, float]:
    """A running rollout with `evaluations` gate evaluations, 30 s apart (the spec's interval)."""
    view = source.start({"function": "resize", "version": "1.4.0", "target": "group=west",
                         "waves": "50,100", "gates": GATES})  # fmt: skip
    t0 = time.time()
    for i in range(evaluations):
        source.evaluate(view["id"], t0 + 30 * (i + 1), *EVALS[i])
    history = source.rollouts[view["id"]].gate_history
    assert len(history) == evaluations and source.rollouts[view["id"]].state.value == "running"
    return str(view["id"]), t0


def _login(b: Browser, url: str) -> None:
    b.reset()
    b.get(url + "/ui/login")
    b.type("#secret", TOKEN)
    b.click("#login button")
    b.wait_find("#fleet")


def _check_drawn(charts: list[dict[str, Any]], evaluations: int) -> None:
    """Each gate's chart: its caption, every stored value as a dot in scale, the bound line."""
    assert [c["label"] for c in charts] == list(EXPECTED)
    for chart in charts:
        values, bound = EXPECTED[chart["label"]]
        values = values[:evaluations]
        last, peak = f"{values[-1]:.4g}", f"{max(values):.4g}"
        assert chart["caption"] == f"{chart['label']} last {last}, max {peak}, bound {bound:.4g}"
        assert chart["svg"] == [320, 90]  # laid out, not hidden
        assert chart["points"] == len(chart["dots"]) == evaluations
        assert all(d["box"][0] > 0 and d["box"][1] > 0 for d in chart["dots"])  # drawn
        if evaluations > 1:
            assert chart["poly"][0] > 0  # the line is drawn across the chart
        xs = [d["x"] for d in chart["dots"]]
        assert xs == sorted(xs) and len(set(xs)) == evaluations  # in time order
        # In scale: y = HEIGHT - PAD - value / top * (HEIGHT - 2 PAD), top = max(values, bound).
        top = max(*values, bound)
        for d, v in zip(chart["dots"], values, strict=True):
            assert abs(d["y"] - (HEIGHT - PAD - v / top * (HEIGHT - 2 * PAD))) <= 0.051, (d, v)
            assert d["title"].endswith(f"UTC: {v:.4g} (pass)") and d["title"].startswith("wave 1,")
        assert chart["bound"]["y"] == chart["bound"]["y2"]
        assert abs(chart["bound"]["y"] - (HEIGHT - PAD - bound / top * (HEIGHT - 2 * PAD))) < 0.06
        assert chart["bound"]["title"] == f"bound {bound:.4g}"
        for d, v in zip(chart["dots"], values, strict=True):  # below the bound, or on it
            assert d["y"] >= chart["bound"]["y"] if v <= bound else d["y"] < chart["bound"]["y"]


@IN_CHROMIUM
def test_gate_charts_are_drawn_from_the_stored_history(
    browser: Browser,  # noqa: F811
    console: tuple[str, GateSource],
    tmp_path: Path,
) -> None:
    b = browser
    url, source = console
    rid, _ = _seed(source, 3)
    _login(b, url)
    b.get(f"{url}/ui/rollouts/{rid}")
    b.wait_find("main .gate-charts figure.chart")
    assert b.script("return typeof window.poll") == "function"  # ui.js ran: JavaScript is on
    charts = b.script(READ_CHARTS)
    _check_drawn(charts, 3)
    # The p95 gate's second value is its bound: that dot sits on the dashed line.
    p95 = next(c for c in charts if c["label"] == "p95_ms<=200")
    assert p95["dots"][1]["y"] == p95["bound"]["y"]
    # The gate table beside the charts shows the last evaluation, from the same stored verdict.
    last = source.rollouts[rid].gate_history[-1]["gates"]
    rows = b.script(
        "return [...document.querySelectorAll('main table:nth-of-type(2) tbody tr')]"
        ".map((r) => [...r.cells].slice(0, 3).map((c) => c.textContent));"
    )
    assert rows == [[g["gate"], f"{g['value']:.4g}", f"{g['bound']:.4g}"] for g in last]
    b.screenshot(tmp_path / "gate-charts.png")


@IN_CHROMIUM
def test_gate_charts_read_with_javascript_off(
    browser: Browser,  # noqa: F811
    console: tuple[str, GateSource],
) -> None:
    b = browser
    url, source = console
    rid, _ = _seed(source, 3)
    with b.javascript_off():
        _login(b, url)  # the login form is a plain POST
        b.get(f"{url}/ui/rollouts/{rid}")
        assert b.script("return typeof window.poll") == "undefined"  # ui.js did not run
        # The server drew the charts: same dots, scale, bound and tooltips as with JavaScript.
        _check_drawn(b.script(READ_CHARTS), 3)
    b.get(f"{url}/ui/rollouts/{rid}")
    assert b.script("return typeof window.poll") == "function"  # and back on for other tests


@IN_CHROMIUM
def test_hostile_gate_texts_show_as_text_and_never_run(
    browser: Browser,  # noqa: F811
    console: tuple[str, GateSource],
) -> None:
    """A stored rollout document whose gate history carries markup (a foreign or damaged
    writer: the platform's own gates parse to plain metric texts) shows it as text."""
    b = browser
    url, source = console
    rid, t0 = _seed(source, 1)
    script_gate = "<script>window.pwned = 1</script>"
    img_gate = '"><img src=x onerror="window.pwned = 2">'
    outcome = "<img src=x onerror=window.pwned=3>"
    history = [
        {"t": t0 + 1, "wave": 0, "gates": [
            {"gate": script_gate, "value": 0.5, "bound": 1.0, "outcome": outcome},
            {"gate": img_gate, "value": "<img src=x onerror=window.pwned=4>", "bound": 2.0},
        ]},
        {"t": t0 + 2, "wave": "<b>1</b>", "gates": [
            {"gate": script_gate, "value": 0.25, "bound": 1.0, "outcome": "pass"},
            {"gate": img_gate, "value": 3.0, "bound": 2.0, "outcome": "fail"},
        ]},
    ]  # fmt: skip
    verdict = {"outcome": "fail", "gates": [{"gate": img_gate, "outcome": outcome, "value": 3.0,
                                             "bound": 2.0, "reason": script_gate}]}  # fmt: skip
    doc = {**source.rollouts[rid].to_dict(), "gate_history": history, "verdict": verdict}
    source.rollouts[rid] = Rollout.from_dict(json.loads(json.dumps(doc)))
    _login(b, url)
    b.get(f"{url}/ui/rollouts/{rid}")
    b.wait_find("main .gate-charts figure.chart")
    charts = b.script(READ_CHARTS)
    assert [c["label"] for c in charts] == [script_gate, img_gate]  # attributes: the raw text
    assert charts[0]["caption"].startswith(script_gate + " last 0.25")
    assert charts[0]["dots"][0]["title"].endswith(f"UTC: 0.5 ({outcome})")
    # A wave that is not an index (markup here) is shown as "?", never as its text.
    assert charts[0]["dots"][1]["title"].startswith("wave ?, ")
    assert charts[1]["caption"].startswith(img_gate + " last 3, max 3, bound 2")
    assert len(charts[1]["dots"]) == 1  # the value that was markup, not a number, is left out
    assert charts[1]["dots"][0]["y"] < charts[1]["bound"]["y"]  # 3 is above the bound 2
    table = b.script("return document.querySelector('main table:nth-of-type(2) tbody').innerText")
    assert img_gate in table and outcome in table and script_gate in table
    # None of it became markup, and nothing ran.
    injected = "return document.querySelectorAll('main script, main img, main .gate-charts b')"
    assert b.script(injected + ".length") == 0
    assert b.script("return window.pwned === undefined") is True


@pytest.mark.slow
@IN_CHROMIUM
def test_gate_chart_follows_new_evaluations_without_reload(
    browser: Browser,  # noqa: F811
    console: tuple[str, GateSource],
) -> None:
    b = browser
    url, source = console
    rid, t0 = _seed(source, 1)
    _login(b, url)
    b.get(f"{url}/ui/rollouts/{rid}")
    b.wait_find("main .gate-charts circle.dot")
    _check_drawn(b.script(READ_CHARTS), 1)  # one evaluation: a dot, though no line yet
    b.script("window.notReloaded = true;")
    for n in (2, 3, 4):
        source.evaluate(rid, t0 + 30 * n, *EVALS[n - 1])
        b.wait_for(
            f"document.querySelectorAll('main .gate-charts circle.dot').length === {2 * n}",
            WAIT_S, f"the chart with {n} evaluations",
        )  # fmt: skip
        _check_drawn(b.script(READ_CHARTS), n)
    assert b.script("return window.notReloaded") is True  # swapped in place, not reloaded
    assert b.script("return document.getElementById('main').dataset.updated") is not None
    # The core wrote one point per evaluation, oldest first: what the page just showed.
    assert [p["t"] for p in source.rollouts[rid].gate_history] == [t0 + 30 * n for n in range(1, 5)]


def test_gate_series_keeps_only_numbers_a_chart_can_place() -> None:
    """Stored history is a JSON document: NaN, Infinity, huge ints, booleans and text in it are
    left out instead of breaking the scale (one inf would put every point at NaN)."""
    history = [
        {"t": 1.0, "wave": 0, "gates": [{"gate": "g", "value": 1.0, "bound": 4.0}]},
        {"t": 2.0, "wave": 0, "gates": [{"gate": "g", "value": float("inf"), "bound": 9.0}]},
        {"t": 3.0, "wave": 0, "gates": [{"gate": "g", "value": float("nan")}]},
        {"t": 4.0, "wave": 0, "gates": [{"gate": "g", "value": 10**400, "bound": True}]},
        {"t": 5.0, "wave": 0, "gates": [{"gate": "g", "value": "2", "bound": float("-inf")}]},
        {"t": float("nan"), "wave": 0, "gates": [{"gate": "g", "value": 7.0}]},
        {"t": 10**400, "wave": 0, "gates": [{"gate": "g", "value": 7.0}]},
        {"t": True, "wave": 0, "gates": [{"gate": "g", "value": 7.0}]},
        {"t": 6.0, "wave": 1, "gates": [{"gate": "g", "value": 3, "outcome": "pass"}]},
    ]
    s = gate_series(history)["g"]
    assert s.points == [(1.0, 1.0), (6.0, 3.0)]
    assert s.bound == 9.0  # the last finite bound
    # Waves numbered from 1, as the controller's stop reasons say them.
    assert s.marks == ["wave 1, 00:00:01 UTC: 1", "wave 2, 00:00:06 UTC: 3 (pass)"]
    assert gate_series([{"t": 1.0, "wave": "x", "gates": [{"gate": "g", "value": 1}]}])[
        "g"
    ].marks == ["wave ?, 00:00:01 UTC: 1"]
    svg = line_chart(s.points, title="g", bound=s.bound, marks=s.marks)
    assert svg.count('<circle class="dot"') == 2 and "nan" not in svg.lower()
    assert "last 3, max 3, bound 9" in svg  # max: the largest value; the axis reaches the bound
    one = line_chart([(5.0, 2.0)], title="one", marks=["only"])
    assert one.count("<circle") == 1 and "<title>only</title>" in one

"""The Rollouts pages in Chromium, against a `RolloutSource` built on the real pure rollout core
(cloud_sync/rollout: spec, plan, `step`) and kept in memory: the seam the controller's store
will fill. Start with a dry run first, watch the rollout change live, abort it with the
confirmation, see the final state; a rollout action without the CSRF token is refused."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.store import LocalStore
from cloud_sync.platform.ui import mount
from cloud_sync.platform.ui.rollouts import Action, RolloutSource
from cloud_sync.rollout.controller import Abort, Pause, Resume, Start, step
from cloud_sync.rollout.eligibility import BundleFacts
from cloud_sync.rollout.model import Rollout, new_rollout, plan
from cloud_sync.rollout.selector import DeviceFacts
from cloud_sync.rollout.spec import RolloutSpec
from tests.browser import Browser, browser  # noqa: F401  (the session fixture)
from tests.http_servers import serve

TOKEN = "t" * 64
BUNDLE = BundleFacts("resize", "1.4.0", "go", ("linux-x86_64",))


def _facts(n: int) -> list[DeviceFacts]:
    profile = {"arch": "x86_64", "libc": "glibc", "libc_version": "2.36", "cpu_count": 2,
               "memory_total_mb": 2048, "memory_available_mb": 1024}  # fmt: skip
    return [
        DeviceFacts(f"edge-{i:03d}", {"group": "west"}, profile, None, {"resize": "1.3.0"})
        for i in range(n)
    ]


class CoreSource:
    """Rollouts in memory, every change through the pure core's `step`."""

    def __init__(self, devices: list[DeviceFacts]) -> None:
        self.devices = devices
        self.rollouts: dict[str, Rollout] = {}
        self.lock = threading.Lock()

    def list(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.status_view() for r in self.rollouts.values()]

    def get(self, rollout_id: str) -> dict[str, Any] | None:
        with self.lock:
            r = self.rollouts.get(rollout_id)
            return None if r is None else r.status_view()

    def act(self, rollout_id: str, action: Action) -> dict[str, Any]:
        event = {"pause": Pause, "resume": Resume, "abort": Abort}[action](time.time())
        with self.lock:
            r, _ = step(self.rollouts[rollout_id], event)
            self.rollouts[rollout_id] = r
            return r.status_view()

    def _plan(self, spec: Mapping[str, Any]) -> Any:
        s = RolloutSpec.from_dict({**spec, "bake_s": 60, "rate_per_minute": 100_000})
        return s, plan(f"r-{len(self.rollouts) + 1}", s, self.devices, BUNDLE)

    def preview(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._plan(spec)[1].to_dict()

    def start(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        s, p = self._plan(spec)
        with self.lock:
            r, _ = step(new_rollout(s, p, time.time()), Start(time.time()))
            self.rollouts[r.id] = r
            return r.status_view()


@contextlib.contextmanager
def console_over(tmp_path: Path, source: RolloutSource) -> Iterator[str]:
    """The console on empty fleet and registry stores, its rollouts from `source`: its URL."""
    fleet = FleetStore(tmp_path / "fleet.db")
    registry = LocalStore(tmp_path / "registry.db", tmp_path / "blobs")
    app = web.Application()
    mount(app, token=TOKEN, fleet=fleet, registry=registry, accounts=None, rollout_source=source)
    try:
        with serve(app) as url:
            yield url
    finally:
        fleet.close()
        registry.close()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, CoreSource]]:
    source = CoreSource(_facts(20))
    with console_over(tmp_path, source) as url:
        yield url, source


@pytest.mark.slow
@pytest.mark.ci_may_skip("needs Debian's chromium and chromium-driver")
def test_start_with_dry_run_watch_live_abort(
    browser: Browser,  # noqa: F811
    console: tuple[str, CoreSource],
    tmp_path: Path,
) -> None:
    b = browser
    url, source = console
    b.reset()
    b.get(url + "/ui/login")
    b.type("#secret", TOKEN)
    b.click("#login button")
    b.wait_find("#fleet")
    b.get(url + "/ui/rollouts")
    assert "no rollouts yet" in b.text(b.find("main"))
    b.click("a.button")
    b.type("input[name=function]", "resize")
    b.type("input[name=version]", "1.4.0")
    b.type("input[name=target]", "group=west")
    b.type("input[name=waves]", "10,50,100")
    b.type("textarea[name=gates]", "error_rate<=0.05")
    b.click("button[value=preview]")
    preview = b.text(b.wait_find(".preview"))
    assert "20 devices in 3 waves; 0 ineligible" in preview and not source.rollouts
    b.screenshot(tmp_path / "rollout-dry-run.png")
    b.click("button[value=start]")  # the form kept its values
    b.wait_find("main .progress")
    assert b.url.endswith("/ui/rollouts/r-1")
    assert "resize 1.4.0 running" in b.text(b.find("main h2"))
    gates = b.text(b.find("main table:nth-of-type(2) tbody"))
    assert "error_rate<=0.05" in gates and "not evaluated yet" in gates
    waves = b.find_all("main .progress")
    assert len(waves) == 3
    rows = b.find_all("main table:last-of-type tbody tr")
    assert len(rows) == 20
    # Live: the controller pauses it (here: through the source); the page shows it unprompted.
    source.act("r-1", "pause")
    b.wait_for("document.querySelector('main h2').textContent.includes('paused')", 15, "live")
    assert "stopped: paused by operator" in b.text(b.find("main"))
    # Filter the device table by state.
    counts = source.rollouts["r-1"].status_view()["counts"]
    wave0_state = min(counts, key=counts.__getitem__)  # the first wave's devices: the fewest
    assert counts[wave0_state] < 20
    b.script(f"document.querySelector('select[name=state]').value = {wave0_state!r};")
    b.click("main form[method=get] button")
    b.wait_for(f"location.search.includes('state={wave0_state}')", 10, "the filtered page")
    filtered = b.find_all("main table:last-of-type tbody tr")
    assert len(filtered) == counts[wave0_state]
    # Abort with the confirmation: dismissing it does nothing, accepting it aborts.
    b.script("window.confirm = () => false;")
    b.click("button[value=abort]")
    assert source.rollouts["r-1"].state.value == "paused"
    b.script("window.confirm = () => true;")
    b.click("button[value=abort]")
    # The POST answers with a redirect back to the rollout's page, which then shows the state.
    b.wait_for("(document.querySelector('main h2') || {}).textContent?.includes('aborted')", 15)
    assert b.url.endswith("/ui/rollouts/r-1")
    assert "stopped: aborted by operator" in b.text(b.find("main"))
    assert source.rollouts["r-1"].state.value == "aborted"
    bars = [b.text(e) for e in b.find_all("main .progress span")]
    assert bars == ["2 / 2", "8 / 8", "10 / 10"]  # every device canceled: nothing left to wait for
    b.screenshot(tmp_path / "rollout-aborted.png")


def test_rollout_action_without_csrf_is_refused(console: tuple[str, CoreSource]) -> None:
    url, source = console
    source.start({"function": "resize", "version": "1.4.0", "target": "group=west",
                  "waves": "50,100"})  # fmt: skip
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(url + "/ui/login", urllib.parse.urlencode({"secret": TOKEN}).encode()).read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(url + "/ui/rollouts/r-1/abort", b"action=abort", timeout=10)
    assert refused.value.code == 403
    refused.value.close()
    assert source.rollouts["r-1"].state.value == "running"
    # With the token: a spec the core refuses comes back on the form, nothing starts.
    page = opener.open(url + "/ui/rollouts/new", timeout=10).read().decode()
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    bad = {"csrf": csrf, "function": "resize", "version": "1.4.0", "target": "group=east",
           "waves": "100", "mode": "start"}  # fmt: skip
    body = opener.open(url + "/ui/rollouts/new", urllib.parse.urlencode(bad).encode(),
                       timeout=10).read().decode()  # fmt: skip
    assert 'class="error"' in body and "group=east" in body and set(source.rollouts) == {"r-1"}


def test_gate_rows_show_value_bound_and_outcome_of_a_real_verdict() -> None:
    from cloud_sync.platform.ui.rollouts import detail_body
    from cloud_sync.rollout.gates import evaluate_gates, parse_gates
    from cloud_sync.rollout.metrics import VersionMetrics

    verdict = evaluate_gates(
        parse_gates(["error_rate<=0.05"]), VersionMetrics(invocations=200, errors=20), None, 10
    )
    source = CoreSource(_facts(4))
    view = source.start({"function": "resize", "version": "1.4.0", "target": "group=west",
                         "waves": "100", "gates": ["error_rate<=0.05"]})  # fmt: skip
    page = detail_body({**view, "gates": verdict.to_dict()}, "csrf", "")
    row = page[page.index("<td>error_rate&lt;=0.05</td>") :].split("</tr>")[0]
    assert "<td>0.1</td><td>0.05</td><td>200</td>" in row and ">fail<" in row


def test_gate_history_is_charted_with_its_bound_and_escaped() -> None:
    from cloud_sync.platform.ui.rollouts import detail_body

    source = CoreSource(_facts(4))
    view = source.start({"function": "resize", "version": "1.4.0", "target": "group=west",
                         "waves": "100"})  # fmt: skip
    gate = "p95_ms<=<b>x</b>"  # a hostile stored text shows as text
    history = [
        {"t": 10.0, "wave": 0, "gates": [{"gate": gate, "value": 20.0, "bound": 50.0}]},
        {"t": 20.0, "wave": 0, "gates": [{"gate": gate, "value": None, "bound": 50.0}]},
        {"t": 30.0, "wave": 0, "gates": [{"gate": gate, "value": 40.0, "bound": 60.0}]},
    ]
    page = detail_body({**view, "gate_history": history}, "csrf", "")
    charts = page[page.index('class="charts gate-charts"') :]
    assert "<b>x</b>" not in charts and "p95_ms&lt;=&lt;b&gt;x&lt;/b&gt;" in charts
    points = re.search(r'class="line" points="([^"]+)"', charts)
    assert points and len(points.group(1).split()) == 2  # the point without a value is left out
    assert "bound 60" in charts and '<line class="bound"' in charts  # the latest bound
    empty = detail_body(view, "csrf", "")
    assert '<div class="charts gate-charts"></div>' in empty

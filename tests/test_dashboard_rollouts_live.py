"""The console's rollout pages on the platform's real rollout controller: a simulated fleet on a
real Mosquitto, a dry run and a start from the form, the detail page, and an abort from the page
that the controller (and so `/v1/rollouts`) carries out. Every wait is bounded."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mosquitto import Broker
from tests.registry_helpers import Platform, publish, start_platform
from tests.rollout_fleet import FN, fleet, make_bundles, start, status, wait_state
from tests.test_dashboard_http import Client

pytestmark = pytest.mark.slow


@pytest.fixture
def platform(mosquitto: Broker) -> Iterator[Platform]:
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url)
    try:
        yield plat
    finally:
        plat.stop()


def _form(c: Client, **fields: str) -> tuple[int, dict[str, str], str]:
    return c.request("POST", "/ui/rollouts/new", {"csrf": c.csrf(), **fields})


async def test_start_watch_and_abort_a_rollout_from_the_console(
    platform: Platform, tmp_path: Path
) -> None:
    for bundle in make_bundles(tmp_path / "src", ["0.1.0"]).values():
        publish(platform, bundle)
    c = Client(platform.url)
    assert c.login(platform.token) == 303
    _, _, empty = c.request("GET", "/ui/rollouts")
    assert "no rollouts yet" in empty
    assert c.request("GET", "/ui/rollouts/r-nope")[0] == 404
    # A version the registry lacks: the controller's refusal, on the form, with its code.
    _, _, refused = _form(c, function=FN, version="9.9.9", target="*", waves="100", mode="preview")
    assert "version_not_found" in refused
    async with fleet(platform, tmp_path / "sim", 4, wait_online=True):
        fields = {"function": FN, "version": "0.1.0", "target": "group=sim", "waves": "50,100",
                  "gates": "install_success>=0.9"}  # fmt: skip
        status_code, _, preview = await asyncio.to_thread(_form, c, **fields, mode="preview")
        assert status_code == 200 and "wave" in preview.lower() and "sim-" in preview
        _, _, still_empty = c.request("GET", "/ui/rollouts")
        assert "no rollouts yet" in still_empty  # the dry run started nothing
        status_code, headers, _ = await asyncio.to_thread(_form, c, **fields, mode="start")
        assert status_code == 303, headers
        match = re.fullmatch(r"/ui/rollouts/(r-[0-9a-f]+)", headers["Location"])
        assert match, headers["Location"]
        rid = match.group(1)
        _, _, listed = c.request("GET", "/ui/rollouts")
        assert rid in listed
        _, _, detail = c.request("GET", f"/ui/rollouts/{rid}")
        assert rid in detail and FN in detail
        view = await status(platform, rid)  # the API sees the rollout the page started
        assert view["function"] == FN and view["version"] == "0.1.0"
        if view["state"] in ("pending", "running", "paused"):
            token = c.csrf()
            code, headers, _ = c.request("POST", f"/ui/rollouts/{rid}/abort", {"csrf": token})
            assert code == 303 and headers["Location"] == f"/ui/rollouts/{rid}"
            view = await wait_state(platform, rid, {"aborted"}, within_s=30)
        else:  # it already finished: the page then refuses an abort with the stable code
            assert view["state"] == "succeeded", view
            token = c.csrf()
            _, _, body = c.request("POST", f"/ui/rollouts/{rid}/abort", {"csrf": token})
            assert "rollout_state" in body
        _, _, final = c.request("GET", f"/ui/rollouts/{rid}")
        assert view["state"] in final


async def test_gate_values_over_time_are_charted_against_their_bound(
    platform: Platform, tmp_path: Path
) -> None:
    """The real controller records every gate evaluation; the page charts each gate's value over
    time with its bound, from the stored rollout (so also after a platform restart)."""
    for bundle in make_bundles(tmp_path / "src", ["0.1.0"]).values():
        publish(platform, bundle)
    async with fleet(platform, tmp_path / "sim", 4, wait_online=True):
        rid = start(platform, f"{FN}@0.1.0", "--target", "group=sim", "--waves", "50,100",
                    "--bake", "0.3", "--interval", "0.2", "--device-timeout", "30",
                    "--min-invocations", "0", "--gate", "install_success>=0.9")  # fmt: skip
        view = await wait_state(platform, rid, {"succeeded", "failed", "rolled_back"}, 60)
    assert view["state"] == "succeeded", view
    history = view["gate_history"]
    assert len(history) >= 2 and {p["wave"] for p in history} == {0, 1}
    assert [p["t"] for p in history] == sorted(p["t"] for p in history)
    last = [g for g in history[-1]["gates"] if g["gate"] == "install_success>=0.9"]
    assert last and last[0]["value"] == 1.0 and last[0]["bound"] == 0.9
    c = Client(platform.url)
    assert c.login(platform.token) == 303
    _, _, page = c.request("GET", f"/ui/rollouts/{rid}")
    charts = page[page.index('class="charts gate-charts"') :].split("<h3>")[0]
    assert 'aria-label="install_success&gt;=0.9"' in charts
    assert '<line class="bound"' in charts and "bound 0.9" in charts
    points = re.search(r'class="line" points="([^"]+)"', charts)
    assert points and len(points.group(1).split()) == sum(
        1
        for p in history
        for g in p["gates"]
        if g["gate"] == "install_success>=0.9" and g["value"] is not None
    )

"""The console in a real headless Chromium against a real platform, Mosquitto and simulated
devices on loopback. Screenshots of each page go into the test's tmp dir."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import Browser, browser  # noqa: F401  (the session fixture)
from tests.dashboard_seed import call, enrol, report
from tests.mosquitto import Broker
from tests.registry_helpers import Platform, start_platform

SIM_DEVICES = 3
EVIL = "<script>window.pwned = 1</script>"


@pytest.fixture
def fleet(mosquitto: Broker) -> Iterator[Platform]:
    """A platform on the real broker with simulated devices running and one device that reports
    HTML in its fields over the HTTP fallback."""
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url)
    sim = subprocess.Popen(
        [sys.executable, "-m", "cloud_sync.platform.cli", "simulate", "--devices",
         str(SIM_DEVICES), "--platform", plat.url, "--data-dir", str(plat.data_dir),
         "--duration", "120", "--labels", "site=lab", "--prefix", "sim"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        token = enrol(plat.url, plat.token, "evil-1", {"site": "dmz"})
        report(plat.url, "evil-1", token, functions={"<img src=x onerror=window.pwned=2>": "1.0.0",
               "echo": "1.2.0"}, arch="<b>arm</b>", labels={"note": EVIL})  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # bounded: the simulated devices enrol and connect
            devices = call(plat.url, "GET", "/v1/devices", plat.token)["devices"]
            sims = [d for d in devices if d["id"].startswith("sim-") and d["online"]]
            if len(sims) == SIM_DEVICES:
                break
            assert time.monotonic() < deadline and sim.poll() is None, "simulated fleet not up"
            time.sleep(0.3)
        yield plat
    finally:
        sim.terminate()
        try:
            sim.wait(30)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait(5)
        plat.stop()


def _login(b: Browser, url: str, secret: str, loaded_js: str) -> None:
    b.get(url + "/ui/login")
    b.type("#secret", secret)
    b.click("#login button")
    b.wait_for(loaded_js, 10, "the page after the login form")


@pytest.mark.slow
@pytest.mark.ci_may_skip("needs Debian's chromium and chromium-driver")
def test_console_in_chromium(browser: Browser, fleet: Platform, tmp_path: Path) -> None:  # noqa: F811
    b = browser
    b.reset()
    url = fleet.url
    # Not logged in: every page sends the browser to the login form.
    b.get(url + "/ui/fleet")
    assert b.url.endswith("/ui/login")
    _login(b, url, "wrong-token", "document.querySelector('.error')?.textContent.includes('wrong')")
    assert b.url.endswith("/ui/login")
    assert "wrong name, token or password" in b.text(b.find(".error"))
    assert not b.cookies()
    b.screenshot(tmp_path / "login-refused.png")

    _login(b, url, fleet.token, "document.querySelector('#fleet') !== null")
    assert b.url.endswith("/ui/fleet")
    (cookie,) = b.cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert b.script("return document.cookie") == ""  # HttpOnly: scripts cannot read it
    ids = [b.text(e) for e in b.find_all("#fleet tr.device td:first-child")]
    assert ids == ["evil-1", "sim-00000", "sim-00001", "sim-00002"]
    counts = b.text(b.find(".counts"))
    assert "online 4" in counts and "total 4" in counts
    b.screenshot(tmp_path / "fleet.png")

    # The device's HTML shows as text and never runs.
    row = b.text(b.find_all("#fleet tr.device")[0])
    assert f"note={EVIL}" in row  # the text, as the device sent it
    assert "<img src=x onerror=window.pwned=2>@1.0.0" in row and "<b>arm</b>" in row
    assert b.script("return window.pwned === undefined") is True

    # Filter by label, then by state and search, through the form.
    b.type("#fleet-filter input[name=label]", "site=lab")
    b.click("#fleet-filter button")
    b.wait_for("location.search.includes('label=site')", 10, "the filtered page")
    ids = [b.text(e) for e in b.find_all("#fleet tr.device td:first-child")]
    assert ids == ["sim-00000", "sim-00001", "sim-00002"]
    b.get(url + "/ui/fleet?q=evil&state=online")
    assert [b.text(e) for e in b.find_all("#fleet tr.device td:first-child")] == ["evil-1"]

    # Open the device: profile, functions and three charts per function.
    b.click("#fleet tr.device td:first-child a")
    b.wait_find("figure.chart")
    assert b.url.endswith("/ui/devices/evil-1")
    charts = b.script("return document.querySelectorAll('figure.chart svg polyline').length")
    assert charts == 6  # two functions x (invocations, error rate, p95)
    points = b.script(
        "return document.querySelector('figure.chart svg polyline').getAttribute('points')"
    )
    assert len(str(points).split()) == 6  # one point per stored interval
    assert "<script>window.pwned = 1</script>" in b.text(b.find("main"))
    assert b.script("return window.pwned === undefined") is True
    b.screenshot(tmp_path / "device.png")

    # Live: the fleet page updates itself (short polling) when a device changes.
    b.get(url + "/ui/fleet?q=new-")
    assert b.find_all("#fleet tr.device") == []
    enrol(url, fleet.token, "new-1", {"site": "lab"})
    b.wait_for("document.querySelectorAll('#fleet tr.device').length === 1", 15, "live update")

    b.get(url + "/ui/functions")
    assert "<img src=x onerror=window.pwned=2>" in b.text(b.find("main"))
    b.screenshot(tmp_path / "functions.png")
    b.get(url + "/ui/rollouts")  # the platform's rollout controller: none started here
    rollouts_text = b.text(b.find("main"))
    assert "no rollouts yet" in rollouts_text and "Start a rollout" in rollouts_text

    # Log out: the session ends, pages go back to the login form.
    b.click("#logout")
    b.wait_find("#login")
    assert b.url.endswith("/ui/login")
    b.get(url + "/ui/devices/evil-1")
    assert b.url.endswith("/ui/login")

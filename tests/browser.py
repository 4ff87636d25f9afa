"""A real headless Chromium for tests, driven over W3C WebDriver (Debian's chromedriver).

`browser` (session scope) starts one chromedriver on a free loopback port and one Chromium
session through it, so every test shares a browser; `Browser.reset()` clears cookies between
tests, and `Browser.javascript_off()` turns the page's JavaScript off for a block. The client
speaks the WebDriver HTTP protocol with urllib: no Selenium or Playwright to
download. Chromium's flags keep it off the network (no sync, no component updates, no
background traffic) and its profile in the test's temp dir.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
START_TIMEOUT_S = 30.0
STEP_TIMEOUT_S = 30.0  # one WebDriver command (page loads included)


class WebDriverError(AssertionError):
    pass


class Browser:
    def __init__(self, base: str, session: str) -> None:
        self._base = base
        self.session = session

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(
            f"{self._base}/session/{self.session}{path}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=STEP_TIMEOUT_S) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            with exc:  # closes its socket
                raise WebDriverError(f"{method} {path}: {exc.read()[:500]!r}") from exc

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return str(self._call("GET", "/url"))

    def find(self, css: str) -> str:
        found = self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    def wait_find(self, css: str, timeout: float = 10.0) -> str:
        """The element once it exists: after a click that submits a form, the next page may
        still be loading when the click returns."""
        self.wait_for(f"document.querySelector({json.dumps(css)}) !== null", timeout, css)
        return self.find(css)

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [str(e[ELEMENT]) for e in found]

    def text(self, element: str) -> str:
        return str(self._call("GET", f"/element/{element}/text"))

    def type(self, css: str, value: str) -> None:
        element = self.find(css)
        self._call("POST", f"/element/{element}/clear")
        self._call("POST", f"/element/{element}/value", {"text": value})

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/click")

    def script(self, source: str, *args: Any) -> Any:
        return self._call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def cookies(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/cookie"))

    def accept_alert(self) -> None:
        self._call("POST", "/alert/accept")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path

    def wait_for(self, predicate_js: str, timeout: float = 10.0, what: str = "") -> Any:
        """Poll a JS expression until it is truthy (bounded)."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.script(f"return ({predicate_js});")
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or predicate_js} (last {value!r})")

    def reset(self) -> None:
        self._call("DELETE", "/cookie")

    def cdp(self, command: str, params: dict[str, Any]) -> Any:
        """A Chrome DevTools command on the current tab (chromedriver's `goog/cdp/execute`)."""
        return self._call("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    @contextlib.contextmanager
    def javascript_off(self) -> Iterator[None]:
        """Pages loaded inside run no script of their own (the shared browser gets it back
        after). `script()` still works: DevTools evaluates outside the page's scripting."""
        self.cdp("Emulation.setScriptExecutionDisabled", {"value": True})
        try:
            yield
        finally:
            self.cdp("Emulation.setScriptExecutionDisabled", {"value": False})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Browser]:
    """One chromedriver + headless Chromium session (used by the fixture and bench/)."""
    port = _free_port()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/status", timeout=2) as resp:
                    if json.loads(resp.read())["value"].get("ready"):
                        break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline or driver.poll() is not None:
                raise AssertionError("chromedriver did not start")
            time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
                            f"--user-data-dir={profile}",
                        ],
                    },
                    "unhandledPromptBehavior": "ignore",
                }
            }
        }  # fmt: skip
        req = urllib.request.Request(
            f"{base}/session", data=json.dumps(caps).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=START_TIMEOUT_S) as resp:
            session = json.loads(resp.read())["value"]["sessionId"]
        try:
            yield Browser(base, session)
        finally:
            urllib.request.urlopen(
                urllib.request.Request(f"{base}/session/{session}", method="DELETE"), timeout=20
            ).close()
    finally:
        driver.terminate()
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait(5)


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One Chromium for the whole test session; tests call `reset()` first."""
    if not available():
        pytest.skip("chromium and chromium-driver are not installed (make install)")
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b

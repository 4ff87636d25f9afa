"""The console over plain HTTP against a real platform process: login, sessions, CSRF, escaping,
operator accounts, the fleet page's filters and paging, and the rollout pages on the controller."""

from __future__ import annotations

import http.cookiejar
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboard_seed import enrol, report
from tests.platform_backends import Backend
from tests.registry_helpers import Platform, start_platform


@pytest.fixture
def platform(tmp_path: Path, backend: Backend) -> Iterator[Platform]:
    """A platform process on each backend: its data dir's SQLite files, or PostgreSQL."""
    extra = ["--database", backend.database_url] if backend.database_url else []
    plat = start_platform(tmp_path / "platform", *extra)
    try:
        yield plat
    finally:
        plat.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class Client:
    """A browser-like client: a cookie jar, redirects not followed (so tests see them)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        )

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], str]:  # fmt: skip
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=headers or {})  # fmt: skip
        try:
            with self.opener.open(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:  # closes its socket
                return exc.code, dict(exc.headers), exc.read().decode()

    def login(self, secret: str, user: str = "") -> int:
        status, _, _ = self.request("POST", "/ui/login", {"user": user, "secret": secret})
        return status

    def csrf(self) -> str:
        _, _, body = self.request("GET", "/ui/fleet")
        match = re.search(r'name="csrf" value="([^"]+)"', body)
        assert match, body[:500]
        return match.group(1)


def test_login_session_cookie_csrf_and_logout(platform: Platform) -> None:
    c = Client(platform.url)
    status, headers, _ = c.request("GET", "/ui/fleet")
    assert status == 303 and headers["Location"] == "/ui/login"
    assert c.login("not-the-token") == 401
    assert not list(c.jar)
    assert c.login(platform.token) == 303
    status, headers, _ = c.request("GET", "/ui/fleet")
    assert status == 200 and "default-src 'self'" in headers["Content-Security-Policy"]
    (cookie,) = list(c.jar)
    assert cookie.name == "edgefn_session" and cookie.has_nonstandard_attr("HttpOnly")
    # A state-changing action without the CSRF token, or with a wrong one, is refused...
    assert c.request("POST", "/ui/logout", {})[0] == 403
    assert c.request("POST", "/ui/logout", {"csrf": "forged"})[0] == 403
    # ...and so is a cross-origin one carrying the right token.
    token = c.csrf()
    evil = {"Origin": "http://evil.example"}
    assert c.request("POST", "/ui/logout", {"csrf": token}, headers=evil)[0] == 403
    assert c.request("GET", "/ui/fleet")[0] == 200  # still logged in
    status, headers, _ = c.request("POST", "/ui/logout", {"csrf": token})
    assert status == 303 and headers["Location"] == "/ui/login"
    assert c.request("GET", "/ui/devices/x")[0] == 303


def test_set_cookie_flags(platform: Platform) -> None:
    c = Client(platform.url)
    status, headers, _ = c.request("POST", "/ui/login", {"secret": platform.token})
    assert status == 303
    flags = headers["Set-Cookie"]
    assert "HttpOnly" in flags and "SameSite=Strict" in flags and "Path=/ui" in flags
    assert "Secure" not in flags  # plain HTTP here; under --tls the cookie is Secure


def test_operator_account_login(platform: Platform, backend: Backend) -> None:
    database = ["--database", backend.database_url] if backend.database_url else []

    def create(name: str, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cloud_sync.platform.cli", "operator", "create", name,
             "--password-stdin", "--data-dir", str(platform.data_dir), *database],
            input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    made = create("alice", "correct horse battery")
    assert made.returncode == 0, made.stderr
    assert create("alice", "another long password").returncode != 0  # exists
    short = create("bob", "short")
    assert short.returncode != 0 and "at least" in short.stderr
    # The hash, never the password, is stored.
    assert b"correct horse battery" not in backend.dump(platform.data_dir / "registry.db")
    c = Client(platform.url)
    assert c.login("wrong password!!", user="alice") == 401
    assert c.login("correct horse battery", user="nobody") == 401
    assert c.login("correct horse battery", user="alice") == 303
    _, _, body = c.request("GET", "/ui/fleet")
    assert ">alice<" in body


def test_fleet_filters_paging_and_escaping(platform: Platform) -> None:
    for i in range(60):
        enrol(platform.url, platform.token, f"dev-{i:03d}", {"site": "a" if i % 2 else "b"})
    evil = '<script>alert("x")</script>'
    tok = enrol(platform.url, platform.token, "evil-1", {"site": "c"})
    # Enrolment refuses such labels; what a device reports about itself is not checked.
    report(platform.url, "evil-1", tok, functions={"<img src=x onerror=alert(1)>": "1.0.0"},
           arch="<b>arm</b>", labels={"note": evil})  # fmt: skip
    c = Client(platform.url)
    assert c.login(platform.token) == 303
    _, _, page1 = c.request("GET", "/ui/fleet")
    assert "page 1 of 2 (61 devices)" in page1 and page1.count('class="device"') == 50
    _, _, page2 = c.request("GET", "/ui/fleet?page=2")
    assert page2.count('class="device"') == 11
    _, _, site_a = c.request("GET", "/ui/fleet?label=site%3Da")
    assert "(30 devices)" in site_a and "dev-001" in site_a and "dev-000<" not in site_a
    _, _, found = c.request("GET", "/ui/fleet?q=evil")
    assert "(1 devices)" in found
    # Reported strings are shown as text, never as markup.
    assert "<script>alert" not in found, found
    assert "&lt;script&gt;alert(&quot;x&quot;)" in found, found
    assert "<img src=x" not in found and "&lt;img src=x onerror=alert(1)&gt;@1.0.0" in found
    assert "<b>arm</b>" not in found and "&lt;b&gt;arm&lt;/b&gt;" in found
    _, _, desc = c.request("GET", "/ui/fleet?sort=id&dir=desc")
    assert desc.index("evil-1") < desc.index("dev-059")
    # Only evil-1 counts as online: it just posted over the HTTP fallback; the others never
    # had a broker presence or an HTTP contact.
    _, _, online = c.request("GET", "/ui/fleet?state=online")
    assert "(1 devices)" in online and "evil-1" in online and "online <b>1</b>" in online
    _, _, offline = c.request("GET", "/ui/fleet?state=offline")
    assert "(60 devices)" in offline and "offline <b>60</b>" in offline
    _, _, device = c.request("GET", "/ui/devices/evil-1")
    assert "<script>alert" not in device and "&lt;script&gt;alert" in device
    assert device.count("<polyline") == 3  # invocations, error rate, p95 of its one function
    _, _, fns = c.request("GET", "/ui/functions")
    assert "&lt;img src=x onerror=alert(1)&gt;" in fns and "<img src=x" not in fns
    assert c.request("GET", "/ui/devices/nope")[0] == 404


def test_rollout_pages_read_the_platforms_controller(platform: Platform) -> None:
    c = Client(platform.url)
    assert c.login(platform.token) == 303
    status, _, body = c.request("GET", "/ui/rollouts")
    assert status == 200 and "no rollouts yet" in body
    assert c.request("GET", "/ui/rollouts/r-1")[0] == 404
    status, _, body = c.request("GET", "/ui/rollouts/new")
    assert status == 200 and 'name="function"' in body
    token = c.csrf()
    status, _, body = c.request("POST", "/ui/rollouts/r-1/abort", {"csrf": token})
    assert status == 200 and "rollout_not_found" in body
    assert c.request("POST", "/ui/rollouts/r-1/abort", {})[0] == 403  # CSRF before anything


def test_escaping_sessions_and_csrf_values() -> None:
    from cloud_sync.platform.ui.html import Html, h
    from cloud_sync.platform.ui.session import Sessions, csrf_ok

    out = h('<a title="$t">$x</a>', t='" onmouseover="alert(1)', x=Html("<b>ok</b>"))
    assert out == '<a title="&quot; onmouseover=&quot;alert(1)"><b>ok</b></a>'
    expired = Sessions(ttl_s=-1.0)
    sid, _ = expired.create("op")
    assert expired.get(sid) is None  # past its expiry: gone
    few = Sessions(limit=2)
    first, _ = few.create("a")
    few.create("b")
    _, third = few.create("c")
    assert few.get(first) is None  # the oldest is dropped at the bound
    assert csrf_ok(third, third.csrf) and not csrf_ok(third, "") and not csrf_ok(third, None)

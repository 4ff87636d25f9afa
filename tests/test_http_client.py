"""The one HTTP client helper against real servers on loopback (plain and TLS)."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from cloud_sync.http_client import (
    AsyncHttpClient,
    BadAnswer,
    Endpoint,
    RemoteError,
    RequestTimeout,
    SyncHttpClient,
    Unreachable,
)
from cloud_sync.platform.pki import PlatformCA
from tests.http_servers import serve
from tests.mosquitto import free_port

TOKEN = "s3cret"


def make_app() -> web.Application:
    async def doc(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response(
                {"error": {"code": "unauthorized", "message": "bad token"}}, status=401
            )
        body = await request.json() if request.can_read_body else None
        return web.json_response({"echo": body, "ctype": request.content_type}, status=201)

    async def missing(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"code": "unknown_device", "message": "no device 'x'"}}, status=404
        )

    async def foreign(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(status=200, text="not json")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"size": len(body), "length": request.headers.get("Content-Length")}, status=201
        )

    app = web.Application()
    app.router.add_route("*", "/doc", doc)
    app.router.add_post("/upload", upload)
    app.router.add_get("/missing", missing)
    app.router.add_get("/foreign", foreign)
    app.router.add_get("/garbage", garbage)
    app.router.add_get("/slow", slow)
    return app


@pytest.fixture(scope="module")
def plain() -> Iterator[str]:
    with serve(make_app()) as url:
        yield url


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    data = tmp_path_factory.mktemp("pki")
    ca = PlatformCA.load_or_create(data)
    cert = ca.issue_server_cert()
    (data / "server.crt").write_text(cert.cert_pem)
    (data / "server.key").write_text(cert.key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(data / "server.crt", data / "server.key")
    return ca.cert_path, ctx


# ---- sync ---------------------------------------------------------------------------------------


def test_sync_call_sends_the_token_and_json(plain: str) -> None:
    client = SyncHttpClient(Endpoint(plain, token=TOKEN))
    status, doc = client.call("POST", "/doc", {"a": 1})
    assert status == 201
    assert doc == {"echo": {"a": 1}, "ctype": "application/json"}


def test_sync_refusals_carry_the_servers_stable_code(plain: str) -> None:
    client = SyncHttpClient(Endpoint(plain, token="wrong", name="the platform"))
    with pytest.raises(RemoteError) as denied:
        client.call("GET", "/doc")
    assert denied.value.status == 401 and denied.value.code == "unauthorized"
    assert denied.value.category == "auth"
    assert denied.value.message == "bad token (unauthorized, HTTP 401)"
    with pytest.raises(RemoteError) as missing:
        client.call("GET", "/missing")
    assert missing.value.code == "unknown_device" and missing.value.category == "request"
    assert missing.value.remote == ("unknown_device", "no device 'x'")
    # A body that is not ours: the generic code and the start of the body.
    with pytest.raises(RemoteError) as foreign:
        client.call("GET", "/foreign")
    assert foreign.value.code == "http_refused" and foreign.value.remote is None
    assert "HTTP 502: <html>Bad Gateway" in foreign.value.message
    assert foreign.value.category == "transport"


def test_sync_uploads_a_file_object_as_fn_publish_does(plain: str, tmp_path: Path) -> None:
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(os.urandom(300_000))
    client = SyncHttpClient(Endpoint(plain, token=TOKEN, name="the platform"))
    with bundle.open("rb") as f:
        status, doc = client.call(
            "POST",
            "/upload",
            data=f,
            headers={"Content-Type": "application/octet-stream", "Content-Length": "300000"},
        )
    assert status == 201 and doc == {"size": 300_000, "length": "300000"}


def test_sync_request_returns_every_status_without_raising(plain: str) -> None:
    resp = SyncHttpClient(Endpoint(plain)).request("GET", "/missing")
    assert resp.status == 404 and not resp.ok
    assert resp.error() == ("unknown_device", "no device 'x'")
    assert resp.header("content-type").startswith("application/json")


def test_sync_garbage_and_unreachable(plain: str) -> None:
    with pytest.raises(BadAnswer, match="answered garbage"):
        SyncHttpClient(Endpoint(plain)).call("GET", "/garbage")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Unreachable, match=f"cannot reach the agent at {dead}/doc"):
        SyncHttpClient(Endpoint(dead, name="the agent")).call("GET", "/doc")


def test_sync_timeout_is_its_own_error(plain: str) -> None:
    with pytest.raises(RequestTimeout, match=r"did not answer within 0\.3 s"):
        SyncHttpClient(Endpoint(plain, timeout_s=0.3)).call("GET", "/slow")


def test_sync_tls_with_the_platform_ca(pki: tuple[Path, ssl.SSLContext]) -> None:
    cafile, server_ctx = pki
    with serve(make_app(), server_ctx) as url:
        ok = SyncHttpClient(Endpoint(url, token=TOKEN, cafile=cafile))
        assert ok.call("GET", "/doc")[0] == 201
        # Without the CA the platform's certificate is not trusted: no silent downgrade.
        with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
            SyncHttpClient(Endpoint(url, token=TOKEN)).call("GET", "/doc")


def test_sync_streams_a_download(plain: str) -> None:
    client = SyncHttpClient(Endpoint(plain, token=TOKEN))
    with client.open("GET", "/doc") as resp:
        assert resp.status == 201 and b'"echo": null' in resp.read()
    with pytest.raises(RemoteError) as missing, client.open("GET", "/missing"):
        pass
    assert missing.value.status == 404


# ---- async --------------------------------------------------------------------------------------


async def test_async_call_refusal_and_reuse(plain: str) -> None:
    client = AsyncHttpClient(Endpoint(plain, token=TOKEN))
    try:
        assert await client.call("POST", "/doc", {"b": 2}) == {
            "echo": {"b": 2},
            "ctype": "application/json",
        }
        with pytest.raises(RemoteError) as missing:
            await client.call("GET", "/missing")
        assert missing.value.code == "unknown_device" and missing.value.status == 404
        resp = await client.request("GET", "/foreign")
        assert resp.status == 502 and resp.error() is None
        with pytest.raises(BadAnswer):
            await client.call("GET", "/garbage")
    finally:
        await client.close()


async def test_async_unreachable_and_timeout(plain: str) -> None:
    dead = AsyncHttpClient(Endpoint(f"http://127.0.0.1:{free_port()}", name="the platform"))
    slow = AsyncHttpClient(Endpoint(plain, timeout_s=0.3))
    try:
        with pytest.raises(Unreachable, match="cannot reach the platform"):
            await dead.call("GET", "/doc")
        with pytest.raises(RequestTimeout):
            await slow.request("GET", "/slow")
    finally:
        await dead.close()
        await slow.close()


async def test_async_tls_with_the_platform_ca(pki: tuple[Path, ssl.SSLContext]) -> None:
    cafile, server_ctx = pki
    with serve(make_app(), server_ctx) as url:
        ok = AsyncHttpClient(Endpoint(url, token=TOKEN, cafile=cafile))
        untrusted = AsyncHttpClient(Endpoint(url, token=TOKEN))
        try:
            assert (await ok.request("GET", "/doc")).status == 201
            with pytest.raises(Unreachable):
                await untrusted.request("GET", "/doc")
        finally:
            await ok.close()
            await untrusted.close()

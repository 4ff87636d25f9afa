"""The sync client's HTTP transport against a real platform-shaped server on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from aiohttp import web

from cloud_sync.outbox import OutboxRecord
from cloud_sync.transports import HttpError, HttpTransport
from tests.http_servers import serve
from tests.mosquitto import free_port

TOKEN = "dev-token"


class FakePlatform:
    """Only the two device routes the fallback uses; answers what `mode` says."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[dict[str, object]] = []

    def app(self) -> web.Application:
        def denied(request: web.Request) -> web.Response | None:
            if request.headers.get("Authorization") == f"Bearer {TOKEN}":
                return None
            return web.json_response(
                {"error": {"code": "forbidden", "message": "credentials not accepted"}},
                status=403,
            )

        async def records(request: web.Request) -> web.Response:
            if (refusal := denied(request)) is not None:
                return refusal
            if self.mode == "5xx":
                return web.json_response(
                    {"error": {"code": "store_error", "message": "disk full"}}, status=503
                )
            self.received.extend((await request.json())["records"])
            return web.json_response({"stored": len(self.received)})

        async def desired(request: web.Request) -> web.Response:
            if (refusal := denied(request)) is not None:
                return refusal
            return web.json_response({"device": {"version": 3, "config": {}}})

        app = web.Application()
        app.router.add_post("/v1/devices/{id}/records", records)
        app.router.add_get("/v1/devices/{id}/desired", desired)
        return app


@pytest.fixture
def platform() -> Iterator[tuple[FakePlatform, str]]:
    fake = FakePlatform()
    with serve(fake.app()) as url:
        yield fake, url


def record(i: int) -> OutboxRecord:
    payload = json.dumps({"n": i}).encode()
    return OutboxRecord(i, "events", "edgefn/v1/d1/events", payload, f"k{i}", 0.0, 0, len(payload))


async def test_records_are_acked_on_2xx_and_failed_otherwise_with_a_code(
    platform: tuple[FakePlatform, str],
) -> None:
    fake, url = platform
    http = HttpTransport(url, "d1", TOKEN, None)
    try:
        ok = await http.send([record(1), record(2)])
        assert (ok.acked, ok.failed) == ([1, 2], [])
        assert [r["key"] for r in fake.received] == ["k1", "k2"]
        assert http.last_error is None and http.last_ok is not None
        fake.mode = "5xx"
        failed = await http.send([record(3)])
        assert (failed.acked, failed.failed) == ([], [3])
        assert http.last_error_code == "http_fallback_failed"
        assert http.last_error == "POST /records: disk full (store_error, HTTP 503)"
        assert (await http.fetch_desired())["device"]["version"] == 3
        assert http.last_error is None and http.last_error_code is None
    finally:
        await http.close()


async def test_a_refused_device_and_an_unreachable_platform(
    platform: tuple[FakePlatform, str],
) -> None:
    _, url = platform
    denied = HttpTransport(url, "d1", "wrong", None)
    dead = HttpTransport(f"http://127.0.0.1:{free_port()}", "d1", TOKEN, None)
    try:
        assert (await denied.send([record(1)])).failed == [1]
        assert denied.last_error_code == "http_refused"
        with pytest.raises(HttpError) as refused:
            await denied.fetch_desired()
        assert refused.value.code == "http_refused"
        assert "(forbidden, HTTP 403)" in refused.value.message
    finally:
        await denied.close()
    try:
        assert (await dead.send([record(1)])).failed == [1]
        assert dead.last_error_code == "http_fallback_failed"
        assert dead.last_error is not None and "(http_unreachable)" in dead.last_error
    finally:
        await dead.close()

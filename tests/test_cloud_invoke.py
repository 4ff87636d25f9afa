"""The cloud invoker and its circuit breaker against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from cloud_sync.cloud_invoke import FAILURES_TO_OPEN, CircuitOpen, CloudInvoker
from runtimes.errors import FunctionError
from runtimes.invocation import Invocation
from tests.http_servers import serve


class Cloud:
    def __init__(self) -> None:
        self.slow_started = threading.Event()

    def app(self) -> web.Application:
        async def invoke(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if name == "slow":
                self.slow_started.set()
                await asyncio.sleep(10)
            if name == "fails":
                return web.json_response(
                    {"error": {"code": "function_error", "message": "boom"}}, status=500
                )
            body = await request.read()
            return web.Response(body=b"cloud:" + body, headers={"X-Edgefn-Version": "1.0.0"})

        app = web.Application()
        app.router.add_post("/v1/functions/{name}/invoke", invoke)
        return app


@pytest.fixture
def cloud() -> Iterator[tuple[Cloud, str]]:
    c = Cloud()
    with serve(c.app()) as url:
        yield c, url


def inv(payload: bytes = b"x", timeout_s: float = 10.0) -> Invocation:
    return Invocation(payload, "req-1", timeout_s, "", "")


def half_open(invoker: CloudInvoker) -> None:
    """The state after FAILURES_TO_OPEN failures and a cool-down that has passed."""
    invoker.breaker.failures = FAILURES_TO_OPEN
    invoker.breaker.opened_at = time.monotonic() - invoker.breaker.cooldown_s - 1
    assert invoker.breaker.state == "half-open"


async def test_a_cancelled_probe_releases_the_half_open_slot(cloud: tuple[Cloud, str]) -> None:
    server, url = cloud
    invoker = CloudInvoker(url, token="t")
    try:
        half_open(invoker)
        probe = asyncio.create_task(invoker.invoke("slow", inv()))
        for _ in range(200):  # bounded: until the server holds the probe request
            if server.slow_started.is_set():
                break
            await asyncio.sleep(0.02)
        assert server.slow_started.is_set()
        assert invoker.breaker.probing
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert not invoker.breaker.probing
        # The next call is the new probe, not "circuit open" forever; it succeeds and closes.
        result, version = await invoker.invoke("echo", inv(b"hi"))
        assert result.payload == b"cloud:hi" and version == "1.0.0"
        assert invoker.breaker.state == "closed"
    finally:
        await invoker.close()


async def test_only_one_probe_while_half_open(cloud: tuple[Cloud, str]) -> None:
    server, url = cloud
    invoker = CloudInvoker(url)
    try:
        half_open(invoker)
        probe = asyncio.create_task(invoker.invoke("slow", inv()))
        for _ in range(200):
            if server.slow_started.is_set():
                break
            await asyncio.sleep(0.02)
        with pytest.raises(CircuitOpen) as second:
            await invoker.invoke("echo", inv())
        assert second.value.code == "cloud_circuit_open"
        # The refused second call did not release the probe slot the first one holds.
        assert invoker.breaker.probing
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
    finally:
        await invoker.close()


async def test_a_function_error_is_a_healthy_cloud(cloud: tuple[Cloud, str]) -> None:
    _, url = cloud
    invoker = CloudInvoker(url)
    try:
        half_open(invoker)
        with pytest.raises(FunctionError, match="boom"):
            await invoker.invoke("fails", inv())
        assert invoker.breaker.state == "closed" and not invoker.breaker.probing
    finally:
        await invoker.close()

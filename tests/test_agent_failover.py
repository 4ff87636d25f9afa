"""The agent's several platform URLs: fail over on no answer or 502-504, stay on the one that works.

The HTTP client against real loopback servers (one restartable, one answering chosen statuses),
the agent's settings (`--cloud` repeated, `cloud.url = [...]`), and end to end: a real agent
syncing over HTTP with two real platform processes, one of them `kill -9`ed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cloud_sync.http_client import AsyncHttpClient, Endpoint, SyncHttpClient, Unreachable
from edge_agent import cli_run
from edge_agent.errors import StartupError
from tests.harness import FUNCTIONS, AgentProcess, install_dev_function, start_agent
from tests.mosquitto import free_port
from tests.registry_helpers import Platform, start_platform

FN = "conformance-node"
BOUND_S = 60.0


class Server:
    """A loopback aiohttp server that counts hits and answers `status` (restartable)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.hits = 0
        self.status = 200
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await request.read()
        return web.json_response({"server": self.name}, status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Server, Server]]:
    a, b = Server("a"), Server("b")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


def _client(a: Server, b: Server) -> AsyncHttpClient:
    return AsyncHttpClient(Endpoint(a.url, fallback_urls=(b.url,), timeout_s=5, name="platform"))


async def test_unreachable_first_url_fails_over_and_sticks(servers: tuple[Server, Server]) -> None:
    a, b = servers
    client = _client(a, b)
    try:
        assert (await client.call("GET", "/x"))["server"] == "a"
        await a.stop()  # connection refused from now on
        assert (await client.call("POST", "/records", {"n": 1}))["server"] == "b"
        assert client.current.base_url == b.url
        await a.start()  # back, but the client stays where it works
        before = a.hits
        for _ in range(3):
            assert (await client.call("GET", "/x"))["server"] == "b"
        assert a.hits == before
    finally:
        await client.close()


async def test_503_fails_over_any_method_500_only_for_reads(
    servers: tuple[Server, Server],
) -> None:
    a, b = servers
    client = _client(a, b)
    try:
        a.status = 503
        assert (await client.call("POST", "/records", {}))["server"] == "b"
        b.status, a.status = 500, 200
        # A POST answered 500 may have done something: handed back, not sent elsewhere.
        resp = await client.request("POST", "/records", json={})
        assert resp.status == 500 and resp.json()["server"] == "b"
        assert client.current.base_url == b.url
        # A read answered 500 goes on to the next URL (wrapping round to a).
        resp = await client.request("GET", "/desired")
        assert resp.status == 200 and resp.json()["server"] == "a"
        assert client.current.base_url == a.url
    finally:
        await client.close()


async def test_every_url_failing_says_so(servers: tuple[Server, Server]) -> None:
    a, b = servers
    client = _client(a, b)
    try:
        a.status = b.status = 503
        resp = await client.request("GET", "/x")
        assert resp.status == 503  # the last answer, not a made-up error
        assert a.hits == 1 and b.hits == 1  # each tried once
        await a.stop()
        await b.stop()
        with pytest.raises(Unreachable):
            await client.request("GET", "/x")
    finally:
        await client.close()


async def test_blocking_client_fails_over_before_the_body_streams(
    servers: tuple[Server, Server],
) -> None:
    a, b = servers
    await a.stop()
    client = SyncHttpClient(Endpoint(a.url, fallback_urls=(b.url,), timeout_s=5))
    status, doc = await asyncio.to_thread(client.call, "GET", "/v1/registry/x")
    assert (status, doc["server"]) == (200, "b")
    assert client.current.base_url == b.url


async def test_blocking_client_hands_back_an_answer_over_no_answer(
    servers: tuple[Server, Server],
) -> None:
    a, b = servers
    a.status = 503
    await b.stop()
    client = SyncHttpClient(Endpoint(a.url, fallback_urls=(b.url,), timeout_s=5))
    resp = await asyncio.to_thread(client.request, "GET", "/x")
    assert resp.status == 503 and resp.json()["server"] == "a"


def _parse(*argv: str) -> Any:
    parser = argparse.ArgumentParser()
    cli_run.add_parser(parser.add_subparsers(dest="command"))
    return cli_run.settings_from_args(parser.parse_args(["run", *argv]))


def test_cloud_flag_repeated_and_config_array(tmp_path: Path) -> None:
    s = _parse("--data-dir", str(tmp_path), "--cloud", "http://a:1/", "--cloud", "http://b:2")
    assert s.cloud_url == "http://a:1"
    assert s.cloud_fallback_urls == ("http://b:2",)
    conf = tmp_path / "agent.toml"
    conf.write_text('[cloud]\nurl = ["https://p1:8690", "https://p2:8690", "https://p1:8690"]\n')
    s = _parse("--data-dir", str(tmp_path), "--config", str(conf))
    assert (s.cloud_url, s.cloud_fallback_urls) == ("https://p1:8690", ("https://p2:8690",))
    conf.write_text('[cloud]\nurl = "https://only:8690"\n')
    s = _parse("--data-dir", str(tmp_path), "--config", str(conf))
    assert (s.cloud_url, s.cloud_fallback_urls) == ("https://only:8690", ())
    with pytest.raises(StartupError, match="http"):
        _parse("--data-dir", str(tmp_path), "--cloud", "ftp://x")


# ---- end to end: a real agent, two real platform processes -----------------------------------


def _wait(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + BOUND_S
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {BOUND_S} s waiting for {what}")
        time.sleep(0.1)


def _api(plat: Platform, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        plat.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {plat.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _invocations(plat: Platform, device: str) -> int:
    doc = _api(plat, "GET", f"/v1/devices/{device}/metrics?function={FN}")
    return int(doc["functions"].get(FN, {}).get("invocations", 0))


@pytest.fixture
def running() -> Iterator[list[Platform | AgentProcess]]:
    made: list[Platform | AgentProcess] = []
    yield made
    for p in reversed(made):
        if isinstance(p, AgentProcess):
            p.stop(signal.SIGKILL if p.proc.poll() is None else signal.SIGTERM)
        else:
            p.stop()


@pytest.mark.slow
def test_agent_keeps_syncing_through_the_other_replica_when_one_is_killed(
    tmp_path: Path, running: list[Platform | AgentProcess]
) -> None:
    data = tmp_path / "platform"
    # No broker anywhere (the credentials name a closed port): the agent syncs over HTTP.
    dead_broker = f"mqtts://127.0.0.1:{free_port()}"
    a = start_platform(data, "--no-mqtt", "--device-broker-url", dead_broker)
    running.append(a)
    enrolled = _api(a, "POST", "/v1/devices", {"id": "edge-01", "labels": {}})
    creds = tmp_path / "edge-01.json"
    creds.write_text(json.dumps(enrolled))
    os.chmod(creds, 0o600)
    # The second replica starts after the enrolment (it reads the device tokens at start).
    b = start_platform(data, "--no-mqtt", "--device-broker-url", dead_broker)
    running.append(b)
    agent_dir = tmp_path / "agent"
    install_dev_function(FUNCTIONS / "conformance" / "node", agent_dir, FN)
    agent = start_agent(
        agent_dir, "--credentials", str(creds), "--cloud", a.url, "--cloud", b.url,
        "--fallback-after", "0.5", "--metrics-interval", "0.3",
    )  # fmt: skip
    running.append(agent)
    sync = lambda: dict(agent.get("/v1/health").json()["sync"])  # noqa: E731
    _wait(lambda: sync()["transport"] == "http", "HTTP sync (no broker)")
    for i in range(3):
        assert agent.invoke(FN, f"p-{i}".encode()).status == 200
    _wait(lambda: _invocations(b, "edge-01") == 3, "3 invocations stored (through a)")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    for i in range(5):
        assert agent.invoke(FN, f"q-{i}".encode()).status == 200
    # Records keep arriving, now through b; each stored once (the outbox key de-duplicates
    # a batch that a died holding).
    _wait(lambda: _invocations(b, "edge-01") == 8, "8 invocations stored through b")
    # Desired state set through b reaches the device (polled over HTTP from b).
    _api(b, "POST", "/v1/devices/edge-01/config", {"set": {f"functions.{FN}.routing": "local"}})
    _wait(lambda: sync()["config"]["applied"]["device_version"] == 1, "config pulled from b")
    time.sleep(1)  # more metric rounds: still exactly 8 invocations, nothing counted twice
    assert _invocations(b, "edge-01") == 8

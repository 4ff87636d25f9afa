"""Secrets end to end: `edge-cloud secret set` -> platform -> Mosquitto notice -> agent -> function.

Real processes on loopback: the platform (`edge-cloud serve` on a real Mosquitto with TLS and
the ACL), an agent process joined to it, real Node workers. Everything the agent and the CLI say
to the platform goes through a recording HTTP proxy, and a platform-identity MQTT session
subscribed to `edgefn/#` records the broker's traffic: neither, nor the platform's or the agent's
log, may ever contain a clear value. Also: `not_permitted` for a function without the
permission, rotation acknowledged -> no invocation sees the old value (same workers), `secret
list` without values, the file at rest not clear text, a damaged file set aside at restart, and a
desired config change reaching a running function (`context.onConfigChange`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edge_agent.secret_store import FILE_NAME
from tests.harness import AgentProcess, start_agent
from tests.http_servers import serve
from tests.mosquitto import Broker, platform_session
from tests.test_building_blocks import make_fn
from tests.test_sync_e2e import Platform, enrol, start_platform, wait_for

pytestmark = pytest.mark.slow

VALUE_1 = b"maps-KEY-first-7f3a9c"
VALUE_2 = b"maps-KEY-rotated-b81d42"
GROUP_VALUE = b"fleet-TOKEN-north-55e1"
CLEAR = (VALUE_1, VALUE_2, GROUP_VALUE)


def leaks(blob: bytes) -> list[bytes]:
    """The clear values (raw or base64) found in `blob`."""
    found = []
    for v in CLEAR:
        if v in blob or base64.b64encode(v) in blob or base64.b64encode(v)[:16] in blob:
            found.append(v)
    return found


@dataclass
class Recording:
    bodies: list[bytes] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@contextlib.contextmanager
def recording_proxy(upstream: str) -> Iterator[tuple[str, Recording]]:
    """An HTTP proxy to `upstream` that keeps every request and response body."""
    rec = Recording()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with (
            aiohttp.ClientSession() as s,
            s.request(request.method, upstream + request.path_qs, data=body, headers=headers) as r,
        ):
            answer = await r.read()
            rec.paths.append(f"{request.method} {request.path}")
            rec.bodies += [body, answer]
            keep = {"Content-Type": r.headers.get("Content-Type", "application/json")}
            return web.Response(status=r.status, body=answer, headers=keep)

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    with serve(app) as url:
        yield url, rec


@contextlib.contextmanager
def sniffer(broker: Broker) -> Iterator[list[tuple[str, bytes]]]:
    """Every message on `edgefn/#`, seen with the platform's full ACL, in a thread of its own."""
    seen: list[tuple[str, bytes]] = []
    stop = threading.Event()
    up = threading.Event()

    async def run() -> None:
        session = platform_session(broker, "edgefn/#", client_id="secrets-sniffer")
        await session.start()
        up.set()
        try:
            while not stop.is_set():
                try:
                    msg = await asyncio.wait_for(session.messages.get(), 0.1)
                except TimeoutError:
                    continue
                seen.append((msg.topic, bytes(msg.payload)))
                await msg.ack()
        finally:
            await session.close()

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    assert up.wait(30), "the sniffer did not connect"
    try:
        yield seen
    finally:
        stop.set()
        thread.join(20)


def blocks(*calls: dict[str, Any]) -> bytes:
    return json.dumps({"op": "blocks", "calls": list(calls)}).encode()


def results(agent: AgentProcess, fn: str, body: bytes) -> list[dict[str, Any]]:
    resp = agent.invoke(fn, body, {"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    return list(resp.json()["results"])


def results_of(agent: AgentProcess, fn: str, op: dict[str, Any]) -> Any:
    resp = agent.invoke(fn, json.dumps(op).encode(), {"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    return resp.json()


def read_secret(agent: AgentProcess, fn: str, name: str) -> dict[str, Any]:
    return results(agent, fn, blocks({"op": "secret", "target": name}))[0]


def worker_pids(agent: AgentProcess, fn: str) -> set[int]:
    """Every `pid` in the agent's description of the function (its workers)."""
    found: set[int] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "pid" and isinstance(x, int):
                    found.add(x)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(agent.get(f"/v1/functions/{fn}").json())
    return found


def secret_list(plat: Platform, proxy: str, *args: str) -> Any:
    out = plat.cli("secret", "list", *args, "--json", "--platform", proxy).stdout
    return json.loads(out)["secrets"]


def test_secrets_end_to_end(tmp_path: Path, mosquitto_factory: Callable[..., Broker]) -> None:
    broker = mosquitto_factory(persistence=True, autosave_on_changes=True)
    plat = start_platform(broker.workdir / "platform", "--broker", broker.url)
    agent: AgentProcess | None = None
    try:
        with sniffer(broker) as mqtt_seen, recording_proxy(plat.url) as (proxy, rec):
            creds = enrol(plat, "edge-01", tmp_path, labels="group=north")
            data = tmp_path / "agent"
            make_fn(data, "reader", permissions='secrets = ["maps-api-key", "fleet-token"]')
            make_fn(data, "nosy", permissions='secrets = ["something-else"]')
            value_file = tmp_path / "value"
            value_file.write_bytes(VALUE_1)
            value_file.chmod(0o600)

            def start() -> AgentProcess:
                return start_agent(data, "--credentials", str(creds), "--cloud", proxy)

            agent = start()
            wait_for(lambda: plat.devices()["edge-01"]["online"], "device online")
            # ---- set -> delivered -> read by the function that names it
            out = plat.cli("secret", "set", "maps-api-key", "--device", "edge-01",
                           "--from-file", str(value_file), "--platform", proxy)  # fmt: skip
            assert "version 1" in out.stdout
            wait_for(
                lambda: read_secret(agent, "reader", "maps-api-key") == {"value": VALUE_1.decode()},
                "the function to read the delivered secret",
            )
            value_file.write_bytes(GROUP_VALUE)
            plat.cli("secret", "set", "fleet-token", "--group", "north",
                     "--from-file", str(value_file), "--platform", proxy)  # fmt: skip
            wait_for(
                lambda: (
                    read_secret(agent, "reader", "fleet-token") == {"value": GROUP_VALUE.decode()}
                ),
                "the group's secret on the device",
            )
            # ---- a function without the permission
            refused = read_secret(agent, "nosy", "maps-api-key")
            assert refused["code"] == "not_permitted"
            agent.wait_log(r"refused secret 'maps-api-key' for nosy@1\.0\.0")
            # ---- rotation: once acknowledged, no invocation returns the old value
            pids = worker_pids(agent, "reader")
            assert pids
            value_file.write_bytes(VALUE_2)
            out = plat.cli("secret", "set", "maps-api-key", "--device", "edge-01",
                           "--from-file", str(value_file), "--platform", proxy)  # fmt: skip
            assert "version 2" in out.stdout  # versions grow per name

            def acknowledged() -> bool:
                rows = secret_list(plat, proxy, "--device", "edge-01")
                mine = [r for r in rows if r["name"] == "maps-api-key"]
                return bool(mine) and mine[0]["acknowledged"].get("edge-01") == 2

            wait_for(acknowledged, "the device to acknowledge version 2")
            health = agent.get("/v1/health")
            assert health.json()["secrets"]["held"] == {"fleet-token": 1, "maps-api-key": 2}
            assert not leaks(health.body)
            for _ in range(10):
                assert read_secret(agent, "reader", "maps-api-key") == {"value": VALUE_2.decode()}
            assert pids <= worker_pids(agent, "reader")  # the same workers: no restart was needed
            # ---- secret list: names, versions, targets; never a value
            listed = plat.cli("secret", "list", "--platform", proxy).stdout
            assert "maps-api-key" in listed and "fleet-token" in listed and "edge-01@v2" in listed
            as_json = plat.cli("secret", "list", "--json", "--platform", proxy).stdout
            assert not leaks(listed.encode()) and not leaks(as_json.encode())
            # ---- at rest on the device: sealed, 0600
            at_rest = data / FILE_NAME
            assert at_rest.stat().st_mode & 0o777 == 0o600
            assert not leaks(at_rest.read_bytes())
            # ---- config change reaches the running function
            watching = results_of(agent, "reader", {"op": "watch_config"})
            assert watching == {"watching": True}
            plat.cli("device", "config", "edge-01", "--set", "functions.reader.config.zone=north",
                     "--platform", proxy)  # fmt: skip

            def seen_config() -> bool:
                assert agent is not None
                return {"zone": "north"} in results_of(agent, "reader", {"op": "config_seen"})[
                    "seen"
                ]

            wait_for(seen_config, "the running function to hear its new config")
            # ---- a damaged secrets file does not stop the agent; the platform refills it
            agent.stop()
            at_rest.write_bytes(b"\x00garbage{")
            agent = start()
            agent.wait_log(r"secrets file secrets\.json is damaged")
            wait_for(
                lambda: read_secret(agent, "reader", "maps-api-key") == {"value": VALUE_2.decode()},
                "the secrets fetched again after the damaged file was set aside",
            )
            assert list(data.glob(FILE_NAME + ".corrupt-*"))
        # ---- nothing in clear anywhere: HTTP bodies, the broker, the logs
        assert any(p.startswith("GET /v1/devices/edge-01/secrets") for p in rec.paths)
        assert any(p.startswith("PUT /v1/secrets/maps-api-key") for p in rec.paths)
        assert [p for p in rec.bodies if leaks(p)] == []
        secrets_topic = "edgefn/v1/devices/edge-01/secrets"
        assert any(t == secrets_topic for t, _ in mqtt_seen), [t for t, _ in mqtt_seen]
        assert [(t, p) for t, p in mqtt_seen if leaks(p)] == []
        # The logs were captured (they name the secrets) and hold no value.
        assert "secret maps-api-key set for device edge-01: version 2" in "\n".join(plat.lines)
        assert not leaks("\n".join(plat.lines).encode())
        assert "secrets: now holding" in agent.log_text()
        assert not leaks(agent.log_text().encode())
    finally:
        if agent is not None:
            agent.stop()
        plat.stop()

"""Routing policies and fallbacks against a real platform on loopback that is stopped, slowed and
broken on purpose. The same signed bundle runs on the device and in the cloud; flag files in
one place's function directory make that place misbehave.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.harness import FUNCTIONS, AgentProcess, http, start_agent
from tests.registry_helpers import (
    Platform,
    build,
    cli,
    ok,
    publish,
    serve_app,
    start_platform,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("routing")
    key = root / "publisher.key"
    ok(cli("keys", "create", "--out", key))
    src = root / "where"
    shutil.copytree(FUNCTIONS / "where", src)
    bundle = build(src, key, root / "where.efb")
    platform = start_platform(root / "cloud")
    publish(platform, bundle)
    yield platform
    platform.stop()


def cloud_fn_dir(cloud: Platform) -> Path:
    return cloud.data_dir / "exec" / "where" / "1.0.0"


@pytest.fixture(autouse=True)
def clear_cloud_flags(cloud: Platform) -> Iterator[None]:
    yield
    for flag in ("crash", "slow", "throw"):
        (cloud_fn_dir(cloud) / flag).unlink(missing_ok=True)


def device(
    tmp_path: Path, url: str, token: str, routing: dict[str, object] | None, *extra: str
) -> AgentProcess:
    """An agent with a development copy of `where` (routing table as given) and --cloud URL."""
    data = tmp_path / "device"
    d = data / "functions" / "where"
    shutil.copytree(FUNCTIONS / "where", d)
    if routing is not None:
        table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in routing.items())
        with (d / "edgefn.toml").open("a") as f:
            f.write(f"\n[routing]\n{table}\n")
    return start_agent(data, "--cloud", url, "--cloud-token", token, *extra)


def call(agent: AgentProcess, body: bytes = b"hi", name: str = "where") -> tuple[int, str, bytes]:
    resp = agent.invoke(name, body)
    return resp.status, resp.headers.get("X-Edgefn-Served-By", ""), resp.body


def test_cloud_policy_runs_the_published_bundle_on_the_platform(
    cloud: Platform, tmp_path: Path
) -> None:
    agent = device(tmp_path, cloud.url, cloud.token, {"policy": "cloud"})
    try:
        resp = agent.invoke("where", b"\x00route\xff")
        assert resp.status == 200, resp.body
        assert resp.body == b"echo:\x00route\xff"
        assert resp.headers["X-Edgefn-Served-By"] == "cloud"
        assert resp.headers["X-Edgefn-Version"] == "1.0.0"
        assert (cloud_fn_dir(cloud) / "edgefn.toml").is_file()
    finally:
        agent.stop()


def test_cloud_invoke_needs_a_token(cloud: Platform) -> None:
    resp = http("POST", f"{cloud.url}/v1/functions/where/invoke", b"x")
    assert resp.status == 401
    assert resp.json()["error"]["code"] == "unauthorized"
    wrong = http(
        "POST", f"{cloud.url}/v1/functions/where/invoke", b"x", {"Authorization": "Bearer nope"}
    )
    assert wrong.status == 403


def test_local_then_cloud_falls_back_on_a_local_crash(cloud: Platform, tmp_path: Path) -> None:
    agent = device(tmp_path, cloud.url, cloud.token, {"policy": "local-then-cloud"})
    try:
        assert call(agent) == (200, "local", b"echo:hi")
        (agent.data_dir / "functions" / "where" / "crash").write_text("x")
        assert call(agent) == (200, "cloud", b"echo:hi")
    finally:
        agent.stop()


def test_missing_function_goes_to_the_cloud_with_default_routing(
    cloud: Platform, tmp_path: Path
) -> None:
    data = tmp_path / "empty"
    args = ("--cloud", cloud.url, "--cloud-token", cloud.token)
    agent = start_agent(data, *args, "--default-routing", "local-then-cloud")
    try:
        assert call(agent) == (200, "cloud", b"echo:hi")
        missing = agent.invoke("nowhere", b"x")
        assert missing.status == 404
        message = missing.json()["error"]["message"]
        assert "local:" in message and "cloud:" in message
    finally:
        agent.stop()


def test_function_error_does_not_fall_back(cloud: Platform, tmp_path: Path) -> None:
    agent = device(tmp_path, cloud.url, cloud.token, {"policy": "local-then-cloud"})
    try:
        (agent.data_dir / "functions" / "where" / "throw").write_text("x")
        resp = agent.invoke("where", b"x")
        assert resp.status == 500
        err = resp.json()["error"]
        assert err["code"] == "function_error"
        assert "cloud" not in err["message"]
    finally:
        agent.stop()


def test_cloud_then_local_survives_a_slow_cloud(cloud: Platform, tmp_path: Path) -> None:
    routing = {"policy": "cloud-then-local", "cloud_timeout_ms": 500}
    agent = device(tmp_path, cloud.url, cloud.token, routing)
    try:
        assert call(agent) == (200, "cloud", b"echo:hi")
        (cloud_fn_dir(cloud) / "slow").write_text("x")
        started = time.monotonic()
        assert call(agent) == (200, "local", b"echo:hi")
        assert time.monotonic() - started < 2.5  # the cloud step gave up at its own timeout
    finally:
        agent.stop()


def test_both_places_failing_names_each_step(cloud: Platform, tmp_path: Path) -> None:
    agent = device(tmp_path, cloud.url, cloud.token, {"policy": "cloud-then-local"})
    try:
        (cloud_fn_dir(cloud) / "crash").write_text("x")
        (agent.data_dir / "functions" / "where" / "crash").write_text("x")
        resp = agent.invoke("where", b"x")
        assert resp.status == 502
        message = resp.json()["error"]["message"]
        assert message.startswith("all routes failed: cloud: ")
        assert "; local: " in message
        assert "worker_crashed" in message
    finally:
        agent.stop()


@pytest.mark.parametrize("mode", ["5xx", "garbage", "not-ours"])
def test_cloud_then_local_survives_a_broken_cloud(
    cloud: Platform, tmp_path: Path, mode: str
) -> None:
    async def broken(request: web.Request) -> web.Response:
        await request.read()
        if mode == "5xx":
            return web.Response(status=503, text="upstream maintenance")
        if mode == "garbage":
            return web.Response(status=200, body=b"\x00\x01 not a function answer")
        return web.json_response({"error": "no"}, status=500)

    app = web.Application()
    app.router.add_post("/v1/functions/{name}/invoke", broken)
    with serve_app(app) as url:
        agent = device(tmp_path, url, "t", {"policy": "cloud-then-local"})
        try:
            assert call(agent) == (200, "local", b"echo:hi")
        finally:
            agent.stop()


def test_unreachable_cloud_opens_the_circuit_and_probes_again(
    cloud: Platform, tmp_path: Path
) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    agent = device(tmp_path, dead, "t", {"policy": "cloud-then-local"})
    try:
        for _ in range(3):
            assert call(agent) == (200, "local", b"echo:hi")
        health = agent.get("/v1/health").json()["cloud"]
        assert health["breaker"] == "open"
        assert health["failures"] >= 3
        # While open, calls skip the cloud and are answered locally at once.
        assert call(agent) == (200, "local", b"echo:hi")
    finally:
        agent.stop()


def test_stale_cache_answers_when_every_place_fails(cloud: Platform, tmp_path: Path) -> None:
    data = tmp_path / "device"
    d = data / "functions" / "where"
    shutil.copytree(FUNCTIONS / "where", d)
    with (d / "edgefn.toml").open("a") as f:
        f.write('\n[routing]\npolicy = "cloud"\n[cache]\nenabled = true\nttl_s = 0.3\n')
        f.write("stale_if_error_s = 600\n")
    agent = start_agent(data, "--cloud", cloud.url, "--cloud-token", cloud.token)
    try:
        first = agent.invoke("where", b"tip")
        assert first.headers["X-Edgefn-Served-By"] == "cloud"
        for _ in range(100):  # bounded: wait for the cache writer (off the request path)
            if agent.get("/v1/health").json()["cache"]["writes"] >= 1:
                break
            time.sleep(0.05)
        time.sleep(0.4)  # past ttl_s
        (cloud_fn_dir(cloud) / "crash").write_text("x")
        stale = agent.invoke("where", b"tip")
        assert stale.status == 200
        assert stale.body == b"echo:tip"
        assert stale.headers["X-Edgefn-Cache"] == "stale"
        assert stale.headers["X-Edgefn-Served-By"] == "cache"
    finally:
        agent.stop()

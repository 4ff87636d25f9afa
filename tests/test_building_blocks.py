"""Building blocks end to end through a real agent (in process) and real Node workers.

The functions are copies of the Node conformance function (its `blocks` op makes the calls it
is told to), each with its own manifest and [permissions]. Covers issue 18's faults: a nested
invoke past the parent's deadline, a state flood past its bound, a function without the
permission for each block, an invocation cycle, and state surviving restarts and switches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.settings import Settings
from runtimes.sandbox import Sandbox

NODE_FN = Path(__file__).parent / "functions" / "conformance" / "node" / "handler.js"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _install_examples(data: Path) -> None:
    from runtimes.gobuild import build_go

    (data / "functions").mkdir(parents=True)
    shutil.copytree(EXAMPLES / "eta-node", data / "functions" / "eta-node")
    route = data / "functions" / "route-go"
    shutil.copytree(EXAMPLES / "route-go", route)
    build_go(route, route / "route-go")


def make_fn(
    data_dir: Path,
    name: str,
    *,
    version: str = "1.0.0",
    timeout_ms: int = 5000,
    permissions: str = "",
) -> Path:
    d = data_dir / "functions" / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(NODE_FN, d / "handler.js")
    (d / "edgefn.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nruntime = "node"\nentry = "handler.js"\n'
        f"timeout_ms = {timeout_ms}\n\n[pool]\nmin_instances = 1\n\n"
        + (f"[permissions]\n{permissions}\n" if permissions else "")
    )
    return d


def blocks(*calls: dict[str, Any]) -> bytes:
    return json.dumps({"op": "blocks", "calls": list(calls)}).encode()


async def run(agent: Agent, name: str, payload: bytes, request_id: str = "req-1") -> Any:
    routed = await agent.router.invoke(
        name, payload, request_id=request_id, content_type="application/json"
    )
    return json.loads(routed.result.payload)["results"]


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    a = Agent(Settings(data_dir=tmp_path / "d", port=0))
    make_fn(a.settings.data_dir, "eta", permissions="state = { max_bytes = 4096 }")
    make_fn(
        a.settings.data_dir,
        "route",
        timeout_ms=1500,
        permissions='invoke = ["eta"]\npublish = ["traffic/#"]\nstate = { max_bytes = 1000 }',
    )
    make_fn(a.settings.data_dir, "bare")  # no [permissions]: no building block at all
    await a.open(sandbox=Sandbox())
    await a.functions.sync()
    assert set(a.functions.loaded) == {"eta", "route", "bare"}, a.functions.problems
    yield a
    await a.stop()


@pytest.mark.slow
async def test_nested_invoke_goes_through_the_router(agent: Agent) -> None:
    inner = json.dumps({"op": "context"})
    [res] = await run(agent, "route", blocks({"op": "invoke", "target": "eta", "payload": inner}))
    ctx = json.loads(res["value"])
    assert ctx["function"] == "eta"
    # The callee got less time than the caller's 1.5 s, never its own 5 s.
    assert 0 < ctx["deadline_ms_left"] < 1500


@pytest.mark.slow
async def test_nested_invoke_past_the_parents_deadline_is_a_timeout(agent: Agent) -> None:
    slow = json.dumps({"op": "sleep", "ms": 4000})  # eta may take 5 s; route has 1.5 s
    [res] = await run(agent, "route", blocks({"op": "invoke", "target": "eta", "payload": slow}))
    # The parent heard `timeout` and still answered (run() returned a result, not a 504).
    assert res["code"] == "timeout"


@pytest.mark.slow
async def test_without_the_permission_each_block_is_not_permitted(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgefn.capabilities")
    calls = [
        {"op": "invoke", "target": "eta", "payload": ""},
        {"op": "publish", "target": "traffic/jam", "payload": "x"},
        {"op": "state.set", "target": "k", "payload": "v"},
        {"op": "state.get", "target": "k"},
        {"op": "state.delete", "target": "k"},
    ]
    results = await run(agent, "bare", blocks(*calls), request_id="bare-req-9")
    assert [r.get("code") for r in results] == ["not_permitted"] * len(calls)
    refusals = [r for r in caplog.records if r.name == "edgefn.capabilities"]
    assert len(refusals) == len(calls)
    for record in refusals:
        assert "bare@1.0.0" in record.getMessage()
        assert getattr(record, "request_id", None) == "bare-req-9"
    # route may invoke eta, but not bare, and may publish only under traffic/.
    results = await run(
        agent,
        "route",
        blocks(
            {"op": "invoke", "target": "bare", "payload": ""},
            {"op": "publish", "target": "weather/rain", "payload": "x"},
        ),
    )
    assert [r.get("code") for r in results] == ["not_permitted", "not_permitted"]


@pytest.mark.slow
async def test_an_invocation_cycle_is_refused(tmp_path: Path) -> None:
    a = Agent(Settings(data_dir=tmp_path / "d", port=0))
    make_fn(a.settings.data_dir, "ping", permissions='invoke = ["pong"]')
    make_fn(a.settings.data_dir, "pong", permissions='invoke = ["ping"]')
    await a.open(sandbox=Sandbox())
    try:
        await a.functions.sync()
        back = blocks({"op": "invoke", "target": "ping", "payload": ""}).decode()
        [res] = await run(a, "ping", blocks({"op": "invoke", "target": "pong", "payload": back}))
        [inner] = json.loads(res["value"])["results"]
        assert inner["code"] == "not_permitted"
        assert "ping -> pong -> ping" in inner["message"]
    finally:
        await a.stop()


@pytest.mark.slow
async def test_state_flood_is_bounded_and_others_are_unaffected(agent: Agent) -> None:
    results = await run(
        agent,
        "route",
        blocks(*({"op": "state.set", "target": f"k{i}", "payload": "x" * 100} for i in range(12))),
    )
    codes = [r.get("code") for r in results]
    assert "quota_exceeded" in codes
    assert codes.count(None) == 9  # 9 x (2-3 byte key + 100 bytes) fit in 1000, the rest do not
    # Another function's store is its own.
    results = await run(
        agent,
        "eta",
        blocks(
            {"op": "state.set", "target": "k0", "payload": "mine"},
            {"op": "state.get", "target": "k0"},
        ),
    )
    assert results == [{"value": ""}, {"value": "mine"}]
    [res] = await run(agent, "route", blocks({"op": "state.get", "target": "k0"}))
    assert res == {"value": "x" * 100}
    # Deleting makes room again.
    await run(agent, "route", blocks({"op": "state.delete", "target": "k0"}))
    [res] = await run(agent, "route", blocks({"op": "state.get", "target": "k0"}))
    assert res == {"missing": True}


@pytest.mark.slow
async def test_state_survives_a_restart_and_a_version_switch(tmp_path: Path) -> None:
    data = tmp_path / "d"
    perms = "state = { max_bytes = 4096 }"
    a = Agent(Settings(data_dir=data, port=0))
    make_fn(data, "counter", permissions=perms)
    await a.open(sandbox=Sandbox())
    try:
        await a.functions.sync()
        await run(a, "counter", blocks({"op": "state.set", "target": "n", "payload": "41"}))
    finally:
        await a.stop()
    make_fn(data, "counter", version="1.1.0", permissions=perms)  # a new version, a new agent
    b = Agent(Settings(data_dir=data, port=0))
    await b.open(sandbox=Sandbox())
    try:
        await b.functions.sync()
        assert b.functions.loaded["counter"].manifest.version == "1.1.0"
        [res] = await run(b, "counter", blocks({"op": "state.get", "target": "n"}))
        assert res == {"value": "41"}
    finally:
        await b.stop()


@pytest.mark.slow
async def test_publish_without_a_platform_is_unavailable_and_config_is_empty(
    agent: Agent,
) -> None:
    results = await run(
        agent,
        "route",
        blocks({"op": "publish", "target": "traffic/jam", "payload": "x"}, {"op": "config"}),
    )
    assert results[0]["code"] == "unavailable"
    assert json.loads(results[1]["value"]) == {}


@pytest.mark.slow
async def test_the_examples_use_invoke_state_and_publish(tmp_path: Path) -> None:
    data = tmp_path / "d"
    await asyncio.to_thread(_install_examples, data)
    a = Agent(Settings(data_dir=data, port=0))
    await a.open(sandbox=Sandbox())
    try:
        await a.functions.sync()
        assert {"eta-node", "route-go"} <= set(a.functions.loaded), a.functions.problems
        body = {"points": [[52.52, 13.405], [52.53, 13.41]], "speed_kmh": 40}

        async def route(**extra: Any) -> dict[str, Any]:
            routed = await a.router.invoke(
                "route-go",
                json.dumps({**body, **extra}).encode(),
                request_id="ex-1",
                content_type="application/json",
            )
            return dict(json.loads(routed.result.payload))

        plain = await route()
        assert set(plain) == {"distance_km", "eta_min", "legs"}  # no traffic: no calls
        first = await route(traffic="heavy")
        second = await route(traffic="heavy")
        assert first["traffic_eta_min"] > plain["eta_min"]  # eta-node's heavy-traffic factor
        assert first["tip"]
        # State counts across invocations (publish is `unavailable` without a platform and
        # tolerated by the example).
        assert (first["routes_served"], second["routes_served"]) == (1, 2)
    finally:
        await a.stop()

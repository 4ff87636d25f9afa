"""Building blocks from C++ functions, end to end through a real agent: the C++ conformance
source built with the real toolchain, once as an isolated worker (`isolation = "process"`) and
once loaded into the agent (`isolation = "in-process"`, pooled), each with its own manifest and
[permissions], calling a real Node function, its own state and its config. The same calls must
give the same answers in both hosts (issue 18: "the same surface in Node, Go and C++")."""

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
from runtimes.build import build_function
from runtimes.sandbox import Sandbox
from tests.harness import FUNCTIONS
from tests.test_building_blocks import blocks, make_fn, run

pytestmark = pytest.mark.slow

CPP_FN = FUNCTIONS / "conformance" / "cpp"
PERMS = 'invoke = ["eta"]\npublish = ["traffic/#"]\nstate = { max_bytes = 1000 }'


def _make_cpp(data_dir: Path, name: str, isolation: str, permissions: str) -> None:
    d = data_dir / "functions" / name
    shutil.copytree(CPP_FN, d)
    (d / "edgefn.toml").write_text(
        f'name = "{name}"\nversion = "1.0.0"\nruntime = "cpp"\nentry = "conformance"\n'
        f'isolation = "{isolation}"\ntimeout_ms = 1500\n\n[pool]\nconcurrency = 8\n'
        "min_instances = 1\n\n" + (f"[permissions]\n{permissions}\n" if permissions else "")
    )
    build_function(d)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir's functions, built once: two C++ hosts with permissions, one without."""
    data = tmp_path_factory.mktemp("cpp-blocks") / "d"
    _make_cpp(data, "route-proc", "process", PERMS)
    _make_cpp(data, "route-inproc", "in-process", PERMS)
    _make_cpp(data, "bare-cpp", "process", "")
    make_fn(data, "eta", permissions="state = { max_bytes = 4096 }")
    return data


@pytest.fixture
async def agent(built: Path, tmp_path: Path) -> AsyncIterator[Agent]:
    data = tmp_path / "d"
    await asyncio.to_thread(shutil.copytree, built, data)
    a = Agent(Settings(data_dir=data, port=0))
    await a.open(sandbox=Sandbox())
    await a.functions.sync()
    assert {"route-proc", "route-inproc", "bare-cpp", "eta"} <= set(a.functions.loaded), (
        a.functions.problems
    )
    yield a
    await a.stop()


@pytest.mark.parametrize("host", ["route-proc", "route-inproc"])
async def test_cpp_invoke_state_config_and_publish_through_the_agent(
    agent: Agent, host: str
) -> None:
    inner = json.dumps({"op": "context"})
    results = await run(
        agent,
        host,
        blocks(
            {"op": "invoke", "target": "eta", "payload": inner},
            {"op": "state.set", "target": "n", "payload": "41"},
            {"op": "config", "target": ""},
            {"op": "publish", "target": "traffic/jam", "payload": "x"},
            {"op": "state.get", "target": "never-set"},
        ),
        request_id=f"{host}-1",
    )
    callee = json.loads(results[0]["value"])
    assert callee["function"] == "eta"
    assert 0 < callee["deadline_ms_left"] < 1500  # bounded by the C++ caller's deadline
    assert results[1] == {"value": ""}
    assert json.loads(results[2]["value"]) == {}
    assert results[3]["code"] == "unavailable"  # no platform configured: said, not dropped
    assert results[4] == {"missing": True}
    [got] = await run(agent, host, blocks({"op": "state.get", "target": "n"}))
    assert got == {"value": "41"}
    # The other host's store is its own (state belongs to the function's name).
    other = "route-inproc" if host == "route-proc" else "route-proc"
    [theirs] = await run(agent, other, blocks({"op": "state.get", "target": "n"}))
    assert theirs == {"missing": True}


@pytest.mark.parametrize("host", ["route-proc", "route-inproc"])
async def test_cpp_nested_invoke_past_the_deadline_is_a_timeout_and_quota_holds(
    agent: Agent, host: str
) -> None:
    slow = json.dumps({"op": "sleep", "ms": 4000})  # eta may take 5 s; the caller has 1.5 s
    [res] = await run(agent, host, blocks({"op": "invoke", "target": "eta", "payload": slow}))
    assert res["code"] == "timeout"  # heard in time: the caller still answered
    flood = blocks(*({"op": "state.set", "target": f"k{i}", "payload": "x" * 100}
                     for i in range(12)))  # fmt: skip
    codes = [r.get("code") for r in await run(agent, host, flood)]
    assert codes.count(None) == 9 and codes.count("quota_exceeded") == 3


async def test_cpp_without_the_permission_is_not_permitted_and_logged(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgefn.capabilities")
    calls: list[dict[str, Any]] = [
        {"op": "invoke", "target": "eta", "payload": ""},
        {"op": "publish", "target": "traffic/jam", "payload": "x"},
        {"op": "state.set", "target": "k", "payload": "v"},
    ]
    results = await run(agent, "bare-cpp", blocks(*calls), request_id="bare-cpp-7")
    assert [r.get("code") for r in results] == ["not_permitted"] * len(calls)
    refusals = [r for r in caplog.records if r.name == "edgefn.capabilities"]
    assert len(refusals) == len(calls)
    assert all(getattr(r, "request_id", None) == "bare-cpp-7" for r in refusals)
    # Allowed to invoke eta, but not to publish outside traffic/.
    [res] = await run(agent, "route-inproc", blocks({"op": "publish", "target": "w/x"}))
    assert res["code"] == "not_permitted"

"""`config()` change notification: NOTIFY frames reach running Node and Go functions.

Conformance level: a real pool of the conformance function (Node, Go) is told its config
changed (`Pool.notify_config`) and the function's listener (Node `context.onConfigChange`, Go
`edgefn.ConfigChanges()`) sees the new config without an invocation. C++ (worker and in
process) is in tests/test_config_notify_cpp.py. Agent level: the agent
applying a new desired config notifies exactly the functions whose `config` changed, and a
worker keeps serving afterwards. The full loop through a platform is in tests/test_secrets_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.state import validate_config
from edge_agent.agent import Agent
from edge_agent.settings import Settings
from runtimes.build import build_function
from runtimes.invocation import Invocation
from runtimes.launchers import make_executor
from runtimes.manifest import load_manifest
from runtimes.pool import Pool
from runtimes.sandbox import Sandbox

BOUND_S = 10.0


async def ask(pool: Pool, op: str) -> Any:
    body = json.dumps({"op": op}).encode()
    inv = Invocation(body, f"r-{op}", 5.0, content_type="application/json")
    return json.loads((await pool.invoke(inv)).payload)


async def seen_configs(pool: Pool, want: int) -> list[Any]:
    """What the function was told, once it holds `want` entries (bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while True:
        seen = (await ask(pool, "config_seen"))["seen"]
        if len(seen) >= want or loop.time() > deadline:
            return list(seen)
        await asyncio.sleep(0.02)


@pytest.fixture(params=["node", "go"])
async def pool(
    request: pytest.FixtureRequest, built_conformance: dict[str, Path]
) -> AsyncIterator[Pool]:
    directory = built_conformance[request.param]
    executor = make_executor(load_manifest(directory / "edgefn.toml"), directory)
    assert isinstance(executor, Pool)
    await executor.start()
    yield executor
    await executor.close()


async def test_a_running_function_hears_its_new_config(pool: Pool) -> None:
    assert await ask(pool, "watch_config") == {"watching": True}
    assert await ask(pool, "config_seen") == {"seen": []}
    assert pool.notify_config(json.dumps({"zone": "south", "n": 2}).encode()) == 1
    assert await seen_configs(pool, 1) == [{"zone": "south", "n": 2}]
    # A second change arrives after the first; the worker still serves requests.
    assert pool.notify_config(b"{}") == 1
    seen = await seen_configs(pool, 2)
    assert seen[-1] == {}
    assert (await pool.invoke(Invocation(b"plain", "r", 5.0))).payload == b"plain"


async def test_a_function_that_does_not_listen_is_unaffected(pool: Pool) -> None:
    assert (await pool.invoke(Invocation(b"x", "r0", 5.0))).payload == b"x"
    assert pool.notify_config(b'{"zone":"east"}') == 1
    assert (await pool.invoke(Invocation(b"still here", "r1", 5.0))).payload == b"still here"
    assert await ask(pool, "config_seen") in ({"seen": []}, {"seen": [{"zone": "east"}]})


# A C++ function that writes the C ABI of edgefn.h by hand, without the optional
# `edgefn_config_changed`: its worker (the SDK's main) must not announce FEATURES `notify`.
HAND_WRITTEN_ABI = r"""
#include <cstring>
#include <edgefn.h>
extern "C" EDGEFN_EXPORT uint32_t edgefn_abi_version(void) { return EDGEFN_ABI_VERSION; }
extern "C" EDGEFN_EXPORT int32_t edgefn_invoke(const edgefn_call* c) {
    uint8_t* out = c->alloc(c->host, c->payload_len);
    if (out) std::memcpy(out, c->payload, c->payload_len);
    return EDGEFN_OK;
}
"""


async def test_a_host_that_did_not_announce_notify_is_never_sent_one(tmp_path: Path) -> None:
    """A worker whose READY has no FEATURES `notify` (here a C++ worker of a library without
    `edgefn_config_changed`, like a Go function built with an older SDK) is not sent NOTIFY,
    which it could take for a protocol violation."""
    directory = tmp_path / "bare"
    directory.mkdir()
    (directory / "bare.cpp").write_text(HAND_WRITTEN_ABI, encoding="utf-8")
    (directory / "edgefn.toml").write_text(
        'name = "bare-abi"\nversion = "1.0.0"\nruntime = "cpp"\nentry = "bare"\n'
    )
    await asyncio.to_thread(build_function, directory)
    executor = make_executor(load_manifest(directory / "edgefn.toml"), directory)
    assert isinstance(executor, Pool)
    await executor.start()
    try:
        assert (await executor.invoke(Invocation(b"a", "r0", 5.0))).payload == b"a"
        before = executor.worker_pids()
        assert executor.notify_config(b'{"zone":"x"}') == 0
        assert (await executor.invoke(Invocation(b"b", "r1", 5.0))).payload == b"b"
        assert executor.worker_pids() == before and executor.restarts == 0
    finally:
        await executor.close()


def _copy(built: Path, data: Path) -> None:
    dest = data / "functions" / load_manifest(built / "edgefn.toml").name
    shutil.copytree(built, dest)


async def test_the_agent_notifies_only_functions_whose_config_changed(
    tmp_path: Path, built_conformance: dict[str, Path]
) -> None:
    agent = Agent(Settings(data_dir=tmp_path / "d", port=0))
    (agent.settings.data_dir / "functions").mkdir(parents=True)
    _copy(built_conformance["node"], agent.settings.data_dir)
    _copy(built_conformance["go"], agent.settings.data_dir)
    await agent.open(sandbox=Sandbox())
    try:
        await agent.functions.sync()
        pools = {n: f.executor for n, f in agent.functions.loaded.items()}
        assert set(pools) == {"conformance-node", "conformance-go"}, agent.functions.problems
        for p in pools.values():
            assert isinstance(p, Pool)
            assert await ask(p, "watch_config") == {"watching": True}

        def desired(node: dict[str, Any], go: dict[str, Any]) -> Any:
            return validate_config(
                {"functions": {"conformance-node": {"config": node},
                               "conformance-go": {"config": go}}}
            )  # fmt: skip

        await agent._apply_config(desired({"zone": "north"}, {"zone": "north"}))
        for p in pools.values():
            assert isinstance(p, Pool)
            assert await seen_configs(p, 1) == [{"zone": "north"}]
        # Only Go's config changes: Node is not told again.
        await agent._apply_config(desired({"zone": "north"}, {"zone": "west", "limit": 3}))
        go, node = pools["conformance-go"], pools["conformance-node"]
        assert isinstance(go, Pool) and isinstance(node, Pool)
        assert (await seen_configs(go, 2))[-1] == {"zone": "west", "limit": 3}
        assert (await ask(node, "config_seen"))["seen"] == [{"zone": "north"}]
        # And config() itself returns the new table inside an invocation.
        body = json.dumps({"op": "blocks", "calls": [{"op": "config"}]}).encode()
        routed = await agent.router.invoke(
            "conformance-go", body, request_id="cfg", content_type="application/json"
        )
        [res] = json.loads(routed.result.payload)["results"]
        assert json.loads(res["value"]) == {"zone": "west", "limit": 3}
    finally:
        await agent.stop()

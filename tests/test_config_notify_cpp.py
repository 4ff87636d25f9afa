"""`config()` change notification for C++ functions, in both hosts.

Conformance level: the C++ conformance function, built with the real toolchain, runs as an
isolated worker (a real pool: READY announces FEATURES `notify`, NOTIFY frames go to the
worker's notification thread) and loaded into this process (the pybind11 host calls the
library's `edgefn_config_changed`, found with dlsym). Its `edgefn::on_config_change` listener
sees each new config without an invocation; a listener that throws is logged and kills
nothing; a cancelled listener hears nothing more; `edgefn::latest_config()` has the newest.
Libraries without the optional symbol (ABI 1, a hand-written ABI 2) still load and are simply
not told. Agent level: applying a desired config tells exactly the C++ functions whose config
changed, in both hosts; and end to end, `edge-cloud device config --set` on a real platform
reaches running C++ functions of a real agent process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.state import validate_config
from edge_agent.agent import Agent
from edge_agent.settings import Settings
from runtimes.cpp import INCLUDE_DIR
from runtimes.cpp.inproc import InProcessExecutor
from runtimes.cppbuild import compiler_for
from runtimes.invocation import Invocation
from runtimes.launchers import make_executor
from runtimes.manifest import load_manifest
from runtimes.pool import Pool
from runtimes.sandbox import Sandbox
from tests.harness import AgentProcess, start_agent
from tests.test_sync_e2e import Platform, enrol, start_platform, wait_for

BOUND_S = 10.0
Executor = Pool | InProcessExecutor


async def ask(executor: Executor, op: str, **fields: Any) -> Any:
    body = json.dumps({"op": op, **fields}).encode()
    inv = Invocation(body, f"r-{op}", 5.0, content_type="application/json")
    return json.loads((await executor.invoke(inv)).payload)


async def until(executor: Executor, op: str, done: Any) -> Any:
    """The answer to `op` once `done(answer)` holds, or the last one after BOUND_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while True:
        answer = await ask(executor, op)
        if done(answer) or loop.time() > deadline:
            return answer
        await asyncio.sleep(0.02)


async def seen_configs(executor: Executor, want: int) -> list[Any]:
    answer = await until(executor, "config_seen", lambda a: len(a["seen"]) >= want)
    return list(answer["seen"])


@pytest.fixture(params=["process", "in-process", "in-process-inline"])
async def cpp(
    request: pytest.FixtureRequest, built_conformance: dict[str, Path]
) -> AsyncIterator[Executor]:
    """The C++ conformance function as a worker pool, or loaded here (pooled or inline: an
    inline function gets config changes too, on the same notification thread)."""
    directory = built_conformance["cpp"]
    manifest = load_manifest(directory / "edgefn.toml")
    if request.param == "in-process-inline":
        manifest = dataclasses.replace(manifest, inline=True)
    executor: Executor
    if request.param != "process":
        executor = InProcessExecutor(
            manifest, directory, library=directory / f"{manifest.entry}.so"
        )
    else:
        made = make_executor(manifest, directory)
        assert isinstance(made, Pool)
        executor = made
    await executor.start()
    yield executor
    await executor.close()


def pids(executor: Executor) -> set[int]:
    return set(executor.worker_pids()) if isinstance(executor, Pool) else set()


async def test_a_running_cpp_function_hears_its_new_config(cpp: Executor) -> None:
    assert await ask(cpp, "watch_config") == {"watching": True}
    assert await ask(cpp, "config_seen") == {"seen": []}
    assert await ask(cpp, "config_latest") == {"latest": None}
    assert cpp.notify_config(json.dumps({"zone": "south", "n": 2}).encode()) == 1
    assert await seen_configs(cpp, 1) == [{"zone": "south", "n": 2}]
    assert await ask(cpp, "config_latest") == {"latest": {"zone": "south", "n": 2}}
    # A second change arrives after the first; the function still serves requests.
    assert cpp.notify_config(b"{}") == 1
    seen = await seen_configs(cpp, 2)
    assert seen[-1] == {}
    assert (await cpp.invoke(Invocation(b"plain", "r", 5.0))).payload == b"plain"


async def test_a_throwing_listener_is_logged_and_kills_nothing(
    cpp: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert await ask(cpp, "watch_config_throwing", message="listener-boom-7") == {"watching": True}
    assert await ask(cpp, "watch_config") == {"watching": True}
    before = pids(cpp)
    assert cpp.notify_config(b'{"zone":"east"}') == 1
    # The other listener still ran (after or before the throwing one).
    assert await seen_configs(cpp, 1) == [{"zone": "east"}]
    for _ in range(int(BOUND_S / 0.02)):  # the log line may trail the listener's effect
        if "listener-boom-7" in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert "a config-change listener threw: listener-boom-7" in caplog.text
    assert (await cpp.invoke(Invocation(b"alive", "r", 5.0))).payload == b"alive"
    if isinstance(cpp, Pool):
        assert pids(cpp) == before and cpp.restarts == 0


async def test_a_cancelled_listener_hears_nothing_more(cpp: Executor) -> None:
    assert await ask(cpp, "watch_config") == {"watching": True}
    assert cpp.notify_config(b'{"v":1}') == 1
    assert await seen_configs(cpp, 1) == [{"v": 1}]
    assert await ask(cpp, "unwatch_config") == {"watching": False}
    assert cpp.notify_config(b'{"v":2}') == 1
    # latest_config() moves on (the library was told), the cancelled listener does not.
    latest = await until(cpp, "config_latest", lambda a: a["latest"] == {"v": 2})
    assert latest == {"latest": {"v": 2}}
    assert await ask(cpp, "config_seen") == {"seen": [{"v": 1}]}


async def test_a_slow_listener_holds_up_nothing_and_gets_the_newest_config(
    cpp: Executor,
) -> None:
    """While a listener is busy, the function keeps answering (the worker's frame reader is
    not the listener's thread) and newer configs wait in one slot: of B and C sent meanwhile,
    only C is delivered after A."""
    assert await ask(cpp, "watch_config_gated") == {"watching": True}
    assert cpp.notify_config(b'{"n":"A"}') == 1
    assert await until(cpp, "config_gate", lambda a: a["waiting"] == 1) == {"waiting": 1}
    assert cpp.notify_config(b'{"n":"B"}') == 1
    assert cpp.notify_config(b'{"n":"C"}') == 1
    assert (await cpp.invoke(Invocation(b"busy listener", "r", 5.0))).payload == b"busy listener"
    # A building-block call's answer still comes back (CALL_RESULT/CALL_ERROR read meanwhile).
    [res] = (await ask(cpp, "blocks", calls=[{"op": "config"}]))["results"]
    assert res["code"] == "unavailable"  # this executor has no capability handler
    assert await ask(cpp, "config_seen") == {"seen": []}
    await ask(cpp, "config_gate", message="open")
    assert await seen_configs(cpp, 2) == [{"n": "A"}, {"n": "C"}]
    assert await ask(cpp, "config_latest") == {"latest": {"n": "C"}}


async def test_an_unknown_notify_op_is_ignored_by_the_cpp_worker(
    built_conformance: dict[str, Path],
) -> None:
    directory = built_conformance["cpp"]
    pool = make_executor(load_manifest(directory / "edgefn.toml"), directory)
    assert isinstance(pool, Pool)
    await pool.start()
    try:
        assert await ask(pool, "watch_config") == {"watching": True}
        before = pool.worker_pids()
        [worker] = pool._workers  # one worker: min_instances defaults to 1
        assert worker.notify("some-future-op", b"\x00not json")
        assert pool.notify_config(b'{"after":true}') == 1
        assert await seen_configs(pool, 1) == [{"after": True}]
        assert pool.worker_pids() == before and pool.restarts == 0
    finally:
        await pool.close()


# ---- libraries without edgefn_config_changed keep loading ------------------------------------

ABI1_SRC = r"""
#include <cstring>
#include <edgefn.h>
extern "C" uint32_t edgefn_abi_version(void) { return 1; }
extern "C" int32_t edgefn_invoke(const edgefn_call* c) {
    uint8_t* out = c->alloc(c->host, c->payload_len);
    if (out) std::memcpy(out, c->payload, c->payload_len);
    return EDGEFN_OK;
}
"""
ABI2_SRC = ABI1_SRC.replace("return 1; }", "return 2; }")


def compile_so(source: str, out: Path) -> Path:
    src = out.with_suffix(".cpp")
    src.write_text(source, encoding="utf-8")
    flags = ["-O2", "-fPIC", "-shared", "-std=c++17", "-pthread", "-I", str(INCLUDE_DIR)]
    subprocess.run(
        [compiler_for(), *flags, "-o", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.mark.parametrize("source", [ABI1_SRC, ABI2_SRC], ids=["abi1", "abi2"])
async def test_a_library_without_the_symbol_loads_and_is_not_told(
    tmp_path: Path, built_conformance: dict[str, Path], source: str
) -> None:
    lib = await asyncio.to_thread(compile_so, source, tmp_path / "plain.so")
    manifest = load_manifest(built_conformance["cpp"] / "edgefn.toml")
    ex = InProcessExecutor(manifest, tmp_path, library=lib)
    await ex.start()
    try:
        assert ex._lib.takes_config is False
        assert ex.notify_config(b'{"zone":"x"}') == 0
        assert (await ex.invoke(Invocation(b"still", "r-1", 5.0))).payload == b"still"
    finally:
        await ex.close()
    assert ex.notify_config(b"{}") == 0  # closed: nothing to tell


async def test_a_closed_in_process_function_is_not_told(
    built_conformance: dict[str, Path],
) -> None:
    directory = built_conformance["cpp"]
    manifest = load_manifest(directory / "edgefn.toml")
    ex = InProcessExecutor(manifest, directory, library=directory / f"{manifest.entry}.so")
    assert ex.notify_config(b"{}") == 0  # not started
    await ex.start()
    assert ex._lib.takes_config is True
    await ex.close()
    assert ex.notify_config(b"{}") == 0
    assert not ex._lib.loaded


# ---- the agent -------------------------------------------------------------------------------


def install_cpp(built: Path, data: Path, name: str, isolation: str) -> None:
    """A copy of the built C++ conformance function as `name`, run with `isolation`."""
    dest = data / "functions" / name
    shutil.copytree(built, dest)
    (dest / "edgefn.toml").write_text(
        f'name = "{name}"\nversion = "1.0.0"\nruntime = "cpp"\nentry = "conformance"\n'
        f'isolation = "{isolation}"\ntimeout_ms = 5000\n\n[pool]\nmin_instances = 1\n'
    )


async def test_the_agent_notifies_the_cpp_functions_whose_config_changed(
    tmp_path: Path, built_conformance: dict[str, Path]
) -> None:
    agent = Agent(Settings(data_dir=tmp_path / "d", port=0))
    data = agent.settings.data_dir
    install_cpp(built_conformance["cpp"], data, "cfg-proc", "process")
    install_cpp(built_conformance["cpp"], data, "cfg-inproc", "in-process")
    await agent.open(sandbox=Sandbox())
    try:
        await agent.functions.sync()
        ex = {n: f.executor for n, f in agent.functions.loaded.items()}
        assert set(ex) == {"cfg-proc", "cfg-inproc"}, agent.functions.problems
        proc, inproc = ex["cfg-proc"], ex["cfg-inproc"]
        assert isinstance(proc, Pool) and isinstance(inproc, InProcessExecutor)
        for e in (proc, inproc):
            assert await ask(e, "watch_config") == {"watching": True}

        def desired(a: dict[str, Any], b: dict[str, Any]) -> Any:
            return validate_config(
                {"functions": {"cfg-proc": {"config": a}, "cfg-inproc": {"config": b}}}
            )

        await agent._apply_config(desired({"zone": "north"}, {"zone": "north"}))
        for e in (proc, inproc):
            assert await seen_configs(e, 1) == [{"zone": "north"}]
        # Only the in-process function's config changes: the worker is not told again.
        await agent._apply_config(desired({"zone": "north"}, {"zone": "west", "limit": 3}))
        assert (await seen_configs(inproc, 2))[-1] == {"zone": "west", "limit": 3}
        assert (await ask(proc, "config_seen"))["seen"] == [{"zone": "north"}]
    finally:
        await agent.stop()


# ---- end to end: platform -> agent process -> running C++ functions ---------------------------


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    plat = start_platform(tmp_path / "plat")
    yield plat
    plat.stop()


@pytest.mark.slow
def test_device_config_set_reaches_running_cpp_functions(
    tmp_path: Path, platform: Platform, built_conformance: dict[str, Path]
) -> None:
    creds = enrol(platform, "edge-01", tmp_path)
    data = tmp_path / "agent"
    install_cpp(built_conformance["cpp"], data, "zone-proc", "process")
    install_cpp(built_conformance["cpp"], data, "zone-inproc", "in-process")
    agent: AgentProcess = start_agent(data, "--credentials", str(creds))
    try:
        wait_for(lambda: platform.devices()["edge-01"]["online"], "device online")

        def op(fn: str, name: str) -> Any:
            body = json.dumps({"op": name}).encode()
            resp = agent.invoke(fn, body, {"Content-Type": "application/json"})
            assert resp.status == 200, resp.body
            return resp.json()

        for fn in ("zone-proc", "zone-inproc"):
            assert op(fn, "watch_config") == {"watching": True}
        platform.cli("device", "config", "edge-01",
                     "--set", "functions.zone-proc.config.zone=north",
                     "--set", "functions.zone-inproc.config.zone=south")  # fmt: skip
        for fn, zone in (("zone-proc", "north"), ("zone-inproc", "south")):
            wait_for(
                lambda fn=fn, zone=zone: {"zone": zone} in op(fn, "config_seen")["seen"],
                f"{fn} to hear its new config",
            )
            assert op(fn, "config_latest") == {"latest": {"zone": zone}}
    finally:
        agent.stop()

"""One conformance suite, run through the warm pool against every out-of-process runtime.

Each runtime ships a conformance function (tests/functions/conformance/<runtime>/) that
implements the ops of docs/protocol.md; the same assertions hold for all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hardware.arch import lookup
from runtimes.build import build_function
from runtimes.capabilities import CapabilityCall, CapabilityNotFound, NotPermitted
from runtimes.cpp.inproc import InProcessExecutor
from runtimes.elfcheck import elf_identity
from runtimes.errors import FunctionError, InvocationTimeout, WorkerCrashed
from runtimes.invocation import Invocation
from runtimes.launchers import make_executor
from runtimes.manifest import Manifest, load_manifest
from runtimes.pool import Pool
from runtimes.worker import worker_env
from tests.harness import FUNCTIONS

pytestmark = pytest.mark.slow  # builds Go and C++ functions once per session


# The arm64 workers run under user-mode emulation, invoked directly: qemu-aarch64-static is the
# worker process (binfmt handlers are never registered on the machine). `-L` gives it the arm64
# C++ runtime (libstdc++, the loader) that Debian's cross toolchain installs; Go is static.
QEMU = "/usr/bin/qemu-aarch64-static"
ARM64_SYSROOT = "/usr/aarch64-linux-gnu"
ARM64_RUNTIMES = ("go", "cpp")


@pytest.fixture(scope="session")
def built_arm64(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """runtime -> the conformance function cross-built for aarch64 (Go, C++)."""
    if not os.path.exists(QEMU) or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("qemu-user-static and g++-aarch64-linux-gnu are needed (make system-deps)")
    root = tmp_path_factory.mktemp("conformance-arm64")
    out = {}
    for runtime in ARM64_RUNTIMES:
        dest = root / runtime
        shutil.copytree(FUNCTIONS / "conformance" / runtime, dest)
        build_function(dest, arch="aarch64")
        out[runtime] = dest
    return out


def arm64_pool(directory: Path) -> Pool:
    """The same pool the agent builds, with the worker command run through qemu."""
    manifest = load_manifest(directory / "edgefn.toml")
    entry = directory / manifest.entry
    assert elf_identity(entry) == (lookup("aarch64").elf_class, lookup("aarch64").elf_machine)
    argv = [QEMU, *(["-L", ARM64_SYSROOT] if manifest.runtime == "cpp" else []), str(entry)]
    env = worker_env(
        os.environ,
        {
            "EDGEFN_FUNCTION": manifest.name,
            "EDGEFN_VERSION": manifest.version,
            "EDGEFN_FUNCTION_DIR": str(directory),
            "EDGEFN_CONCURRENCY": str(manifest.pool.concurrency),
        },
    )
    return Pool(manifest, directory, lambda: argv, env=env)


@pytest.fixture(params=["node", "go", "cpp", "go-arm64", "cpp-arm64"])
async def pool(
    request: pytest.FixtureRequest, built_conformance: dict[str, Path]
) -> AsyncIterator[Pool]:
    runtime, _, arch = str(request.param).partition("-")
    if arch:
        executor = arm64_pool(request.getfixturevalue("built_arm64")[runtime])
    else:
        directory = built_conformance[runtime]
        made = make_executor(load_manifest(directory / "edgefn.toml"), directory)
        assert isinstance(made, Pool)
        executor = made
    await executor.start()
    yield executor
    await executor.close()


def op(timeout: float = 5.0, **kw: Any) -> Invocation:
    return Invocation(json.dumps(kw).encode(), "conf", timeout, content_type="application/json")


async def call(pool: Pool, **kw: Any) -> Any:
    return json.loads((await pool.invoke(op(**kw))).payload)


async def test_ready_names_the_runtime(pool: Pool) -> None:
    runtime = pool.status().workers[0].runtime
    assert runtime.split("/")[0] == pool.manifest.runtime


async def test_echo_is_byte_exact(pool: Pool) -> None:
    for payload in (b"", b"\x00\xff\x00", bytes(range(256)) * 4, b"\xfe" * (1 << 20)):
        result = await pool.invoke(Invocation(payload, "echo", 5.0))
        assert result.payload == payload


async def test_context_fields(pool: Pool) -> None:
    inv = Invocation(
        b'{"op":"context"}', "ctx", 4.0, trace_id="trace-9", content_type="application/json"
    )
    ctx = json.loads((await pool.invoke(inv)).payload)
    assert ctx["function"] == pool.manifest.name
    assert ctx["version"] == "1.0.0"
    assert ctx["trace_id"] == "trace-9"
    assert ctx["request_id"]
    assert 0 < ctx["deadline_ms_left"] <= 4000


async def test_requests_run_concurrently_and_answer_out_of_order(pool: Pool) -> None:
    order: list[int] = []

    async def sleep(ms: int) -> None:
        assert await call(pool, op="sleep", ms=ms) == {"slept": ms}
        order.append(ms)

    await asyncio.gather(sleep(600), sleep(20))
    assert order == [20, 600]


async def test_throw_and_panic_are_error_answers_not_crashes(pool: Pool) -> None:
    pid = pool.worker_pids()[0]
    with pytest.raises(FunctionError, match="no route") as info:
        await call(pool, op="throw", message="no route")
    assert info.value.code == "function_error"
    with pytest.raises(FunctionError, match="deep failure"):
        await call(pool, op="panic", message="deep failure")
    assert pool.worker_pids() == [pid]
    assert (await pool.invoke(Invocation(b"fine", "r", 5.0))).payload == b"fine"


async def test_log_frames_reach_the_agent_log(pool: Pool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=f"edgefn.fn.{pool.manifest.name}")
    inv = Invocation(
        b'{"op":"log","message":"route computed"}',
        "client-req-7",
        5.0,
        content_type="application/json",
    )
    assert json.loads((await pool.invoke(inv)).payload) == {"logged": True}
    records = [r for r in caplog.records if r.getMessage() == "route computed"]
    assert records, caplog.text
    # The caller's id (X-Request-Id), not the worker's wire id: that is what the README promises.
    assert [getattr(r, "request_id", None) for r in records] == ["client-req-7"]


async def test_ordinary_stdout_printing_does_not_break_framing(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=f"edgefn.fn.{pool.manifest.name}")
    pid = pool.worker_pids()[0]
    assert await call(pool, op="stdout", message="printed-line") == {"printed": True}
    assert (await pool.invoke(Invocation(b"after", "r", 5.0))).payload == b"after"
    assert pool.worker_pids() == [pid]
    for _ in range(20):  # the printed line arrives as a log frame or on stderr
        if "printed-line" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "printed-line" in caplog.text


async def test_crash_is_a_worker_error_and_the_worker_is_replaced(pool: Pool) -> None:
    pid = pool.worker_pids()[0]
    with pytest.raises(WorkerCrashed):
        await call(pool, op="crash")
    assert (await pool.invoke(Invocation(b"again", "r", 10.0))).payload == b"again"
    assert pool.worker_pids() != [pid]


async def test_hang_past_the_deadline_is_a_timeout(pool: Pool) -> None:
    with pytest.raises(InvocationTimeout):
        await pool.invoke(op(timeout=0.3, op="hang", ms=10_000))
    assert (await pool.invoke(Invocation(b"next", "r", 10.0))).payload == b"next"


async def test_ping_is_answered_by_a_pong(pool: Pool) -> None:
    worker = pool._workers[0]
    rtt = await worker.ping(timeout_s=5.0)
    assert rtt > 0  # a real round trip through the pipe, answered before the timeout
    assert worker.alive


async def test_ping_of_a_stopped_worker_fails(pool: Pool) -> None:
    worker = pool._workers[0]
    os.kill(worker.pid, signal.SIGSTOP)  # alive but unable to answer
    try:
        with pytest.raises(WorkerCrashed, match="did not answer a ping"):
            await worker.ping(timeout_s=0.3)
    finally:
        os.kill(worker.pid, signal.SIGCONT)


async def test_shutdown_drains_in_flight_requests(pool: Pool) -> None:
    busy = asyncio.ensure_future(call(pool, op="sleep", ms=300))
    await asyncio.sleep(0.05)
    await pool.close(drain_s=5)
    assert await busy == {"slept": 300}
    assert pool.worker_pids() == []


# ---- building blocks: CALL / CALL_RESULT / CALL_ERROR (docs/protocol.md) --------------------


class _Recorder:
    """A real CapabilityHandler (the agent's broker is tested end to end in
    tests/test_building_blocks.py): it answers from a table and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[CapabilityCall] = []

    async def call(self, manifest: Manifest, call: CapabilityCall) -> bytes:
        self.calls.append(call)
        if call.target == "forbidden":
            raise NotPermitted("not granted")
        if call.target == "slow":
            await asyncio.sleep(0.4)
        if call.target == "sleepy":
            await asyncio.sleep(30)
        if call.op == "state.get" and call.target == "missing":
            raise CapabilityNotFound("no such key")
        if call.op == "config":
            return b'{"zone":"north"}'
        if call.op in ("publish", "state.set", "state.delete"):
            return b""
        return f"{call.op}:{call.target}:".encode() + call.payload


BlocksHost = Pool | InProcessExecutor


@pytest.fixture(params=["node", "go", "cpp", "cpp-inproc"])
async def blocks_pool(
    request: pytest.FixtureRequest, built_conformance: dict[str, Path]
) -> AsyncIterator[tuple[BlocksHost, _Recorder]]:
    """Every host that runs functions: the isolated workers, and C++ in the agent's process
    (the same conformance source loaded as `<entry>.so`, its calls through the pybind11 host)."""
    runtime, _, mode = str(request.param).partition("-")
    directory = built_conformance[runtime]
    recorder = _Recorder()
    manifest = load_manifest(directory / "edgefn.toml")
    executor: BlocksHost
    if mode == "inproc":
        executor = InProcessExecutor(
            manifest, directory, library=directory / f"{manifest.entry}.so", capabilities=recorder
        )
    else:
        made = make_executor(manifest, directory, capabilities=recorder)
        assert isinstance(made, Pool)
        executor = made
    await executor.start()
    yield executor, recorder
    await executor.close()


async def test_building_block_calls_reach_the_handler_and_answer(
    blocks_pool: tuple[BlocksHost, _Recorder],
) -> None:
    pool, recorder = blocks_pool
    calls = [
        {"op": "invoke", "target": "slow", "payload": "p1"},  # answered last, sent first
        {"op": "invoke", "target": "eta", "payload": "p2"},
        {"op": "publish", "target": "traffic/jam", "payload": "e"},
        {"op": "state.set", "target": "k", "payload": "v"},
        {"op": "state.get", "target": "k"},
        {"op": "state.get", "target": "missing"},
        {"op": "state.delete", "target": "k"},
        {"op": "config", "target": ""},
        {"op": "invoke", "target": "forbidden", "payload": ""},
    ]
    inv = Invocation(
        json.dumps({"op": "blocks", "calls": calls}).encode(),
        "caller-req-1",
        3.0,
        trace_id="t-1",
        content_type="application/json",
    )
    answer = json.loads((await pool.invoke(inv)).payload)["results"]
    assert answer[0] == {"value": "invoke:slow:p1"}
    assert answer[1] == {"value": "invoke:eta:p2"}
    assert answer[2] == {"value": ""}
    assert answer[3] == {"value": ""}
    assert answer[4] == {"value": "state.get:k:"}
    assert answer[5] == {"missing": True}
    assert answer[6] == {"value": ""}
    assert json.loads(answer[7]["value"]) == {"zone": "north"}
    assert answer[8]["code"] == "not_permitted"
    assert "not granted" in answer[8]["message"]
    # Every call carried the caller's request id, its remaining deadline and the chain.
    assert len(recorder.calls) == len(calls)
    for seen in recorder.calls:
        assert seen.request_id == "caller-req-1"
        assert seen.trace_id == "t-1"
        assert 0 < seen.deadline_s <= 3.0
        assert seen.chain == (pool.manifest.name,)
    assert {(c.op, c.target, c.payload) for c in recorder.calls} >= {
        ("invoke", "slow", b"p1"),
        ("publish", "traffic/jam", b"e"),
        ("state.set", "k", b"v"),
    }
    # The worker is the same one and still serves plain requests.
    assert (await pool.invoke(Invocation(b"after", "r", 5.0))).payload == b"after"


async def test_building_block_call_past_the_deadline_is_a_timeout(
    blocks_pool: tuple[BlocksHost, _Recorder],
) -> None:
    pool, _ = blocks_pool
    calls = [{"op": "invoke", "target": "sleepy", "payload": ""}]
    inv = Invocation(
        json.dumps({"op": "blocks", "calls": calls}).encode(),
        "short",
        1.0,  # far less than the handler's 30 s: the call is cut before the parent's deadline
        content_type="application/json",
    )
    # The function hears `timeout` before its own deadline and still answers.
    result = json.loads((await pool.invoke(inv)).payload)["results"][0]
    assert result["code"] == "timeout"

"""The warm pool with real Node workers: pre-warming, scaling, queueing, timeouts, crashes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from runtimes import pool as pool_mod
from runtimes.errors import (
    FunctionError,
    InvocationTimeout,
    Overloaded,
    Unavailable,
    WorkerCrashed,
)
from runtimes.invocation import Invocation
from runtimes.launchers import make_executor
from runtimes.manifest import load_manifest
from runtimes.pool import Pool
from tests.harness import FUNCTIONS, write_manifest

CONFORMANCE = FUNCTIONS / "conformance" / "node"


def make_fn(tmp_path: Path, **overrides: Any) -> Path:
    """A copy of the Node conformance function with manifest fields overridden."""
    d = tmp_path / "fn"
    shutil.copytree(CONFORMANCE, d)
    fields: dict[str, Any] = {
        "name": "conformance-node",
        "version": "1.0.0",
        "runtime": "node",
        "entry": "handler.js",
        "timeout_ms": 5000,
    }
    fields.update(overrides)
    write_manifest(d, **fields)
    return d


def pool_for(directory: Path) -> Pool:
    executor = make_executor(load_manifest(directory / "edgefn.toml"), directory)
    assert isinstance(executor, Pool)
    return executor


def op(**kw: Any) -> Invocation:
    return Invocation(
        json.dumps(kw).encode(), "r", kw.pop("timeout", 5.0), content_type="application/json"
    )


async def test_prewarms_min_instances_and_echoes_bytes(tmp_path: Path) -> None:
    p = pool_for(make_fn(tmp_path, pool={"min_instances": 2, "max_instances": 2}))
    await p.start()
    try:
        assert p.status().instances == 2
        assert all(w.runtime.startswith("node/") for w in p.status().workers)
        payload = bytes(range(256)) * 4
        result = await p.invoke(Invocation(payload, "r1", 5.0))
        assert result.payload == payload
    finally:
        await p.close()
    assert p.status().instances == 0


async def test_one_worker_serves_many_requests_concurrently(tmp_path: Path) -> None:
    p = pool_for(make_fn(tmp_path, pool={"min_instances": 1, "max_instances": 1, "concurrency": 8}))
    await p.start()
    try:
        results = await asyncio.gather(*(p.invoke(op(op="sleep", ms=300)) for _ in range(8)))
        assert [json.loads(r.payload) for r in results] == [{"slept": 300}] * 8
        # All eight were in flight at once on the single worker: it served them all.
        assert p.status().workers[0].served == 8
    finally:
        await p.close()


async def test_scales_up_under_load_and_down_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_mod, "REAP_INTERVAL_S", 0.05)
    p = pool_for(
        make_fn(
            tmp_path,
            pool={"min_instances": 1, "max_instances": 3, "concurrency": 1, "idle_timeout_s": 0.3},
        )
    )
    await p.start()
    try:
        await asyncio.gather(*(p.invoke(op(op="sleep", ms=400)) for _ in range(6)))
        for _ in range(100):  # bounded: a worker started under load may still be starting
            if p.status().peak_instances == 3 and not p.status().starting:
                break
            await asyncio.sleep(0.05)
        assert p.status().peak_instances == 3  # scaled to max_instances, never past it
        for _ in range(100):  # bounded: 100 x 50 ms
            if p.status().instances == 1:
                break
            await asyncio.sleep(0.05)
        assert p.status().instances == 1
    finally:
        await p.close()


async def test_full_queue_answers_overloaded(tmp_path: Path) -> None:
    p = pool_for(
        make_fn(
            tmp_path,
            pool={"min_instances": 1, "max_instances": 1, "concurrency": 1, "max_queue": 1},
        )
    )
    await p.start()
    try:
        first = asyncio.ensure_future(p.invoke(op(op="sleep", ms=300)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(p.invoke(op(op="sleep", ms=10)))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="max_queue 1"):
            await p.invoke(op(op="sleep", ms=10))
        assert json.loads((await first).payload) == {"slept": 300}
        assert json.loads((await second).payload) == {"slept": 10}
    finally:
        await p.close()


async def test_timeout_kills_the_worker_and_the_pool_recovers(tmp_path: Path) -> None:
    p = pool_for(make_fn(tmp_path, pool={"min_instances": 1, "max_instances": 1}))
    await p.start()
    try:
        pid = p.status().workers[0].pid
        with pytest.raises(InvocationTimeout):
            await p.invoke(
                Invocation(
                    b'{"op":"hang","ms":20000}', "slow", 0.3, content_type="application/json"
                )
            )
        assert p.status().timeouts == 1
        result = await p.invoke(Invocation(b"after", "next", 10.0))
        assert result.payload == b"after"
        assert p.status().workers[0].pid != pid
    finally:
        await p.close()


async def test_crash_fails_in_flight_requests_and_worker_is_replaced(tmp_path: Path) -> None:
    p = pool_for(make_fn(tmp_path, pool={"min_instances": 1, "max_instances": 1, "concurrency": 4}))
    await p.start()
    try:
        sleeping = asyncio.ensure_future(p.invoke(op(op="sleep", ms=2000)))
        await asyncio.sleep(0.1)
        with pytest.raises(WorkerCrashed, match="exited with status 3"):
            await p.invoke(op(op="crash"))
        with pytest.raises(WorkerCrashed):
            await sleeping
        result = await p.invoke(Invocation(b"alive", "n", 10.0))
        assert result.payload == b"alive"
        assert p.status().health == "healthy"
    finally:
        await p.close()


async def test_function_error_is_not_a_crash(tmp_path: Path) -> None:
    p = pool_for(make_fn(tmp_path))
    await p.start()
    try:
        pid = p.status().workers[0].pid
        with pytest.raises(FunctionError, match="nope") as info:
            await p.invoke(op(op="throw", message="nope"))
        assert info.value.code == "function_error"
        assert p.status().workers[0].pid == pid
    finally:
        await p.close()


async def test_function_that_fails_to_load_is_refused_with_its_reason(tmp_path: Path) -> None:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "index.js").write_text("throw new Error('cannot load: missing config');\n")
    write_manifest(d, name="broken", version="1.0.0", runtime="node", entry="index.js")
    p = pool_for(d)
    with pytest.raises(WorkerCrashed, match="cannot load: missing config"):
        await p.start()
    await p.close()


async def test_garbage_on_stdout_kills_the_worker(tmp_path: Path) -> None:
    d = tmp_path / "garbage"
    d.mkdir()
    # Writes straight to fd 1, past the host's redirection: a protocol violation.
    (d / "index.js").write_text(
        "const fs = require('fs');\n"
        "exports.handler = async () => { fs.writeSync(1, 'GARBAGE'.repeat(8)); "
        "await new Promise(r => setTimeout(r, 1000)); return 'late'; };\n"
    )
    write_manifest(d, name="garbage", version="1.0.0", runtime="node", entry="index.js")
    p = pool_for(d)
    await p.start()
    try:
        with pytest.raises(WorkerCrashed, match="protocol violation"):
            await p.invoke(Invocation(b"x", "g", 5.0))
    finally:
        await p.close()


async def test_crash_loop_marks_unhealthy_and_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_mod, "BACKOFF_INITIAL_S", 0.01)
    monkeypatch.setattr(pool_mod, "BACKOFF_MAX_S", 0.05)
    d = tmp_path / "flaky"
    d.mkdir()
    marker = tmp_path / "started"
    # Loads fine the first time, then dies at start: a crash loop after the first crash.
    (d / "index.js").write_text(
        "const fs = require('fs');\n"
        f"const m = {json.dumps(str(marker))};\n"
        "if (fs.existsSync(m)) { console.error('config gone'); process.exit(7); }\n"
        "fs.writeFileSync(m, 'x');\n"
        "exports.handler = async () => { process.exit(3); };\n"
    )
    write_manifest(d, name="flaky", version="1.0.0", runtime="node", entry="index.js")
    p = pool_for(d)
    await p.start()
    try:
        with pytest.raises(WorkerCrashed):
            await p.invoke(Invocation(b"x", "1", 5.0))
        for _ in range(100):  # bounded: up to 5 s
            if p.status().health == "unhealthy":
                break
            await asyncio.sleep(0.05)
        status = p.status()
        assert status.health == "unhealthy"
        assert "status 7" in status.last_error
        with pytest.raises(Unavailable, match="crash loop"):
            await p.invoke(Invocation(b"x", "2", 5.0))
    finally:
        await p.close()


async def test_close_drains_in_flight_work(tmp_path: Path) -> None:
    p = pool_for(make_fn(tmp_path))
    await p.start()
    pid = p.status().workers[0].pid
    busy = asyncio.ensure_future(p.invoke(op(op="sleep", ms=300)))
    await asyncio.sleep(0.05)
    await p.close(drain_s=5)
    assert json.loads((await busy).payload) == {"slept": 300}
    with pytest.raises(Unavailable):
        await p.invoke(Invocation(b"x", "late", 1.0))
    await asyncio.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_killed_worker_is_replaced(tmp_path: Path) -> None:
    p = pool_for(make_fn(tmp_path, pool={"min_instances": 1, "max_instances": 1}))
    await p.start()
    try:
        pid = p.status().workers[0].pid
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # bounded: up to 5 s
            st = p.status()
            if st.ready == 1 and st.workers[0].pid != pid:
                break
            await asyncio.sleep(0.05)
        assert p.status().workers[0].pid != pid
        assert "SIGKILL" in p.status().last_error
        assert (await p.invoke(Invocation(b"ok", "r", 5.0))).payload == b"ok"
    finally:
        await p.close()

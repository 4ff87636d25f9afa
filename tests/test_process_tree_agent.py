"""Through the real agent: a function that leaves children (one detached in its own session)
leaves nothing behind when its worker is killed for a timeout, a crash or memory, when the agent
shuts down, or when the agent is SIGKILLed and not restarted.

The hostile C++ function's "detach TOKEN [then]" mode starts the children; they carry TOKEN in
their command line, which is how the test finds them (their pids inside a PID namespace mean
nothing outside it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware.isolation import instance_prefix, open_cgroups
from hardware.leftovers import WorkerRecords
from hardware.limits import WorkerLimits, wrap_command
from runtimes.build import build_function
from runtimes.invocation import Invocation
from runtimes.launchers import make_executor
from runtimes.manifest import load_manifest
from runtimes.pool import Pool
from runtimes.sandbox import Sandbox
from tests.harness import FUNCTIONS, AgentProcess, Response, start_agent, write_manifest
from tests.test_process_tree import (
    kill_tree,
    needs_pidns,
    tokened,
    wait_gone,
    wait_present,
    worker_script,
)
from tests.worker_user import ensure_worker_user

pytestmark = [pytest.mark.slow, needs_pidns]

# The hang case must overrun this; the others answer or die well within it.
TIMEOUT_MS = 1500
LIMITS = {"memory_mb": 64, "processes": 32}


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    """The hostile function built once, in a directory the worker user can read."""
    ensure_worker_user()
    root = Path(tempfile.mkdtemp(prefix="edgefn-tree-"))
    root.chmod(0o755)
    try:
        src = root / "build"
        shutil.copytree(FUNCTIONS / "hostile-cpp", src)
        build_function(src)
        write_manifest(
            src,
            name="tree",
            version="1.0.0",
            runtime="cpp",
            entry="hostile",
            timeout_ms=TIMEOUT_MS,
            limits=LIMITS,
        )
        yield src
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_data_dir(built: Path) -> Path:
    """A data dir of its own per agent (two agents never share one)."""
    data = built.parent / f"data-{uuid.uuid4().hex[:8]}"
    shutil.copytree(built, data / "functions" / "tree")
    for p in [data, *data.rglob("*")]:
        p.chmod(0o755 if p.is_dir() or p.name == "hostile" else 0o644)
    return data


@pytest.fixture(scope="module")
def agent(built: Path) -> Iterator[AgentProcess]:
    proc = start_agent(fresh_data_dir(built), "--worker-user", "edgefn-worker")
    yield proc
    proc.stop()


@pytest.fixture
def token() -> Iterator[str]:
    value = f"edgefn-tree-{uuid.uuid4().hex}"
    yield value
    kill_tree(value)  # never leave a test's processes behind (escaped or failed)


def _invoke_in_background(
    agent: AgentProcess, body: bytes
) -> tuple[threading.Thread, list[Response]]:
    answers: list[Response] = []
    thread = threading.Thread(target=lambda: answers.append(agent.invoke("tree", body)))
    thread.start()
    return thread, answers


@pytest.mark.parametrize(
    ("then", "status", "says"),
    [("hang", 504, "timeout"), ("crash", 502, "worker_crashed"), ("alloc", 502, "worker_crashed")],
)
def test_killed_worker_leaves_no_process(
    agent: AgentProcess, token: str, then: str, status: int, says: str
) -> None:
    thread, answers = _invoke_in_background(agent, f"detach {token} {then}".encode())
    wait_present(token, 2)
    thread.join(30)  # bounded: the deadline is 1.5 s, the hog dies within a second
    assert answers, "no answer"
    assert answers[0].status == status, answers[0].body
    assert answers[0].json()["error"]["code"] == says
    assert wait_gone(token) == []


def test_agent_shutdown_leaves_no_process(built: Path, token: str) -> None:
    agent = start_agent(fresh_data_dir(built), "--worker-user", "edgefn-worker")
    try:
        resp = agent.invoke("tree", f"detach {token}".encode())
        assert resp.status == 200, resp.body
        wait_present(token, 2)
    finally:
        agent.stop()
    assert wait_gone(token) == []


def test_agent_killed_and_not_restarted_leaves_no_process(built: Path, token: str) -> None:
    agent = start_agent(fresh_data_dir(built), "--worker-user", "edgefn-worker")
    try:
        resp = agent.invoke("tree", f"detach {token}".encode())
        assert resp.status == 200, resp.body
        wait_present(token, 2)
    finally:
        agent.stop(signal.SIGKILL)
    assert wait_gone(token) == []


def test_agent_start_ends_what_a_previous_run_left(built: Path, token: str) -> None:
    """Leftovers it can prove are its own: a recorded worker (pid + start time) with its
    process group, and a worker still in one of its instance's cgroups."""
    data = fresh_data_dir(built)
    recorded = subprocess.Popen(
        wrap_command(worker_script(token), WorkerLimits(), new_session=True, pdeathsig=False),
        stdout=subprocess.DEVNULL,
    )
    WorkerRecords(data / "run" / "workers").add(recorded.pid)
    procs = [recorded]
    cgroups, _ = open_cgroups(instance_prefix(data))
    in_group: subprocess.Popen[bytes] | None = None
    if cgroups is not None:
        group = cgroups.create("tree", "w99", WorkerLimits())
        assert group is not None
        in_group = subprocess.Popen([*group.join_argv(), "/bin/sh", "-c", f"sleep 60; : {token}"])
        procs.append(in_group)
    try:
        wait_present(token, 2)
        group_members = [p for p in tokened(token) if os.getpgid(p) == recorded.pid]
        agent = start_agent(data, "--worker-user", "edgefn-worker")
        try:
            agent.wait_log(r"ended \d+ worker processes")
            assert recorded.wait(timeout=10) < 0
            if in_group is not None:
                assert in_group.wait(timeout=10) < 0
            deadline = time.monotonic() + 10
            while set(group_members) & set(tokened(token)) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not set(group_members) & set(tokened(token))
        finally:
            agent.stop()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if cgroups is not None:
            cgroups.close()


async def test_without_namespace_the_sandbox_kills_the_process_group(
    built: Path, token: str, tmp_path: Path
) -> None:
    """The fallback path, through a real pool and sandbox: the worker leads its own process
    group, is recorded while it runs, and its group dies with it when it is killed."""
    records = WorkerRecords(tmp_path / "workers")
    sandbox = Sandbox(process_group=True, records=records)
    manifest = load_manifest(built / "edgefn.toml")
    pool = make_executor(manifest, built, sandbox=sandbox)
    assert isinstance(pool, Pool)
    await pool.start()
    try:
        result = await pool.invoke(Invocation(f"detach {token}".encode(), "r1", 5.0))
        assert result.payload == f"detached {token}".encode()
        for _ in range(250):  # bounded: 5 s for the children to exec
            if len(tokened(token)) >= 2:
                break
            await asyncio.sleep(0.02)
        pid = int(pool.status().workers[0].pid)
        assert os.getpgid(pid) == pid  # the worker leads its own group
        assert [p.name for p in records.directory.iterdir()] == [str(pid)]
        plain = [p for p in tokened(token) if os.getpgid(p) == pid]
        assert plain
        os.kill(pid, signal.SIGKILL)  # a crash
        for _ in range(500):  # bounded: 10 s
            if not set(plain) & set(tokened(token)):
                break
            await asyncio.sleep(0.02)
        assert not set(plain) & set(tokened(token))
        assert str(pid) not in [p.name for p in records.directory.iterdir()]
    finally:
        await pool.close()
        await sandbox.close()

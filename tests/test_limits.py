"""Limits with real hostile functions through the real agent: each is killed and reported, and
the agent and its other functions carry on.

The workers run as `nobody` (the agent runs as root here), so the function directories live in
a world-readable temporary directory, and RLIMIT_NPROC applies (root would bypass it).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimes.build import build_function
from tests.harness import FUNCTIONS, AgentProcess, start_agent, write_manifest

pytestmark = pytest.mark.slow

LIMITS = {"memory_mb": 64, "processes": 16, "cpu_seconds": 1}


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    root = Path(tempfile.mkdtemp(prefix="edgefn-limits-"))
    root.chmod(0o755)
    try:
        src = root / "build"
        shutil.copytree(FUNCTIONS / "hostile-cpp", src)
        build_function(src)
        data = root / "data"
        for name, limits in (("hostile", LIMITS), ("bystander", {})):
            d = data / "functions" / name
            shutil.copytree(src, d)
            fields = dict(name=name, version="1.0.0", runtime="cpp", entry="hostile")
            # Threads count against the process limit too (Linux RLIMIT_NPROC and pids.max
            # both do): keep the worker's thread pool small.
            extra = {"limits": limits} if limits else {}
            write_manifest(d, **fields, timeout_ms=30000, pool={"concurrency": 2}, **extra)
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() or p.name == "hostile" else 0o644)
        proc = start_agent(data, "--worker-user", "nobody")
        yield proc
        proc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bystander_ok(agent: AgentProcess) -> None:
    resp = agent.invoke("bystander", b"still fine")
    assert (resp.status, resp.body) == (200, b"still fine")


def wait_healthy(agent: AgentProcess) -> None:
    for _ in range(100):  # bounded: up to 10 s for the replacement worker
        if agent.invoke("hostile", b"ping").status == 200:
            return
        time.sleep(0.1)
    raise AssertionError("hostile function did not recover")


def status(agent: AgentProcess) -> dict[str, object]:
    fns = {f["name"]: f for f in agent.get("/v1/functions").json()["functions"]}
    return fns["hostile"]["status"]


def test_memory_hog_is_killed_and_reported(agent: AgentProcess) -> None:
    resp = agent.invoke("hostile", b"alloc")
    assert resp.status == 502, resp.body
    assert "exceeded its memory limit" in resp.json()["error"]["message"]
    assert "exceeded its memory limit" in str(status(agent)["last_error"]), status(agent)
    bystander_ok(agent)
    wait_healthy(agent)


def test_fork_bomb_stops_at_the_process_limit(agent: AgentProcess) -> None:
    resp = agent.invoke("hostile", b"fork")
    assert resp.status == 200, resp.body
    forked = int(resp.body.split()[1])
    assert forked < 300
    assert forked <= LIMITS["processes"]
    bystander_ok(agent)


def test_cpu_spinner_is_killed_at_its_cpu_time(agent: AgentProcess) -> None:
    started = time.monotonic()
    resp = agent.invoke("hostile", b"spin")
    assert resp.status == 502, resp.body
    assert (
        "SIGXCPU" in resp.json()["error"]["message"] or "SIGKILL" in resp.json()["error"]["message"]
    )
    assert time.monotonic() - started < 15  # killed, not left to finish its 20 s
    bystander_ok(agent)
    wait_healthy(agent)


def test_workers_run_as_the_unprivileged_user(agent: AgentProcess) -> None:
    import pwd

    pids = [w["pid"] for w in status(agent)["workers"]]  # type: ignore[index]
    assert pids
    uid = Path(f"/proc/{pids[0]}").stat().st_uid
    assert uid == pwd.getpwnam("nobody").pw_uid

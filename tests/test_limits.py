"""Limits with real hostile functions through the real agent: each is killed and reported, and
the agent and its other functions carry on.

The workers run as the dedicated `edgefn-worker` user (created here if missing, see
tests/worker_user.py), so the function directories live in a world-readable temporary
directory. On this machine's hybrid cgroup layout the agent uses cgroup v1 groups and a PID
namespace per worker; the agent's one summary line says so.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimes.build import build_function
from tests.harness import FUNCTIONS, AgentProcess, children_of, start_agent, write_manifest
from tests.worker_user import ensure_worker_user

pytestmark = pytest.mark.slow

LIMITS = {"memory_mb": 64, "processes": 16, "cpu_seconds": 1}


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    if ensure_worker_user() is None:
        pytest.skip("not root: the agent cannot switch workers to the dedicated user")
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
        proc = start_agent(data, "--worker-user", "edgefn-worker")
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
    message = resp.json()["error"]["message"]
    if "memory" in cgroup_kind(agent):  # the kernel killed it near its limit, not at 8x
        agent.wait_log(r"exceeded its memory limit \(stopped by the kernel")
        # The request and the status say why, not only the signal the worker saw.
        assert "SIGKILL" in message and "stopped by the kernel" in message, message
    # else: the RSS watchdog killed it, and says so
    assert "exceeded its memory limit" in message, message
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


def worker_process(agent: AgentProcess) -> int:
    """The function's process: the pid the pool spawned, or, when that is the PID-namespace
    shim (`unshare --fork`), the worker under it and the namespace's init shell."""
    pid = int(status(agent)["workers"][0]["pid"])  # type: ignore[index]
    for _ in range(3):  # bounded: shim -> init shell -> worker
        if Path(f"/proc/{pid}/exe").resolve().name not in ("unshare", "dash", "sh", "bash"):
            break
        pid = next(children_of(pid))
    return pid


def cgroup_kind(agent: AgentProcess) -> str:
    return str(agent.get("/v1/health").json().get("sandbox", {}).get("cgroups", ""))


def test_workers_run_as_the_unprivileged_user(agent: AgentProcess) -> None:
    import pwd

    uid = Path(f"/proc/{worker_process(agent)}").stat().st_uid
    assert uid == pwd.getpwnam("edgefn-worker").pw_uid


def test_the_agent_says_once_how_each_limit_is_enforced(agent: AgentProcess) -> None:
    line = agent.wait_log(r"worker limits: ")
    assert sum("worker limits: " in line for line in agent.lines) == 1
    assert "process tree: " in line and "NOT enforced: " in line
    if "cgroup v1" in cgroup_kind(agent):
        assert "WARNING" in line
        assert "memory_mb by cgroup v1 memory.limit_in_bytes" in line
        assert "processes by cgroup v1 pids.max" in line
    # A dedicated worker user exists, so the process limit is enforced one way or another.
    assert "processes (" not in line.split("NOT enforced: ")[1]

"""A worker's whole process tree dies with it, detached children included.

Real processes, real signals: a "worker" leaves a plain child and a detached one (own session,
double fork), each carrying a unique token in its command line, then the worker, or the agent
stand-in that spawned it, is killed. A PID namespace per worker (used where this machine allows
it: as root) ends every one of them, even when the parent is gone; without one, the process
group is killed with the worker and the leftover records let the next start end the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware.cgroup import WorkerCgroup
from hardware.cgroup_v1 import WorkerCgroupV1
from hardware.cgroupfs import WorkerGroup
from hardware.isolation import probe_pid_namespace
from hardware.leftovers import WorkerRecords, start_time
from hardware.limits import WorkerLimits, resolve_worker_user, wrap_command
from tests.harness import children_of

# Processes die within milliseconds of the kill; the bound is for a loaded machine.
GONE_BOUND_S = 5.0
# How long the "worker" waits for its children to exist before reporting ready.
_SPAWN_BOUND_S = 5.0

PIDNS = probe_pid_namespace()
needs_pidns = pytest.mark.skipif(PIDNS is not None, reason=f"no PID namespace here: {PIDNS}")


def worker_script(token: str) -> list[str]:
    """sh that leaves a plain and a detached child with `token`, says "ready", sleeps."""
    linger = f"sleep 60; : {token}"
    script = (
        f"sh -c '{linger}' & "
        f"setsid sh -c \"sh -c '{linger}' & \" & "  # detached: new session, parent exits
        "echo ready; sleep 60"
    )
    return ["/bin/sh", "-c", script]


def tokened(token: str) -> list[int]:
    """Live (non-zombie) processes whose command line carries the token."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def kill_tree(token: str) -> None:
    """SIGKILL the token's processes and their children (the `sleep` each shell runs)."""
    shells = set(tokened(token))
    for pid in [*shells, *(c for s in shells for c in children_of(s))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(token: str, bound: float = GONE_BOUND_S) -> list[int]:
    deadline = time.monotonic() + bound
    while (left := tokened(token)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def wait_present(token: str, count: int) -> None:
    deadline = time.monotonic() + _SPAWN_BOUND_S
    while len(tokened(token)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"the worker's children did not appear: {tokened(token)}")
        time.sleep(0.02)


@pytest.fixture
def token() -> Iterator[str]:
    value = f"edgefn-tree-{uuid.uuid4().hex}"
    yield value
    kill_tree(value)  # never leave a test's processes behind (escaped or failed)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@needs_pidns
@pytest.mark.parametrize("as_worker_user", [False, True])
def test_killed_worker_takes_detached_children_along(token: str, as_worker_user: bool) -> None:
    """Timeout, crash, memory: the pool SIGKILLs the pid it spawned (or the kernel does)."""
    run_as = resolve_worker_user() if as_worker_user else None
    if as_worker_user and run_as is None:
        pytest.skip("only root switches users")
    argv = wrap_command(worker_script(token), WorkerLimits(), run_as=run_as, pid_namespace=True)
    with _start(argv) as worker:
        wait_present(token, 2)
        worker.kill()
        worker.wait(timeout=GONE_BOUND_S)
    assert wait_gone(token) == []


@needs_pidns
def test_worker_exiting_on_its_own_takes_its_children_along(token: str) -> None:
    """A worker that exits after SHUTDOWN (or crashes by itself) leaves nothing behind."""
    script = worker_script(token)
    script[-1] = (
        script[-1]
        .replace("sleep 60", "sleep 0.3", 1)
        .replace("echo ready; sleep 60", "echo ready; sleep 0.3; exit 0")
    )
    with _start(wrap_command(script, WorkerLimits(), pid_namespace=True)) as worker:
        assert worker.wait(timeout=GONE_BOUND_S + 5) == 0
    assert wait_gone(token) == []


# An agent stand-in: spawns the wrapped worker (its parent check gets the stand-in's own pid in
# place of the -1 placeholder), prints the worker's first line, waits to be SIGKILLed.
_PARENT = """
import json, os, subprocess, sys, time
argv = [str(os.getpid()) if a == "-1" else a for a in json.loads(sys.argv[1])]
child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


@needs_pidns
def test_agent_killed_and_not_restarted_leaves_nothing(token: str) -> None:
    argv = wrap_command(worker_script(token), WorkerLimits(), pid_namespace=True, parent_pid=-1)
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, json.dumps(argv)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        wait_present(token, 2)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert wait_gone(token) == []


def test_without_namespace_the_process_group_dies_with_the_worker(token: str) -> None:
    """The fallback: the worker leads its own group; killing the group ends the plain child.
    A child that starts its own session escapes the group (the documented limit)."""
    argv = wrap_command(worker_script(token), WorkerLimits(), new_session=True, pdeathsig=False)
    with _start(argv) as worker:
        wait_present(token, 2)
        assert os.getpgid(worker.pid) == worker.pid
        plain = [p for p in tokened(token) if os.getpgid(p) == worker.pid]
        assert plain
        worker.kill()
        worker.wait()
        os.killpg(worker.pid, signal.SIGKILL)  # what Sandbox.finished does
    deadline = time.monotonic() + GONE_BOUND_S
    while any(Path(f"/proc/{p}").exists() for p in plain) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in plain if p in tokened(token)]


def test_next_start_ends_what_a_killed_agent_left(token: str, tmp_path: Path) -> None:
    """Leftover sweep: recorded pid + start time prove the process group is ours."""
    records = WorkerRecords(tmp_path / "run" / "workers")
    argv = wrap_command(worker_script(token), WorkerLimits(), new_session=True, pdeathsig=False)
    worker = _start(argv)
    assert worker.stdout is not None
    worker.stdout.close()
    wait_present(token, 2)
    records.add(worker.pid)
    group = [p for p in tokened(token) if os.getpgid(p) == worker.pid]
    # A record for a live process that is not ours (its start time differs) must be spared.
    stranger = subprocess.Popen(["/bin/sleep", "30"])
    try:
        started = start_time(stranger.pid)
        assert started is not None
        (records.directory / str(stranger.pid)).write_text(f"{records._boot} {started + 1}\n")
        # The agent dies: nobody kills the group; the worker leader stays alive too.
        killed = WorkerRecords(records.directory).sweep()
        assert killed >= 1 + len(group)
        assert worker.wait(timeout=GONE_BOUND_S) < 0
        deadline = time.monotonic() + GONE_BOUND_S
        while set(group) & set(tokened(token)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not set(group) & set(tokened(token))
        assert stranger.poll() is None
        assert list(records.directory.iterdir()) == []
    finally:
        stranger.kill()
        stranger.wait()


def test_the_namespace_processes_do_not_eat_the_functions_process_limit() -> None:
    """The shim and the init shell share the worker's pids group: pids.max leaves room."""
    from hardware.isolation import open_cgroups
    from runtimes.manifest import parse_manifest
    from runtimes.sandbox import Sandbox

    manager, status = open_cgroups(f"edgefn-test-{uuid.uuid4().hex[:8]}")
    if manager is None or "pids" not in status.controllers:
        pytest.skip(f"no pids cgroup here: {status.reason}")
    manifest = parse_manifest(
        {
            "name": "fn",
            "version": "1.0.0",
            "runtime": "cpp",
            "entry": "w",
            "limits": {"processes": 5},
        }
    )
    try:
        for pidns, expected in ((True, "7"), (False, "5")):
            prepared = Sandbox(cgroups=manager, pid_namespace=pidns).prepare(
                manifest, ["/bin/true"]
            )
            assert prepared.cgroup is not None
            files = [
                p / "pids.max" for p in _group_dirs(prepared.cgroup) if (p / "pids.max").exists()
            ]
            assert [f.read_text().strip() for f in files] == [expected]
            prepared.cgroup.remove()
    finally:
        manager.close()


def _group_dirs(group: WorkerGroup) -> list[Path]:
    """The directories of a v1 (one per hierarchy) or v2 worker group."""
    if isinstance(group, WorkerCgroupV1):
        return [d for d, _ in group.dirs]
    assert isinstance(group, WorkerCgroup)
    return [group.path]

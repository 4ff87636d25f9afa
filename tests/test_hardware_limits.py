"""Worker limits against real hostile programs (C, compiled here) and real process trees.

Each hostile program is run through `wrap_command`, inside a per-worker cgroup when this machine
gives us a writable cgroup v2 with controllers, else with the rlimit fallbacks; the test checks
the program was stopped by the limit (it prints how far it got).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from hardware.cgroupfs import CgroupReport, GroupManager
from hardware.errors import HardwareError, LimitToolMissing, WorkerUserError
from hardware.isolation import open_cgroups
from hardware.limits import (
    WorkerLimits,
    enforcement,
    find_tool,
    mechanisms,
    preflight,
    resolve_worker_user,
    wrap_command,
)
from tests.worker_user import ensure_worker_user

HOSTILE = Path(__file__).parent / "functions" / "hostile"
# Bounds for things that happen in milliseconds; generous because the machine is shared.
RUN_TIMEOUT_S = 30.0
CPU_KILL_BOUND_S = 10.0
PDEATH_BOUND_S = 5.0
# Processes of the worker user that may exist besides the hostile program (fork counts vary).
FORK_SLACK = 2


@pytest.fixture(scope="module")
def hostile_bin() -> Iterator[Path]:
    """The hostile programs, compiled into a directory an unprivileged worker user can reach."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build the hostile programs")
    out = Path(tempfile.mkdtemp(prefix="edgefn-hostile-"))
    try:
        out.chmod(0o755)  # workers may run as "nobody": pytest's tmp_path is 0700 root
        for source in sorted(HOSTILE.glob("*.c")):
            subprocess.run([cc, "-O0", "-o", str(out / source.stem), str(source)], check=True)
        yield out
    finally:
        shutil.rmtree(out)


@pytest.fixture(scope="module")
def cgroups() -> Iterator[GroupManager | None]:
    """The host's manager (v2, else v1) under a unique prefix when cgroups work, else None."""
    manager, status = open_cgroups(f"edgefn-test-{uuid.uuid4().hex[:8]}")
    print(status.describe())
    if manager is None:
        yield None
        return
    try:
        yield manager
    finally:
        manager.close()


def _run(
    binary: Path,
    limits: WorkerLimits,
    cgroups: GroupManager | None,
    *,
    run_as: tuple[int, int] | None = None,
    timeout: float = RUN_TIMEOUT_S,
) -> tuple[int, str, CgroupReport | None]:
    """Run one wrapped program to completion; everything it started is killed afterwards."""
    cgroup = cgroups.create("hostile", uuid.uuid4().hex[:12], limits) if cgroups else None
    argv = wrap_command([str(binary)], limits, run_as=run_as, cgroup=cgroup)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{binary.name} still ran after {timeout} s; output so far:\n{out}{err}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children the program left behind
        report = cgroup.report() if cgroup else None
        if cgroup:
            cgroup.remove()
    print(f"{binary.name}: rc={proc.returncode}\n{out}{err}")
    return proc.returncode, out, report


def _reached_mib(out: str) -> int:
    reached = [int(line.split()[1]) for line in out.splitlines() if line.startswith("reached ")]
    return max(reached, default=0)


@pytest.mark.slow
def test_memory_hog_is_stopped_far_below_1gib(
    hostile_bin: Path, cgroups: GroupManager | None
) -> None:
    limits = WorkerLimits(memory_mb=64)
    by_cgroup = cgroups is not None and "memory" in cgroups.status.controllers
    if not by_cgroup:
        limits = limits.with_address_space()  # the documented native-worker fallback
    rc, out, report = _run(hostile_bin / "eat_memory", limits, cgroups)
    assert rc != 0
    assert "done" not in out
    assert _reached_mib(out) < 1024
    assert _reached_mib(out) <= 64
    if by_cgroup:
        assert report is not None and report.oom_kills >= 1
        assert report.reason and "memory" in report.reason
        assert rc == -signal.SIGKILL
    else:
        assert rc == 3 and "malloc failed" in out


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["cgroup", "rlimit"])
def test_fork_bomb_is_capped_by_the_process_limit(
    hostile_bin: Path, cgroups: GroupManager | None, mechanism: str
) -> None:
    """pids.max where a pids cgroup exists; RLIMIT_NPROC of the dedicated worker user (created
    here if missing: root ignores RLIMIT_NPROC) otherwise. Both are exercised where possible."""
    if mechanism == "cgroup":
        if cgroups is None or "pids" not in cgroups.status.controllers:
            pytest.skip("no cgroup pids controller here")
        run_as, group_manager = None, cgroups
    else:
        run_as, group_manager = ensure_worker_user(), None
        if run_as is None:
            pytest.skip("not root: workers cannot be switched to a dedicated user")
    rc, out, report = _run(
        hostile_bin / "fork_many", WorkerLimits(processes=16), group_manager, run_as=run_as
    )
    forked = [int(line.split()[1]) for line in out.splitlines() if line.startswith("forked ")]
    assert forked, out
    assert forked[0] <= 16 + FORK_SLACK
    assert "fork failed" in out
    assert rc == 4
    if mechanism == "cgroup":
        assert report is not None and report.pids_limit_hits >= 1


@pytest.mark.slow
def test_cpu_spinner_is_killed(hostile_bin: Path, cgroups: GroupManager | None) -> None:
    rc, out, _ = _run(
        hostile_bin / "spin_cpu", WorkerLimits(cpu_seconds=1), cgroups, timeout=CPU_KILL_BOUND_S
    )
    assert rc in (-signal.SIGXCPU, -signal.SIGKILL)
    assert "survived" not in out


def test_rlimits_and_user_are_applied_to_the_worker() -> None:
    run_as = resolve_worker_user()
    limits = WorkerLimits(open_files=32, cpu_seconds=5, processes=50)
    argv = wrap_command(
        ["/bin/sh", "-c", "id -u; id -G; cat /proc/self/limits"], limits, run_as=run_as
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=True)
    lines = done.stdout.splitlines()
    rows = {" ".join(line.split()[:-3]): line.split()[-3:-1] for line in lines[2:] if line}
    assert rows["Max open files"] == ["32", "32"]
    assert rows["Max cpu time"] == ["5", "6"]
    assert rows["Max core file size"] == ["0", "0"]
    if run_as is None:
        assert lines[0] == str(os.getuid())
        assert rows["Max processes"] != ["50", "50"]  # meaningless without a dedicated user
    else:
        assert lines[0] == str(run_as[0])
        assert lines[1].split() == [str(run_as[1])]  # supplementary groups cleared
        assert rows["Max processes"] == ["50", "50"]


def test_address_space_limit_only_when_asked() -> None:
    argv = wrap_command(["/bin/true"], WorkerLimits(memory_mb=64), pdeathsig=False)
    assert not any(arg.startswith("--as") for arg in argv)
    argv = wrap_command(["/bin/true"], WorkerLimits(memory_mb=64).with_address_space())
    assert f"--as={64 << 20}:{64 << 20}" in argv


def test_wrapped_command_shape() -> None:
    argv = wrap_command(["/opt/fn/worker", "--flag"], WorkerLimits(), pdeathsig=True)
    assert argv[:5] == [find_tool("setpriv"), "--pdeathsig", "KILL", "--no-new-privs", "--"]
    assert argv[5:7] == ["/bin/sh", "-c"]  # the parent check
    assert argv[8] == str(os.getpid())
    assert argv[9:] == [
        find_tool("prlimit"),
        "--core=0",
        "--",
        "/opt/fn/worker",
        "--flag",
    ]
    plain = wrap_command(["/opt/fn/worker"], WorkerLimits(processes=8), pdeathsig=False)
    assert plain == [find_tool("prlimit"), "--core=0", "--", "/opt/fn/worker"]
    with pytest.raises(HardwareError):
        wrap_command([], WorkerLimits())


def test_enforcement_names_what_is_only_advisory() -> None:
    how = enforcement(WorkerLimits(memory_mb=64, processes=8, cpu_cores=0.5))
    assert how["memory_mb"].startswith("sampling only")
    assert how["processes"].startswith("not enforced")
    assert how["cpu_cores"].startswith("not enforced")
    how = enforcement(WorkerLimits(processes=8), run_as=(65534, 65534))
    assert how["processes"].startswith("rlimit RLIMIT_NPROC")
    assert set(enforcement(WorkerLimits(open_files=8))) == {"open_files"}


def test_processes_as_root_without_a_worker_user_are_not_enforced() -> None:
    """RLIMIT_NPROC does not apply to root: with no user and no pids cgroup, say so."""
    how = mechanisms(as_root=True)
    assert how["processes"].startswith("not enforced")
    assert "root" in how["processes"] and "edgefn-worker" in how["processes"]
    assert mechanisms(as_root=False)["processes"].startswith("not enforced")
    v1 = mechanisms(as_root=True, controllers=frozenset({"pids", "memory", "cpu"}), version=1)
    assert v1["processes"] == "cgroup v1 pids.max"
    assert v1["memory_mb"].startswith("cgroup v1 memory.limit_in_bytes (+ memsw")
    assert v1["cpu_cores"] == "cgroup v1 cpu.cfs_quota_us"
    no_swap_accounting = mechanisms(
        controllers=frozenset({"memory"}), version=1, swap_limited=False
    )
    assert "swap not limited" in no_swap_accounting["memory_mb"]


def test_missing_tool_is_a_clear_error() -> None:
    with pytest.raises(LimitToolMissing, match="util-linux"):
        find_tool("edgefn-no-such-tool")


def test_preflight_passes_here() -> None:
    assert preflight() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches workers to another user")
def test_worker_user_resolution() -> None:
    entry = pwd.getpwnam("nobody")
    assert resolve_worker_user("nobody") == (entry.pw_uid, entry.pw_gid)
    assert resolve_worker_user(str(entry.pw_uid)) == (entry.pw_uid, entry.pw_gid)
    try:
        dedicated = pwd.getpwnam("edgefn-worker")
        expected = (dedicated.pw_uid, dedicated.pw_gid)
    except KeyError:
        expected = (entry.pw_uid, entry.pw_gid)
    assert resolve_worker_user() == expected
    assert resolve_worker_user("nobody", "root") == (entry.pw_uid, 0)
    assert resolve_worker_user("root") is None
    with pytest.raises(WorkerUserError, match="edgefn-no-such-user"):
        resolve_worker_user("edgefn-no-such-user")
    with pytest.raises(WorkerUserError, match="group"):
        resolve_worker_user("nobody", "edgefn-no-such-group")


# A parent that starts the wrapped child, reports its pid, then waits to be killed (bounded).
_PARENT = """
import json, subprocess, sys, time
child = subprocess.Popen(json.loads(sys.argv[1]))
print(child.pid, flush=True)
time.sleep(60)
"""


def _spawn_orphan_candidate(argv: list[str]) -> tuple[psutil.Process, subprocess.Popen[str]]:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, json.dumps(argv)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    return child, parent


def _kill(parent: subprocess.Popen[str]) -> None:
    parent.kill()
    parent.wait()
    assert parent.stdout is not None
    parent.stdout.close()


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def kill_later() -> Iterator[list[psutil.Process]]:
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running():  # is_running() checks the pid was not reused
                proc.kill()


@pytest.mark.parametrize("as_worker_user", [False, True])
def test_worker_dies_with_its_parent(
    as_worker_user: bool, kill_later: list[psutil.Process]
) -> None:
    run_as = resolve_worker_user() if as_worker_user else None
    if as_worker_user and run_as is None:
        pytest.skip("only root switches workers to another user")
    # The credential change clears the parent-death signal unless setpriv sets it afterwards.
    child, parent = _spawn_orphan_candidate(
        wrap_command(["/bin/sleep", "30"], WorkerLimits(), run_as=run_as)
    )
    kill_later.append(child)
    _kill(parent)
    deadline = time.monotonic() + PDEATH_BOUND_S
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child)


@pytest.mark.slow
def test_without_pdeathsig_the_worker_outlives_its_parent(
    kill_later: list[psutil.Process],
) -> None:
    """The control for the test above: the kill really comes from the parent-death signal."""
    child, parent = _spawn_orphan_candidate(
        wrap_command(["/bin/sleep", "30"], WorkerLimits(), pdeathsig=False)
    )
    kill_later.append(child)
    _kill(parent)
    time.sleep(1.0)
    assert _alive(child)


def test_a_worker_orphaned_before_start_does_not_run() -> None:
    """The parent check: our pid is not 1, so the worker sees the "wrong" parent and gives up."""
    argv = wrap_command(["/bin/echo", "ran"], WorkerLimits(), parent_pid=1)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 70
    assert "ran" not in done.stdout
    assert "agent gone" in done.stderr

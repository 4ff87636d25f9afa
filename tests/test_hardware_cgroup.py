"""cgroup v2 detection and per-worker groups.

Detection runs on fake /proc trees for layouts this machine cannot have (pure v2 with
controllers, a delegated service cgroup) and on the real machine. Group mechanics (join, move,
kill, sweep, remove) run on the real cgroup2 hierarchy when it is writable here, with no
controllers required ("tracking only"), under a unique prefix that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from hardware.cgroup import CgroupManager, CgroupReport, WorkerCgroup, apply_limits
from hardware.errors import CgroupError
from hardware.limits import WorkerLimits, wrap_command

# Bound for processes to show up in / vanish from a group (milliseconds in practice).
SETTLE_S = 5.0

_V1_AND_V2 = """\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
_V2_ONLY = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw\n"


def _fake(
    root: Path,
    mountinfo: str,
    own: str,
    mount: str,
    *,
    controllers: str = "",
    procs: str = "",
    nested: bool = True,
) -> Path:
    """A /proc/self and cgroup directory as the kernel would show them (files only)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(f"0::{own}\n")
    base = root / mount.lstrip("/") / own.lstrip("/")
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.subtree_control").write_text("\n")
    (base / "cgroup.procs").write_text(procs)
    if nested:
        (base / "cgroup.type").write_text("domain\n")
    return base


def test_no_cgroup2_mount_is_reported(tmp_path: Path) -> None:
    _fake(tmp_path, _V1_AND_V2.splitlines()[0] + "\n", "/", "/sys/fs/cgroup/memory", nested=False)
    status = CgroupManager(root=tmp_path).setup()
    assert not status.available
    assert "no cgroup2" in status.reason


def test_hybrid_layout_is_reported_with_the_fix(tmp_path: Path) -> None:
    _fake(tmp_path, _V1_AND_V2, "/", "/sys/fs/cgroup/unified", nested=False)
    status = CgroupManager(root=tmp_path).setup()
    assert not status.available
    assert "hybrid" in status.reason
    assert "systemd.unified_cgroup_hierarchy=1" in status.reason


def test_undelegated_cgroup_is_reported(tmp_path: Path) -> None:
    _fake(tmp_path, _V2_ONLY, "/system.slice/edge-agent.service", "/sys/fs/cgroup")
    status = CgroupManager(root=tmp_path).probe()
    assert not status.available
    assert "Delegate=yes" in status.reason


def test_delegated_service_cgroup_offers_its_controllers(tmp_path: Path) -> None:
    base = _fake(
        tmp_path,
        _V2_ONLY,
        "/system.slice/edge-agent.service",
        "/sys/fs/cgroup",
        controllers="cpuset cpu io memory pids",
    )
    status = CgroupManager(root=tmp_path).probe()
    assert status.available
    assert status.base == base
    assert status.controllers == {"memory", "pids", "cpu"}


def test_partial_controllers_are_used_and_named(tmp_path: Path) -> None:
    _fake(tmp_path, _V2_ONLY, "/svc", "/sys/fs/cgroup", controllers="memory")
    status = CgroupManager(root=tmp_path).probe()
    assert status.available and status.controllers == {"memory"}
    assert "not offered: pids, cpu" in status.reason


def test_occupied_cgroup_is_not_emptied_when_moving_is_off(tmp_path: Path) -> None:
    _fake(
        tmp_path,
        _V2_ONLY,
        "/svc",
        "/sys/fs/cgroup",
        controllers="memory pids cpu",
        procs="4242\n",
    )
    status = CgroupManager(root=tmp_path, move_self=False).setup()
    assert not status.available
    assert "no internal processes" in status.reason


def test_limits_are_written_in_kernel_units(tmp_path: Path) -> None:
    for name in ("memory.max", "memory.swap.max", "memory.oom.group", "pids.max", "cpu.max"):
        (tmp_path / name).write_text("")
    limits = WorkerLimits(memory_mb=64, processes=16, cpu_cores=0.5)
    apply_limits(tmp_path, frozenset({"memory", "pids", "cpu"}), limits)
    assert (tmp_path / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (tmp_path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "memory.oom.group").read_text() == "1"
    assert (tmp_path / "pids.max").read_text() == "16"
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"


def test_limits_skip_controllers_not_enabled(tmp_path: Path) -> None:
    (tmp_path / "pids.max").write_text("")
    apply_limits(tmp_path, frozenset({"pids"}), WorkerLimits(memory_mb=64, processes=4))
    assert not (tmp_path / "memory.max").exists()
    assert (tmp_path / "pids.max").read_text() == "4"


def test_report_explains_a_memory_kill(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    report = WorkerCgroup(tmp_path).report()
    assert report == CgroupReport(oom_kills=1, pids_limit_hits=0)
    assert report.reason is not None and "memory" in report.reason
    assert CgroupReport().reason is None


def test_unsafe_names_are_refused() -> None:
    with pytest.raises(CgroupError):
        CgroupManager(prefix="../escape")


def test_this_machine_reports_a_status() -> None:
    status = CgroupManager().probe()  # read-only
    print(status.describe())
    assert status.available or status.reason


# --- the real hierarchy ---------------------------------------------------------------------


@pytest.fixture
def tracking() -> Iterator[CgroupManager]:
    """A tracking-only manager on the real cgroup2 hierarchy, removed afterwards."""
    manager = CgroupManager(prefix=f"edgefn-test-{uuid.uuid4().hex[:8]}", want=(), move_self=False)
    status = manager.setup()
    if not status.available or status.base is None:
        pytest.skip(f"no writable cgroup v2 here: {status.reason}")
    try:
        yield manager
    finally:
        manager.sweep()
        with contextlib.suppress(OSError):
            (status.base / manager.prefix).rmdir()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {SETTLE_S} s: {what}")
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_worker_joins_its_group_and_remove_kills_the_whole_tree(
    tracking: CgroupManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    group = tracking.create("fn", "w1", WorkerLimits())
    assert group is not None and group.path.is_dir()
    argv = wrap_command(
        ["/bin/sh", "-c", "sleep 30 & sleep 30; wait"], WorkerLimits(), cgroup=group
    )
    worker = subprocess.Popen(argv)
    procs.append(worker)
    _until(lambda: len(group.pids()) >= 2, "worker and its child in the group")
    members = group.pids()
    assert worker.pid in members
    group.remove()
    assert not group.path.exists()
    assert worker.wait(timeout=SETTLE_S) < 0
    _until(lambda: all(_gone(pid) for pid in members), "grandchildren killed with the group")


def test_add_pid_moves_a_running_process(
    tracking: CgroupManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    group = tracking.create("fn", "w2", WorkerLimits())
    assert group is not None
    sleeper = subprocess.Popen(["/bin/sleep", "30"])
    procs.append(sleeper)
    group.add_pid(sleeper.pid)
    assert group.pids() == [sleeper.pid]
    assert group.report().reason is None
    group.remove()
    assert sleeper.wait(timeout=SETTLE_S) < 0


def test_a_new_manager_sweeps_groups_left_by_a_crashed_run(
    tracking: CgroupManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    group = tracking.create("fn", "w3", WorkerLimits())
    assert group is not None
    orphan = subprocess.Popen([*group.join_argv(), "/bin/sleep", "30"])
    procs.append(orphan)
    _until(lambda: group.pids() == [orphan.pid], "orphan in its group")
    restarted = CgroupManager(prefix=tracking.prefix, want=(), move_self=False)
    assert restarted.setup().available
    assert not group.path.exists()
    assert orphan.wait(timeout=SETTLE_S) < 0


def test_a_reused_worker_id_starts_clean(
    tracking: CgroupManager, procs: list[subprocess.Popen[bytes]]
) -> None:
    first = tracking.create("fn", "w4", WorkerLimits())
    assert first is not None
    stale = subprocess.Popen([*first.join_argv(), "/bin/sleep", "30"])
    procs.append(stale)
    _until(lambda: first.pids() == [stale.pid], "stale worker in its group")
    second = tracking.create("fn", "w4", WorkerLimits())
    assert second is not None and second.pids() == []
    assert stale.wait(timeout=SETTLE_S) < 0
    second.remove()
    tracking.remove_function("fn")
    assert not (second.path.parent).exists()

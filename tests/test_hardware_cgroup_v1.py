"""cgroup v1 per-worker groups: detection on fake trees, mechanics on this machine's real v1.

This machine has the hybrid layout (memory, pids, cpu as v1 hierarchies, writable as root), so
the group mechanics run for real under a unique prefix that is removed afterwards; elsewhere
they are skipped with the reason.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hardware.cgroup_v1 import CgroupV1Manager, WorkerCgroupV1, apply_limits_v1
from hardware.isolation import instance_prefix, open_cgroups
from hardware.limits import WorkerLimits, wrap_command

# Bound for processes to show up in / vanish from a group (milliseconds in practice).
SETTLE_S = 5.0

_HYBRID = """\
30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
33 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 25 0:30 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
"""
_OWN = """\
5:freezer:/
4:cpu,cpuacct:/system.slice/edge.service
3:pids:/system.slice/edge.service
2:memory:/system.slice/edge.service
0::/system.slice/edge.service
"""


def _fake(root: Path, mountinfo: str = _HYBRID, own: str = _OWN) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(own)
    for tree in ("memory", "pids", "cpu,cpuacct"):
        (root / "sys/fs/cgroup" / tree / "system.slice/edge.service").mkdir(parents=True)


def test_hybrid_layout_finds_each_hierarchy_under_our_own_cgroup(tmp_path: Path) -> None:
    _fake(tmp_path)
    status, found = CgroupV1Manager(root=tmp_path).probe()
    assert status.available and status.version == 1
    assert status.controllers == {"memory", "pids", "cpu"}
    bases = {h.base.relative_to(tmp_path / "sys/fs/cgroup").parts[0] for h in found}
    assert bases == {"memory", "pids", "cpu,cpuacct"}
    assert status.base == tmp_path / "sys/fs/cgroup/memory/system.slice/edge.service"


def test_missing_hierarchies_are_named(tmp_path: Path) -> None:
    _fake(tmp_path, mountinfo=_HYBRID.splitlines()[1] + "\n")
    status, _ = CgroupV1Manager(root=tmp_path).probe()
    assert status.available and status.controllers == {"memory"}
    assert "not usable: pids, cpu" in status.reason
    _fake(tmp_path / "none", mountinfo=_HYBRID.splitlines()[0] + "\n")
    status, _ = CgroupV1Manager(root=tmp_path / "none").probe()
    assert not status.available and "no cgroup v1 hierarchy" in status.reason


def test_limits_are_written_in_v1_files(tmp_path: Path) -> None:
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "pids.max"):
        (tmp_path / name).write_text("")
    for name in ("cpu.cfs_period_us", "cpu.cfs_quota_us"):
        (tmp_path / name).write_text("")
    limits = WorkerLimits(memory_mb=64, processes=16, cpu_cores=0.25)
    apply_limits_v1(tmp_path, frozenset({"memory", "pids", "cpu"}), limits)
    assert (tmp_path / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (tmp_path / "memory.memsw.limit_in_bytes").read_text() == str(64 << 20)
    assert (tmp_path / "pids.max").read_text() == "16"
    assert (tmp_path / "cpu.cfs_period_us").read_text() == "100000"
    assert (tmp_path / "cpu.cfs_quota_us").read_text() == "25000"


def test_report_reads_v1_oom_and_pids_events(tmp_path: Path) -> None:
    mem, pids = tmp_path / "m", tmp_path / "p"
    mem.mkdir()
    pids.mkdir()
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (pids / "pids.events").write_text("max 5\n")
    group = WorkerCgroupV1(((mem, frozenset({"memory"})), (pids, frozenset({"pids"}))))
    report = group.report()
    assert (report.oom_kills, report.pids_limit_hits) == (2, 5)
    assert report.reason is not None and "memory limit" in report.reason


def test_instance_prefix_is_per_data_dir(tmp_path: Path) -> None:
    a, b = instance_prefix(tmp_path / "a"), instance_prefix(tmp_path / "b")
    assert a != b and a.startswith("edgefn-")
    assert instance_prefix(tmp_path / "a") == a


# --- the real v1 hierarchies ---------------------------------------------------------------


@pytest.fixture
def v1() -> Iterator[CgroupV1Manager]:
    manager = CgroupV1Manager(prefix=f"edgefn-test-{uuid.uuid4().hex[:8]}")
    status = manager.setup()
    if not status.available:
        pytest.skip(f"no writable cgroup v1 here: {status.reason}")
    try:
        yield manager
    finally:
        manager.close()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {SETTLE_S} s: {what}")
        time.sleep(0.01)


def test_open_cgroups_picks_v1_on_this_hybrid_machine() -> None:
    manager, status = open_cgroups(f"edgefn-test-{uuid.uuid4().hex[:8]}")
    try:
        print(status.describe())
        if isinstance(manager, CgroupV1Manager):
            assert status.version == 1 and {"memory", "pids", "cpu"} <= status.controllers
    finally:
        if manager is not None:
            manager.close()


def test_cpu_quota_and_limits_are_visible_in_the_group(v1: CgroupV1Manager) -> None:
    group = v1.create("fn", "w1", WorkerLimits(memory_mb=48, processes=7, cpu_cores=0.5))
    assert group is not None
    files: dict[str, str] = {}
    for directory, _ in group.dirs:
        for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us", "pids.max"):
            if (directory / name).exists():
                files[name] = (directory / name).read_text().strip()
        for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            if (directory / name).exists():
                files[name] = (directory / name).read_text().strip()
    assert files["cpu.cfs_quota_us"] == "50000"
    assert files["cpu.cfs_period_us"] == "100000"
    assert files["pids.max"] == "7"
    assert files["memory.limit_in_bytes"] == str(48 << 20)
    if v1.swap_limited:
        assert files["memory.memsw.limit_in_bytes"] == str(48 << 20)
    group.remove()
    assert not any(d.exists() for d, _ in group.dirs)


def test_worker_joins_every_hierarchy_and_remove_kills_its_tree(v1: CgroupV1Manager) -> None:
    group = v1.create("fn", "w2", WorkerLimits())
    assert group is not None
    worker = subprocess.Popen(
        wrap_command(["/bin/sh", "-c", "sleep 30 & sleep 30; wait"], WorkerLimits(), cgroup=group)
    )
    try:
        _until(lambda: len(group.pids()) >= 2, "worker and child in the group")
        own = Path(f"/proc/{worker.pid}/cgroup").read_text()
        for directory, names in group.dirs:
            assert f"{sorted(names)[0]}" in own
            assert str(directory).endswith("/fn/w2")
            assert worker.pid in [int(p) for p in (directory / "cgroup.procs").read_text().split()]
        members = group.pids()
        group.remove()
        assert worker.wait(timeout=SETTLE_S) < 0
        _until(lambda: not any(Path(f"/proc/{p}").exists() for p in members), "tree killed")
    finally:
        worker.kill()
        worker.wait()


def test_restart_sweeps_only_its_own_instance(v1: CgroupV1Manager) -> None:
    mine = v1.create("fn", "w3", WorkerLimits())
    other = CgroupV1Manager(prefix=f"edgefn-test-{uuid.uuid4().hex[:8]}")
    assert other.setup().available
    theirs = other.create("fn", "w3", WorkerLimits())
    assert mine is not None and theirs is not None
    orphan = subprocess.Popen([*mine.join_argv(), "/bin/sleep", "30"])
    bystander = subprocess.Popen([*theirs.join_argv(), "/bin/sleep", "30"])
    try:
        _until(lambda: mine.pids() == [orphan.pid], "orphan in its group")
        _until(lambda: theirs.pids() == [bystander.pid], "bystander in its group")
        restarted = CgroupV1Manager(prefix=v1.prefix)
        assert restarted.setup().available
        assert restarted.swept == 1
        assert orphan.wait(timeout=SETTLE_S) < 0
        assert bystander.poll() is None  # another agent's worker is untouched
    finally:
        for proc in (orphan, bystander):
            proc.kill()
            proc.wait()
        other.close()

"""The host summary: one line naming how each limit is enforced and which is not, per host kind.

Pure values (no cgroupfs): each combination of cgroup version, PID namespace and worker user an
agent can meet, checked against what docs/hardware.md's table promises.
"""

from __future__ import annotations

import logging

from hardware.cgroupfs import CgroupStatus
from hardware.isolation import HostIsolation

ALL = frozenset({"memory", "pids", "cpu"})


class _Manager:
    """Stands in for a set-up cgroup manager: the summary reads only `status`."""

    def __init__(self, status: CgroupStatus) -> None:
        self.status = status
        self.swept = 0

    def setup(self) -> CgroupStatus:
        return self.status

    def create(self, function: str, worker_id: str, limits: object) -> None:
        return None

    def remove_function(self, function: str) -> None:
        return None

    def sweep(self) -> int:
        return 0

    def close(self) -> None:
        return None


def _host(version: int | None, *, pidns: bool, run_as: tuple[int, int] | None) -> HostIsolation:
    if version is None:
        status = CgroupStatus(False, "v2: hybrid; v1: none", version=0)
        return HostIsolation(None, status, run_as, pidns, "" if pidns else "not root")
    status = CgroupStatus(True, "ok", None, ALL, version)
    return HostIsolation(_Manager(status), status, run_as, pidns, "" if pidns else "not root")  # type: ignore[arg-type]


def test_cgroup_v2_with_namespaces_is_the_quiet_case() -> None:
    level, line = _host(2, pidns=True, run_as=(999, 999)).summary()
    assert level == logging.INFO
    assert "memory_mb by cgroup v2 memory.max" in line
    assert "process tree: PID namespace per worker" in line
    assert line.endswith("NOT enforced: none")


def test_cgroup_v1_is_a_warning_that_names_the_v1_files() -> None:
    level, line = _host(1, pidns=True, run_as=(999, 999)).summary()
    assert level == logging.WARNING
    assert "memory_mb by cgroup v1 memory.limit_in_bytes (+ memsw" in line
    assert "processes by cgroup v1 pids.max" in line
    assert "cpu_cores by cgroup v1 cpu.cfs_quota_us" in line
    assert line.endswith("NOT enforced: none")


def test_no_cgroup_as_root_without_worker_user_says_processes_are_not_enforced() -> None:
    level, line = _host(None, pidns=True, run_as=None).summary()
    assert level == logging.WARNING
    missing = line.split("NOT enforced: ")[1]
    assert "processes (the agent runs as root, RLIMIT_NPROC does not apply to root" in missing
    assert "cpu_cores (no cgroup cpu controller)" in missing
    assert "memory_mb by sampling only" in line


def test_no_cgroup_with_a_worker_user_limits_processes_per_user() -> None:
    _, line = _host(None, pidns=False, run_as=(999, 999)).summary()
    assert "processes by rlimit RLIMIT_NPROC" in line
    assert "process tree: process group" in line and "escape" in line
    assert "processes (" not in line.split("NOT enforced: ")[1]


def test_cgroup_without_namespaces_kills_the_group() -> None:
    _, line = _host(1, pidns=False, run_as=None).summary()
    assert "process tree: cgroup v1 (its group is killed with the worker" in line

"""What this host can enforce on workers, how, and the one line that says so.

Flow (once at agent start, blocking): `detect_isolation(prefix, run_as)` picks the cgroup
version (v2 when it offers memory/pids/cpu to us, else the v1 hierarchies, else none), probes
whether a PID namespace per worker works here, and returns `HostIsolation`. Its `summary()` is
the single log line (WARNING when anything is weaker than cgroup v2 plus a PID namespace)
naming which mechanism enforces each limit and which limit is not enforced at all; the table
in docs/hardware.md lists every case.

`instance_prefix(data_dir)` names the agent's cgroup subtree after its data dir, so two agents
on one box (or parallel test runs) never sweep each other's workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hardware.cgroup import CgroupManager
from hardware.cgroup_v1 import CgroupV1Manager
from hardware.cgroupfs import CgroupStatus, GroupManager
from hardware.errors import HardwareError
from hardware.limits import find_tool, mechanisms

# The probe runs /bin/true in a new namespace: milliseconds; the bound is for a wedged kernel.
_PROBE_TIMEOUT_S = 5.0


def instance_prefix(data_dir: Path) -> str:
    """`edgefn-<12 hex>`: a cgroup name unique to this agent instance (its data dir)."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return f"edgefn-{digest}"


def open_cgroups(
    prefix: str, *, root: Path = Path("/")
) -> tuple[GroupManager | None, CgroupStatus]:
    """The cgroup manager to use (already set up, stale groups swept), or None and why not."""
    v2 = CgroupManager(root=root, prefix=prefix)
    s2 = v2.setup()
    if s2.available and s2.controllers:
        return v2, s2
    v1 = CgroupV1Manager(root=root, prefix=prefix)
    s1 = v1.setup()
    if s1.available:
        return v1, s1
    return None, CgroupStatus(False, f"v2: {s2.reason}; v1: {s1.reason}", version=0)


def probe_pid_namespace() -> str | None:
    """None when `unshare --pid --fork --kill-child` works here, else why it cannot be used.

    Creating a PID namespace needs CAP_SYS_ADMIN, so only a root agent uses them (an
    unprivileged user namespace would hand every function the capabilities of its own
    namespace: more kernel surface than the feature is worth).
    """
    if os.geteuid() != 0:
        return "the agent does not run as root (a PID namespace needs CAP_SYS_ADMIN)"
    try:
        unshare = find_tool("unshare")
    except HardwareError as exc:
        return exc.message
    try:
        done = subprocess.run(
            [unshare, "--pid", "--fork", "--kill-child", "--", "/bin/true"],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare does not run: {exc}"
    if done.returncode != 0:
        return f"the kernel refused a PID namespace: {done.stderr.strip() or done.returncode}"
    return None


@dataclass(frozen=True, slots=True)
class HostIsolation:
    cgroups: GroupManager | None
    status: CgroupStatus
    run_as: tuple[int, int] | None
    pid_namespace: bool
    pidns_reason: str = ""  # why not, when pid_namespace is False

    def limits(self) -> dict[str, str]:
        """Each limit kind -> how workers started here get it (see `hardware.limits`)."""
        available = self.cgroups is not None and self.status.available
        return mechanisms(
            run_as=self.run_as,
            controllers=self.status.controllers if available else frozenset(),
            version=self.status.version,
            swap_limited=not isinstance(self.cgroups, CgroupV1Manager) or self.cgroups.swap_limited,
        )

    def process_tree(self) -> str:
        """How a worker's children (detached ones too) are ended with it."""
        if self.pid_namespace:
            return (
                "PID namespace per worker (every process it started dies with it, "
                "even when the agent is killed)"
            )
        if self.cgroups is not None and self.status.available:
            return (
                f"cgroup v{self.status.version} (its group is killed with the worker; after an "
                f"agent crash, at the next start; no PID namespace: {self.pidns_reason})"
            )
        return (
            "process group (killed with the worker, leftovers of a crashed agent at the next "
            "start; children that start their own session escape; no PID namespace: "
            f"{self.pidns_reason}; no cgroup: {self.status.reason})"
        )

    def summary(self) -> tuple[int, str]:
        """(log level, the one line): WARNING unless everything is cgroup v2 + PID namespace."""
        how = self.limits()
        parts = [f"{name} by {text}" for name, text in how.items() if "not enforced" not in text]
        missing = [
            f"{name} ({text.removeprefix('not enforced: ')})"
            for name, text in how.items()
            if "not enforced" in text
        ]
        line = (
            f"worker limits: {'; '.join(parts)}; process tree: {self.process_tree()}; "
            f"NOT enforced: {'; '.join(missing) if missing else 'none'}"
        )
        best = (
            not missing
            and self.pid_namespace
            and self.status.version == 2
            and all(not text.startswith("sampling") for text in how.values())
        )
        return (logging.INFO if best else logging.WARNING), line


def detect_isolation(prefix: str, run_as: tuple[int, int] | None) -> HostIsolation:
    """Blocking (cgroupfs writes, one probe process): call once at agent start."""
    cgroups, status = open_cgroups(prefix)
    reason = probe_pid_namespace()
    return HostIsolation(cgroups, status, run_as, reason is None, reason or "")

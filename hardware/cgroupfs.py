"""What cgroup v1 and v2 have in common: the status and report values, the two interfaces the
sandbox uses (`GroupManager`, `WorkerGroup`), and the file helpers both versions read and write
cgroupfs with.

`hardware.cgroup` (v2, one unified tree) and `hardware.cgroup_v1` (one tree per controller)
implement the interfaces; `hardware.isolation` picks one for the host. Everything here is
blocking file I/O on a virtual file system: microseconds per call, but not for the event loop's
hot path.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hardware.errors import CgroupError
from hardware.limits import WorkerLimits

# Names we create directories with (function names, worker ids, our prefix): no path tricks.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

# The kernel's default CPU period (v2 `cpu.max`, v1 `cpu.cfs_period_us`); quota = cores * period.
CPU_PERIOD_US = 100_000
# The kernel refuses a CPU quota below 1 ms.
MIN_CPU_QUOTA_US = 1_000
# How long a group's remove() waits for killed processes to leave it (they exit within
# milliseconds unless stuck in uninterruptible I/O), and how often it looks (and kills again: a
# fork loop's children).
REMOVE_TIMEOUT_S = 5.0
POLL_S = 0.01
MB = 1024 * 1024


def cpu_quota_us(cores: float) -> int:
    """The quota per `CPU_PERIOD_US` that gives `cores` cores, never below the kernel's floor."""
    return max(MIN_CPU_QUOTA_US, round(cores * CPU_PERIOD_US))


@dataclass(frozen=True, slots=True)
class CgroupStatus:
    """Whether per-worker cgroups are used, which limits they enforce, and why (not)."""

    available: bool
    reason: str
    base: Path | None = None  # v2: our cgroup's directory; v1: the memory (or first) tree's
    controllers: frozenset[str] = frozenset()
    version: int = 2

    def describe(self) -> str:
        if not self.available:
            return f"cgroup v{self.version}: not available ({self.reason})"
        enforced = ", ".join(sorted(self.controllers)) or "none (process tracking only)"
        return f"cgroup v{self.version}: {self.base}, controllers {enforced}"


@dataclass(frozen=True, slots=True)
class CgroupReport:
    """What the kernel recorded about a worker's group; read it before `remove()`."""

    oom_kills: int = 0
    pids_limit_hits: int = 0

    @property
    def reason(self) -> str | None:
        """A human reason for the worker's death, if its group explains it."""
        if self.oom_kills:
            return "exceeded its memory limit (stopped by the kernel: cgroup memory limit)"
        if self.pids_limit_hits:
            return "process limit reached (cgroup pids.max)"
        return None


class WorkerGroup(Protocol):
    """One worker's cgroup (v2: one directory; v1: one directory per controller tree)."""

    @property
    def controllers(self) -> frozenset[str]: ...

    @property
    def version(self) -> int: ...

    def join_argv(self) -> list[str]: ...

    def add_pid(self, pid: int) -> None: ...

    def pids(self) -> list[int]: ...

    def report(self) -> CgroupReport: ...

    def kill(self) -> None: ...

    def remove(self) -> None: ...


class GroupManager(Protocol):
    """Owns the agent's cgroup subtree; one per agent."""

    status: CgroupStatus
    swept: int

    def setup(self) -> CgroupStatus: ...

    def create(self, function: str, worker_id: str, limits: WorkerLimits) -> WorkerGroup | None: ...

    def remove_function(self, function: str) -> None: ...

    def sweep(self) -> int: ...

    def close(self) -> None: ...


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise CgroupError(f"{name!r} is not a safe cgroup name", code="bad_cgroup_name")
    return name


def unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def write(path: Path, value: str) -> None:
    # One write() per value: cgroupfs parses each write as a whole.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def write_if_present(path: Path, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        write(path, value)


def read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def read_pids(path: Path) -> list[int]:
    return [int(word) for word in read_words(path) if word.isdigit()]


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def read_keyed(path: Path) -> dict[str, int]:
    """`key value` lines (memory.events, pids.events, memory.oom_control) as a dict."""
    values: dict[str, int] = {}
    for line in read_lines(path):
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def join_argv(procs_files: list[Path]) -> list[str]:
    """Prefix that moves the process into each group, then execs the rest of the argv.

    A shell is the one program everywhere that can write its own pid and exec without
    Python's `preexec_fn`; if a write fails the worker does not start (fail closed, status 71).
    v2 has one `cgroup.procs` to write; v1 one per controller tree.
    """
    if len(procs_files) == 1:
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs_files[0])]
    script = 'n=$0; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 71; shift; n=$((n-1)); done; '
    return [
        "/bin/sh",
        "-c",
        script + 'exec "$@"',
        str(len(procs_files)),
        *(str(p) for p in procs_files),
    ]

"""cgroup v2 per-worker groups: memory, process and CPU limits the kernel enforces on the group.

Flow: the agent calls `CgroupManager().setup()` once at start (blocking: via `asyncio.to_thread`).
It finds the cgroup2 mount (/proc/self/mountinfo) and our own cgroup (the "0::" line of
/proc/self/cgroup), checks which of memory/pids/cpu the parent delegated to us and that we can
write there, then prepares

    <our cgroup>/agent/                       the agent's own processes, moved here if needed
    <our cgroup>/edgefn/<function>/<worker>/  one leaf per worker, with the limits

The move exists because of cgroup v2's "no internal processes" rule: a non-root cgroup that holds
processes cannot enable controllers for its children. Stale worker groups of a previous run are
killed and removed. Anything that does not work yields `CgroupStatus(available=False, reason=...)`
and the pool falls back to rlimits (hardware.limits): it never stops the agent.

Per worker: `create(function, worker_id, limits)` -> `WorkerCgroup`; the pool passes it to
`wrap_command(..., cgroup=...)` so the worker joins the group before it runs (or calls `add_pid`
after spawning, which leaves a short window). After the worker exits the pool reads
`report()` (was it OOM-killed? did it hit pids.max?) and calls `remove()`, which kills stragglers
(grandchildren included) and deletes the group. All methods do blocking file I/O.
Under systemd the agent's unit needs `Delegate=yes` so that its cgroup is ours to manage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from hardware.cgroupfs import (
    CPU_PERIOD_US,
    MB,
    POLL_S,
    REMOVE_TIMEOUT_S,
    CgroupReport,
    CgroupStatus,
    check_name,
    cpu_quota_us,
    join_argv,
    read_keyed,
    read_lines,
    read_pids,
    read_words,
    unescape,
    write,
    write_if_present,
)
from hardware.errors import CgroupError
from hardware.limits import WorkerLimits

CONTROLLERS: tuple[str, ...] = ("memory", "pids", "cpu")
# Processes can be forked into our cgroup while we move them out of it; a few passes settle it.
_MOVE_ROUNDS = 5


@dataclass(frozen=True, slots=True)
class WorkerCgroup:
    path: Path
    controllers: frozenset[str] = field(default_factory=frozenset)

    version: int = 2

    def join_argv(self) -> list[str]:
        """Prefix that moves the process into this group, then execs the rest of the argv."""
        return join_argv([self.path / "cgroup.procs"])

    def add_pid(self, pid: int) -> None:
        """Move a running process in; children it forked before the move stay outside."""
        try:
            write(self.path / "cgroup.procs", str(pid))
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {exc}") from exc

    def pids(self) -> list[int]:
        return read_pids(self.path / "cgroup.procs")

    def report(self) -> CgroupReport:
        return CgroupReport(
            oom_kills=read_keyed(self.path / "memory.events").get("oom_kill", 0),
            pids_limit_hits=read_keyed(self.path / "pids.events").get("max", 0),
        )

    def kill(self) -> None:
        """SIGKILL everything in the group (cgroup.kill on 5.14+, else pid by pid)."""
        try:
            write(self.path / "cgroup.kill", "1")
            return
        except FileNotFoundError:
            if not self.path.exists():
                return
        except OSError:
            pass
        for _ in range(_MOVE_ROUNDS):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = REMOVE_TIMEOUT_S) -> None:
        """Kill what is left and delete the group; a group that is already gone is fine."""
        if not self.path.exists():
            return
        self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(
                        f"cannot remove {self.path}: {exc} (pids left: {self.pids()})"
                    ) from exc
            time.sleep(POLL_S)


class CgroupManager:
    """Owns `<our cgroup>/<prefix>/`; one per agent."""

    def __init__(
        self,
        *,
        root: Path = Path("/"),
        prefix: str = "edgefn",
        agent_leaf: str = "agent",
        want: tuple[str, ...] = CONTROLLERS,
        move_self: bool = True,
    ) -> None:
        """`root` relocates /proc and the mount for tests; `want=()` gives tracking-only groups.

        `move_self=False` refuses to move processes out of our own cgroup (tests, shells)
        and reports the cgroup unavailable instead.
        """
        for name in (prefix, agent_leaf):
            check_name(name)
        self.root = root
        self.prefix = prefix
        self.agent_leaf = agent_leaf
        self.want = want
        self.move_self = move_self
        self.status = CgroupStatus(False, "not set up yet")
        self.swept = 0  # worker groups of a previous run that setup() removed

    def probe(self) -> CgroupStatus:
        """Read-only: where our cgroup is and which wanted controllers it could give us."""
        mount = _cgroup2_mount(self.root)
        if mount is None:
            return CgroupStatus(False, "no cgroup2 file system is mounted (cgroup v1 only)")
        mount_point, mount_root = mount
        own = _own_cgroup(self.root)
        if own is None:
            return CgroupStatus(False, "/proc/self/cgroup has no cgroup v2 entry")
        try:
            relative = Path(own).relative_to(mount_root)
        except ValueError:
            return CgroupStatus(
                False, f"our cgroup {own} is outside the cgroup2 mount root {mount_root}"
            )
        base = mount_point / relative
        # An agent restarted inside the leaf it created earlier manages the parent again.
        if base.name == self.agent_leaf and (base.parent / self.prefix).is_dir():
            base = base.parent
        offered = set(read_words(base / "cgroup.controllers"))
        controllers = frozenset(c for c in self.want if c in offered)
        if self.want and not controllers:
            in_v1 = sorted(set(self.want) & _v1_controllers(self.root))
            why = (
                f"they are bound to cgroup v1 ({', '.join(in_v1)}): this host uses the hybrid "
                "v1/v2 layout; boot with systemd.unified_cgroup_hierarchy=1 to move them to v2"
                if in_v1
                else "the parent cgroup does not delegate them (systemd: Delegate=yes)"
            )
            return CgroupStatus(
                False,
                f"cgroup2 at {mount_point} offers none of {', '.join(self.want)} to {base}: {why}",
                base,
            )
        if not os.access(base, os.W_OK):
            return CgroupStatus(
                False,
                f"{base} is not writable for us (under systemd set Delegate=yes on the unit)",
                base,
            )
        missing = [c for c in self.want if c not in controllers]
        note = f"; not offered: {', '.join(missing)}" if missing else ""
        return CgroupStatus(True, f"cgroup v2 at {base}{note}", base, controllers)

    def setup(self) -> CgroupStatus:
        """Probe, make room for worker groups, sweep stale ones; idempotent."""
        if self.status.available:
            return self.status
        status = self.probe()
        if status.available and status.base is not None:
            try:
                status = self._prepare(status.base, status)
            except OSError as exc:
                status = CgroupStatus(False, f"cannot prepare {status.base}: {exc}", status.base)
        self.status = status
        return status

    def create(self, function: str, worker_id: str, limits: WorkerLimits) -> WorkerCgroup | None:
        """A fresh group with the limits for one worker, or None when cgroups are unavailable."""
        status = self.status
        if not status.available or status.base is None:
            return None
        check_name(function)
        check_name(worker_id)
        function_dir = status.base / self.prefix / function
        try:
            function_dir.mkdir(exist_ok=True)
            _enable(function_dir, status.controllers)
        except OSError as exc:
            raise CgroupError(f"cannot create {function_dir}: {exc}") from exc
        leaf = WorkerCgroup(function_dir / worker_id, status.controllers)
        if leaf.path.exists():  # a worker id reused after a crash: start clean
            leaf.remove()
        try:
            leaf.path.mkdir()
            apply_limits(leaf.path, status.controllers, limits)
        except OSError as exc:
            with contextlib.suppress(OSError, CgroupError):
                leaf.remove()
            raise CgroupError(f"cannot set limits in {leaf.path}: {exc}") from exc
        return leaf

    def remove_function(self, function: str) -> None:
        """Remove a function's (empty) directory once its pool is gone; busy is not an error."""
        if self.status.base is None:
            return
        with contextlib.suppress(FileNotFoundError):
            try:
                (self.status.base / self.prefix / check_name(function)).rmdir()
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise CgroupError(f"cannot remove function cgroup {function}: {exc}") from exc

    def sweep(self) -> int:
        """Kill and remove worker groups left by a previous run; returns how many."""
        if self.status.base is None:
            return 0
        return self._sweep(self.status.base / self.prefix)

    def close(self) -> None:
        """Remove our (empty) subtree at agent exit; busy groups stay for the next sweep."""
        if self.status.base is None:
            return
        self.sweep()
        with contextlib.suppress(OSError):
            (self.status.base / self.prefix).rmdir()

    def _prepare(self, base: Path, status: CgroupStatus) -> CgroupStatus:
        is_root = not (base / "cgroup.type").exists()  # the root cgroup has no cgroup.type
        enabled = set(read_words(base / "cgroup.subtree_control"))
        if not is_root and status.controllers - enabled and read_pids(base / "cgroup.procs"):
            if not self.move_self:
                return CgroupStatus(
                    False,
                    f"{base} holds processes, so it cannot enable controllers for children "
                    "(no internal processes rule), and moving them is switched off",
                    base,
                )
            self._move_out(base, base / self.agent_leaf)
        _enable(base, status.controllers)
        top = base / self.prefix
        top.mkdir(exist_ok=True)
        _enable(top, status.controllers)
        controllers = frozenset(
            c for c in status.controllers if c in read_words(top / "cgroup.subtree_control")
        )
        if status.controllers and not controllers:
            return CgroupStatus(False, f"could not enable any controller under {top}", base)
        self.swept = self._sweep(top)
        return CgroupStatus(True, status.reason, base, controllers)

    def _move_out(self, base: Path, leaf: Path) -> None:
        leaf.mkdir(exist_ok=True)
        for _ in range(_MOVE_ROUNDS):
            pids = read_pids(base / "cgroup.procs")
            if not pids:
                return
            for pid in pids:
                try:
                    write(leaf / "cgroup.procs", str(pid))
                except ProcessLookupError:
                    continue  # exited meanwhile
        raise OSError(errno.EBUSY, f"processes keep appearing in {base}")

    def _sweep(self, top: Path) -> int:
        swept = 0
        if not top.is_dir():
            return 0
        for function_dir in (d for d in top.iterdir() if d.is_dir()):
            for worker_dir in (d for d in function_dir.iterdir() if d.is_dir()):
                with contextlib.suppress(CgroupError):
                    WorkerCgroup(worker_dir).remove()
                    swept += 1
            with contextlib.suppress(OSError):
                function_dir.rmdir()
        return swept


def apply_limits(leaf: Path, controllers: frozenset[str], limits: WorkerLimits) -> None:
    """Write the limits the enabled controllers can enforce into a worker's group."""
    if "memory" in controllers and limits.memory_mb:
        write(leaf / "memory.max", str(limits.memory_mb * MB))
        # Swap would let a worker exceed memory.max silently (and slowly); the group shares
        # one OOM fate so a worker never survives with half its processes killed. Both files
        # are optional (no swap accounting; older kernels).
        write_if_present(leaf / "memory.swap.max", "0")
        write_if_present(leaf / "memory.oom.group", "1")
    if "pids" in controllers and limits.processes:
        write(leaf / "pids.max", str(limits.processes))
    if "cpu" in controllers and limits.cpu_cores:
        write(leaf / "cpu.max", f"{cpu_quota_us(limits.cpu_cores)} {CPU_PERIOD_US}")


def _enable(directory: Path, controllers: frozenset[str]) -> None:
    """Enable controllers for children one at a time, so one refusal does not hide the rest."""
    enabled = set(read_words(directory / "cgroup.subtree_control"))
    for controller in sorted(controllers - enabled):
        with contextlib.suppress(OSError):
            write(directory / "cgroup.subtree_control", f"+{controller}")


def _cgroup2_mount(root: Path) -> tuple[Path, str] | None:
    """(mount point under root, root of the mount inside the hierarchy) of the first cgroup2."""
    try:
        lines = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            point = unescape(fields[4])
            return root / point.lstrip("/"), unescape(fields[3])
    return None


def _v1_controllers(root: Path) -> set[str]:
    """Controllers mounted as cgroup v1 hierarchies (they cannot be used by cgroup v2)."""
    found: set[str] = set()
    for line in read_lines(root / "proc/self/mountinfo"):
        _, sep, right = line.partition(" - ")
        parts = right.split()
        if sep and len(parts) >= 3 and parts[0] == "cgroup":
            found.update(parts[2].split(","))
    return found


def _own_cgroup(root: Path) -> str | None:
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:].removesuffix(" (deleted)") or "/"
    return None

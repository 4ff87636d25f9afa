"""cgroup v1 per-worker groups, for hosts where memory, pids and cpu are not on cgroup v2.

Many vehicle and industrial gateways boot with the legacy or hybrid layout: each controller
is its own hierarchy (/sys/fs/cgroup/memory/, /sys/fs/cgroup/pids/, /sys/fs/cgroup/cpu,cpuacct/).
The agent then keeps one subtree per controller, under its own cgroup in that hierarchy (the
"N:memory:/path" lines of /proc/self/cgroup), so the agent's own limits still hold over its
workers and a systemd unit with `Delegate=yes` owns what it creates:

    <memory tree>/<our cgroup>/<prefix>/<function>/<worker>/  memory.limit_in_bytes (+ memsw)
    <pids tree>/<our cgroup>/<prefix>/<function>/<worker>/    pids.max
    <cpu tree>/<our cgroup>/<prefix>/<function>/<worker>/     cpu.cfs_quota_us / cfs_period_us

`<prefix>` names the agent instance (`hardware.isolation.instance_prefix`), so two agents on
one box never touch each other's groups. v1 has no "no internal processes" rule, so nothing
is moved. The flow is the v2 one (`hardware.cgroup`): `setup()` once (sweeps groups a previous
run left), `create()` per worker, `report()` and `remove()` after it exits. All blocking I/O.

Differences from v2 that matter: the v1 OOM killer kills one process of the group, not all
(the sandbox then ends the rest with the worker); there is no `cgroup.kill`, so stragglers are
killed pid by pid; swap is limited only where swap accounting gives `memory.memsw.*`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
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
    unescape,
    write,
    write_if_present,
)
from hardware.errors import CgroupError
from hardware.limits import WorkerLimits

CONTROLLERS: tuple[str, ...] = ("memory", "pids", "cpu")


@dataclass(frozen=True, slots=True)
class WorkerCgroupV1:
    """One worker's directories, one per hierarchy (`dirs`) with the controllers each carries."""

    dirs: tuple[tuple[Path, frozenset[str]], ...]
    version: int = 1

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset().union(*(names for _, names in self.dirs))

    def _dir(self, controller: str) -> Path | None:
        return next((d for d, names in self.dirs if controller in names), None)

    def join_argv(self) -> list[str]:
        return join_argv([d / "cgroup.procs" for d, _ in self.dirs])

    def add_pid(self, pid: int) -> None:
        """Move a running process in; children it forked before the move stay outside."""
        for directory, _ in self.dirs:
            try:
                write(directory / "cgroup.procs", str(pid))
            except OSError as exc:
                raise CgroupError(f"cannot move pid {pid} into {directory}: {exc}") from exc

    def pids(self) -> list[int]:
        found: set[int] = set()
        for directory, _ in self.dirs:
            found.update(read_pids(directory / "cgroup.procs"))
        return sorted(found)

    def report(self) -> CgroupReport:
        memory, pids = self._dir("memory"), self._dir("pids")
        return CgroupReport(
            # "oom_kill N" since Linux 4.13; older kernels only say under_oom.
            oom_kills=read_keyed(memory / "memory.oom_control").get("oom_kill", 0) if memory else 0,
            pids_limit_hits=read_keyed(pids / "pids.events").get("max", 0) if pids else 0,
        )

    def kill(self) -> None:
        """SIGKILL every process in the group once (v1 has no cgroup.kill)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = REMOVE_TIMEOUT_S) -> None:
        """Kill what is left, again until the group is empty, and delete every directory."""
        deadline = time.monotonic() + timeout
        for directory, _ in self.dirs:
            while directory.exists():
                self.kill()
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(
                            f"cannot remove {directory}: {exc} (pids left: {self.pids()})"
                        ) from exc
                    time.sleep(POLL_S)


@dataclass(frozen=True, slots=True)
class _Hierarchy:
    base: Path  # our own cgroup's directory in this hierarchy
    controllers: frozenset[str]  # the wanted controllers mounted here


class CgroupV1Manager:
    """Owns `<our cgroup>/<prefix>/` in each v1 hierarchy that carries a wanted controller."""

    def __init__(
        self,
        *,
        root: Path = Path("/"),
        prefix: str = "edgefn",
        want: tuple[str, ...] = CONTROLLERS,
    ) -> None:
        """`root` relocates /proc and /sys for tests."""
        self.root = root
        self.prefix = check_name(prefix)
        self.want = want
        self.status = CgroupStatus(False, "not set up yet", version=1)
        self.swap_limited = False
        self.swept = 0  # worker groups of a previous run that setup() removed
        self._hierarchies: tuple[_Hierarchy, ...] = ()

    def probe(self) -> tuple[CgroupStatus, tuple[_Hierarchy, ...]]:
        """Read-only: which wanted controllers have a v1 hierarchy we may write in."""
        mounts = _v1_mounts(self.root)
        own = _own_v1_cgroups(self.root)
        found: list[_Hierarchy] = []
        problems: list[str] = []
        for names, (point, mount_root) in mounts.items():
            wanted = frozenset(c for c in self.want if c in names)
            if not wanted:
                continue
            label = ",".join(sorted(names))
            path = own.get(names)
            if path is None:
                problems.append(f"{label}: /proc/self/cgroup has no entry")
                continue
            try:
                base = point / Path(path).relative_to(mount_root)
            except ValueError:
                problems.append(f"{label}: our cgroup {path} is outside the mount root")
                continue
            if not os.access(base, os.W_OK):
                problems.append(f"{label}: {base} is not writable (systemd: Delegate=yes)")
                continue
            found.append(_Hierarchy(base, wanted))
        controllers = frozenset().union(*(h.controllers for h in found))
        missing = [c for c in self.want if c not in controllers]
        note = f"; not usable: {', '.join(missing)}" if missing else ""
        if problems:
            note += f" ({'; '.join(problems)})"
        if not found:
            why = "no cgroup v1 hierarchy carries " + ", ".join(self.want)
            return CgroupStatus(False, why + note, version=1), ()
        found.sort(key=lambda h: "memory" not in h.controllers)  # base: the memory tree
        where = ", ".join(f"{','.join(sorted(h.controllers))} at {h.base}" for h in found)
        status = CgroupStatus(True, f"cgroup v1: {where}{note}", found[0].base, controllers, 1)
        return status, tuple(found)

    def setup(self) -> CgroupStatus:
        """Probe, check we can create our subtree in each hierarchy, sweep a previous run's."""
        if self.status.available:
            return self.status
        status, hierarchies = self.probe()
        if status.available:
            try:
                for h in hierarchies:
                    (h.base / self.prefix).mkdir(exist_ok=True)
            except OSError as exc:
                status = CgroupStatus(False, f"cannot prepare {exc.filename}: {exc}", version=1)
                hierarchies = ()
        self._hierarchies = hierarchies
        memory = next((h for h in hierarchies if "memory" in h.controllers), None)
        self.swap_limited = (
            memory is not None and (memory.base / "memory.memsw.limit_in_bytes").exists()
        )
        self.status = status
        self.swept = self.sweep()
        # The subtree exists only while workers do (create() makes it): an agent that stops
        # or fails to start before running a worker leaves nothing in the hierarchies.
        self._remove_empty_prefix()
        return status

    def create(self, function: str, worker_id: str, limits: WorkerLimits) -> WorkerCgroupV1 | None:
        """Fresh groups with the limits for one worker, or None when cgroups are unavailable."""
        if not self.status.available:
            return None
        check_name(function)
        check_name(worker_id)
        dirs = tuple(
            (h.base / self.prefix / function / worker_id, h.controllers) for h in self._hierarchies
        )
        group = WorkerCgroupV1(dirs)
        if any(d.exists() for d, _ in dirs):  # a worker id reused after a crash: start clean
            group.remove()
        try:
            for directory, names in dirs:
                directory.mkdir(parents=True)
                apply_limits_v1(directory, names, limits)
        except OSError as exc:
            with contextlib.suppress(OSError, CgroupError):
                group.remove()
            raise CgroupError(f"cannot create the cgroup of {function}/{worker_id}: {exc}") from exc
        return group

    def remove_function(self, function: str) -> None:
        """Remove a function's (empty) directories once its pool is gone; busy is not an error."""
        check_name(function)
        for h in self._hierarchies:
            with contextlib.suppress(FileNotFoundError):
                try:
                    (h.base / self.prefix / function).rmdir()
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise CgroupError(f"cannot remove cgroup {function}: {exc}") from exc

    def sweep(self) -> int:
        """Kill and remove worker groups left by a previous run; returns how many workers."""
        leaves: dict[tuple[str, str], list[tuple[Path, frozenset[str]]]] = {}
        for h in self._hierarchies:
            top = h.base / self.prefix
            for function_dir in _subdirs(top):
                for worker_dir in _subdirs(function_dir):
                    key = (function_dir.name, worker_dir.name)
                    leaves.setdefault(key, []).append((worker_dir, h.controllers))
        swept = 0
        for dirs in leaves.values():
            with contextlib.suppress(CgroupError):
                WorkerCgroupV1(tuple(dirs)).remove()
                swept += 1
        for h in self._hierarchies:
            for function_dir in _subdirs(h.base / self.prefix):
                with contextlib.suppress(OSError):
                    function_dir.rmdir()
        return swept

    def close(self) -> None:
        """Remove our (empty) subtree at agent exit; groups still busy stay for the next sweep."""
        self.sweep()
        self._remove_empty_prefix()

    def _remove_empty_prefix(self) -> None:
        for h in self._hierarchies:
            with contextlib.suppress(OSError):  # busy: groups a sweep could not remove
                (h.base / self.prefix).rmdir()


def apply_limits_v1(leaf: Path, controllers: frozenset[str], limits: WorkerLimits) -> None:
    """Write the limits the controllers of this hierarchy can enforce into a worker's group."""
    if "memory" in controllers and limits.memory_mb:
        size = str(limits.memory_mb * MB)
        # memsw (memory + swap) must be >= the memory limit, so the memory limit goes first;
        # equal values mean "no swap": a worker cannot dodge its limit by being swapped out.
        write(leaf / "memory.limit_in_bytes", size)
        write_if_present(leaf / "memory.memsw.limit_in_bytes", size)
    if "pids" in controllers and limits.processes:
        write(leaf / "pids.max", str(limits.processes))
    if "cpu" in controllers and limits.cpu_cores:
        write(leaf / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        write(leaf / "cpu.cfs_quota_us", str(cpu_quota_us(limits.cpu_cores)))


def _v1_mounts(root: Path) -> dict[frozenset[str], tuple[Path, str]]:
    """Controllers -> (mount point under root, mount root) of each cgroup v1 hierarchy.

    The first mount of a hierarchy wins (bind mounts of it may follow).
    """
    found: dict[frozenset[str], tuple[Path, str]] = {}
    for line in read_lines(root / "proc/self/mountinfo"):
        left, sep, right = line.partition(" - ")
        fields, parts = left.split(), right.split()
        if not sep or len(fields) < 5 or len(parts) < 3 or parts[0] != "cgroup":
            continue
        names = frozenset(o for o in parts[2].split(",") if o in CONTROLLERS or o == "cpuacct")
        if names:
            point = root / unescape(fields[4]).lstrip("/")
            found.setdefault(names, (point, unescape(fields[3])))
    return found


def _own_v1_cgroups(root: Path) -> dict[frozenset[str], str]:
    """Our cgroup path per v1 hierarchy, keyed by the hierarchy's controller set."""
    own: dict[frozenset[str], str] = {}
    for line in read_lines(root / "proc/self/cgroup"):
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            continue  # "0::/path" is cgroup v2
        names = frozenset(o for o in parts[1].split(",") if o in CONTROLLERS or o == "cpuacct")
        if names:
            own[names] = parts[2].removesuffix(" (deleted)") or "/"
    return own


def _subdirs(directory: Path) -> list[Path]:
    try:
        return [d for d in directory.iterdir() if d.is_dir()]
    except OSError:
        return []

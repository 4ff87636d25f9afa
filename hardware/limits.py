"""Per-worker limits, applied by wrapping the worker's command line (never `preexec_fn`).

Flow: the pool turns a manifest's `[limits]` into `WorkerLimits`, optionally gets a per-worker
cgroup (v2 `hardware.cgroup` or v1 `hardware.cgroup_v1`, picked by `hardware.isolation`),
resolves the unprivileged user once with `resolve_worker_user()` and spawns
`wrap_command(argv, limits, run_as=..., cgroup=..., pid_namespace=...)`:

    [/bin/sh -c 'echo $$ > cgroup.procs && exec "$@"']     join the worker's cgroup (optional)
    [setsid]                                                own process group (no namespace)
    setpriv --pdeathsig KILL [--reuid U --regid G --clear-groups] --no-new-privs --
    /bin/sh -c '[ "$PPID" = AGENT_PID ] || exit 70; exec "$@"'  parent still there? (see below)
    prlimit --core=0 [--cpu=N:N+1] [--nofile=N] [--nproc=N] [--as=BYTES] --
    [unshare --pid --fork --kill-child --                  a PID namespace per worker (optional)
     /bin/sh -c '"$@"; exit $?'                             its pid 1, the worker its child
     setpriv --reuid U --regid G --clear-groups --no-new-privs --]
    <worker argv>

Each step `exec`s the next, so the worker keeps the pid the pool spawned and its exit status --
except with a PID namespace: `unshare --fork` stays as the spawned pid (a ~1 MB shim that only
waits and passes the exit status on), a shell is pid 1 of the namespace and the worker its
child. When pid 1 of a namespace dies, the kernel kills every process in it, detached or not;
pid 1 dies with the shim (--kill-child) and the shim with the agent (parent-death signal).
The user switch happens inside the namespace, as creating one needs root's CAP_SYS_ADMIN.
The parent check closes the race of every parent-death signal: an agent that dies between the
fork and setpriv's prctl() sends no signal, so the first program after setpriv makes sure its
parent is still the agent, and exits (70) if it was orphaned in that window.
`preexec_fn` is not used because it runs Python between fork and exec, which can deadlock when the
agent has threads (https://docs.python.org/3/library/subprocess.html#subprocess.Popen).

Which limit goes where (docs/hardware.md has the table per host kind):
- memory_mb: cgroup `memory.max` (v2) or `memory.limit_in_bytes` + memsw (v1). It is never
  turned into RLIMIT_AS implicitly: Go and Node reserve gigabytes of address space they never
  touch and fail at start under RLIMIT_AS. Without a cgroup the sandbox samples RSS.
- address_space_mb: RLIMIT_AS, only when asked (native workers without a cgroup).
- processes: cgroup `pids.max`; RLIMIT_NPROC only with a dedicated user, as it counts every
  process and thread of the real uid, and root ignores it.
- cpu_seconds: RLIMIT_CPU (lifetime CPU of the worker: SIGXCPU, then SIGKILL a second later).
- open_files: RLIMIT_NOFILE. cpu_cores: cgroup `cpu.max` / `cpu.cfs_quota_us` (a throttle).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hardware.errors import HardwareError, LimitToolMissing, WorkerUserError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hardware.cgroupfs import WorkerGroup

DEFAULT_WORKER_USER = "edgefn-worker"
FALLBACK_WORKER_USER = "nobody"

# Service managers start us with a short PATH; util-linux lives in one of these everywhere.
_TOOL_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin")
_INSTALL_HINT = (
    "install util-linux (Debian/Ubuntu: util-linux; Alpine: setpriv and util-linux-misc; "
    "BusyBox has neither)"
)
_MB = 1024 * 1024
# $0 is the agent's pid. Exit status 70 (EX_SOFTWARE): nobody is left to read it anyway.
_PARENT_CHECK = (
    '[ "$PPID" = "$0" ] || { echo "edgefn: agent gone before worker start" >&2; exit 70; }; '
    'exec "$@"'
)

# pid 1 of a worker's PID namespace: a shell that runs the worker as its child and passes its
# exit status on. Not the worker itself, because the kernel drops signals that pid 1 has no
# handler for when they come from inside the namespace (its own abort(), RLIMIT_CPU's SIGXCPU),
# and because the shell reaps the orphans a function leaves, which a worker would not. The
# signal is named on stderr because the shim (util-linux 2.38 `unshare`) cannot re-raise a
# SIGKILL and would only say "exited with status 1".
_NS_INIT = (
    '"$@"; s=$?; [ "$s" -gt 128 ] && '
    'echo "edgefn: the worker was killed by SIG$(kill -l $((s - 128)))" >&2; exit "$s"'
)

# Processes a PID namespace adds to every worker's group (the unshare shim and the init shell):
# a pids.max must allow them on top of the function's own `processes`.
PID_NAMESPACE_PROCESSES = 2


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """Limits for one worker process; 0 means "not set".

    The first four mirror a manifest's `[limits]` table (`WorkerLimits(**asdict(m.limits))`).
    """

    memory_mb: int = 0  # cgroup memory.max (+ swap 0); needs a cgroup, see with_address_space()
    cpu_seconds: int = 0  # RLIMIT_CPU over the worker's lifetime
    open_files: int = 0  # RLIMIT_NOFILE
    processes: int = 0  # cgroup pids.max, else RLIMIT_NPROC with a dedicated user
    address_space_mb: int = 0  # RLIMIT_AS: explicit only (breaks Go and Node)
    cpu_cores: float = 0.0  # cgroup cpu.max bandwidth, e.g. 0.5 = half a core

    def __post_init__(self) -> None:
        for name in ("memory_mb", "cpu_seconds", "open_files", "processes", "address_space_mb"):
            if getattr(self, name) < 0:
                raise HardwareError(f"limits: {name} must be >= 0", code="bad_limits")
        if self.cpu_cores < 0:
            raise HardwareError("limits: cpu_cores must be >= 0", code="bad_limits")

    def with_address_space(self) -> WorkerLimits:
        """A copy that also caps address space at `memory_mb`: the no-cgroup fallback.

        Only for native (C/C++) workers that do not reserve large virtual ranges: each glibc
        malloc arena reserves 64 MB of address space and each thread stack 8 MB, so even a
        multi-threaded C++ worker needs generous headroom. Never for Go or Node workers.
        """
        if self.address_space_mb or not self.memory_mb:
            return self
        return WorkerLimits(
            memory_mb=self.memory_mb,
            cpu_seconds=self.cpu_seconds,
            open_files=self.open_files,
            processes=self.processes,
            address_space_mb=self.memory_mb,
            cpu_cores=self.cpu_cores,
        )


_found_tools: dict[str, str] = {}


def find_tool(name: str) -> str:
    """Absolute path of `setpriv` or `prlimit`, looked up once (successes are cached)."""
    path = _found_tools.get(name)
    if path is None:
        search = os.pathsep.join([os.environ.get("PATH", ""), *_TOOL_DIRS])
        found = shutil.which(name, path=search)
        if found is None:
            raise LimitToolMissing(
                f"'{name}' was not found (searched PATH and {', '.join(_TOOL_DIRS)}): it is "
                f"needed to start workers with limits; {_INSTALL_HINT}"
            )
        path = _found_tools[name] = os.path.abspath(found)
    return path


def preflight() -> list[str]:
    """Problems that would stop `wrap_command` from working; [] when all is well.

    Blocking (runs `setpriv --help`): call once at agent start, via `asyncio.to_thread`.
    `--pdeathsig` needs util-linux 2.33 or later.
    """
    problems: list[str] = []
    for name in ("setpriv", "prlimit"):
        try:
            find_tool(name)
        except LimitToolMissing as exc:
            problems.append(exc.message)
    if not problems:
        try:
            done = subprocess.run(
                [find_tool("setpriv"), "--help"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if "--pdeathsig" not in done.stdout:
                problems.append(
                    "setpriv has no --pdeathsig option (util-linux < 2.33): workers would "
                    f"outlive a crashed agent; {_INSTALL_HINT}"
                )
        except (OSError, subprocess.SubprocessError) as exc:
            problems.append(f"setpriv does not run: {exc}")
    return problems


def wrap_command(
    argv: Sequence[str],
    limits: WorkerLimits,
    *,
    run_as: tuple[int, int] | None = None,
    pdeathsig: bool = True,
    cgroup: WorkerGroup | None = None,
    parent_pid: int | None = None,
    pid_namespace: bool = False,
    new_session: bool = False,
) -> list[str]:
    """`argv` prefixed so the worker starts inside its limits (see the module docstring).

    `run_as` is (uid, gid) from `resolve_worker_user()`. `pdeathsig` kills the worker when the
    thread that spawned it exits: spawn workers from the event loop thread, never from a
    short-lived executor thread; the spawning process must be `parent_pid` (default: this
    one). `cgroup` makes the worker join its cgroup before anything else runs, so even its first
    child is accounted for; limits that cgroup enforces are not repeated as rlimits.
    `pid_namespace` (root only, see `hardware.isolation.probe_pid_namespace`) runs the worker
    as pid 1 of a new PID namespace so its whole process tree dies with it. `new_session` puts
    the worker in its own session and process group, so the group can be killed with it (the
    fallback without a namespace); the spawner must not make it a group leader itself.
    Pure: no I/O beyond finding the tools once.
    """
    if not argv:
        raise HardwareError("wrap_command: empty argv", code="bad_command")
    in_cgroup = set() if cgroup is None else cgroup.controllers

    rlimits = ["--core=0"]  # no core files of crashing workers in the function dir
    if limits.cpu_seconds:
        # Soft then hard: SIGXCPU first (a runtime may log it), SIGKILL one second later.
        rlimits.append(f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}")
    if limits.open_files:
        rlimits.append(f"--nofile={limits.open_files}:{limits.open_files}")
    if limits.processes and run_as is not None and "pids" not in in_cgroup:
        rlimits.append(f"--nproc={limits.processes}:{limits.processes}")
    if limits.address_space_mb:
        size = limits.address_space_mb * _MB
        rlimits.append(f"--as={size}:{size}")

    user: list[str] = []
    if run_as is not None:
        uid, gid = run_as
        user = ["--reuid", str(uid), "--regid", str(gid), "--clear-groups"]
    setpriv: list[str] = []
    if pdeathsig:
        setpriv += ["--pdeathsig", "KILL"]
    if not pid_namespace:
        setpriv += user

    wrapped: list[str] = []
    if cgroup is not None:
        wrapped += cgroup.join_argv()
    if new_session and not pid_namespace:
        wrapped.append(find_tool("setsid"))
    if setpriv:
        # no-new-privs: a worker cannot regain privileges through setuid binaries.
        wrapped += [find_tool("setpriv"), *setpriv, "--no-new-privs", "--"]
    if pdeathsig:
        expected = str(os.getpid() if parent_pid is None else parent_pid)
        wrapped += ["/bin/sh", "-c", _PARENT_CHECK, expected]
    wrapped += [find_tool("prlimit"), *rlimits, "--"]
    if pid_namespace:
        # --kill-child: the namespace's init (and so the namespace) dies with the shim.
        wrapped += [find_tool("unshare"), "--pid", "--fork", "--kill-child", "--"]
        wrapped += ["/bin/sh", "-c", _NS_INIT, "edgefn-init"]
        if user:
            wrapped += [find_tool("setpriv"), *user, "--no-new-privs", "--"]
    return wrapped + list(argv)


_CGROUP_FILES = {
    2: {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.max"},
    1: {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.cfs_quota_us"},
}


def mechanisms(
    *,
    run_as: tuple[int, int] | None = None,
    controllers: frozenset[str] = frozenset(),
    version: int = 2,
    as_root: bool | None = None,
    address_space: bool = False,
    swap_limited: bool = True,
) -> dict[str, str]:
    """How each kind of limit is enforced for workers started this way, in plain words.

    Values start with "cgroup v1/v2 ...", "rlimit ...", "sampling ..." or "not enforced: <why>".
    `as_root` defaults to whether this process is root (it decides why processes are unlimited);
    `swap_limited` is False on a v1 host without swap accounting.
    """
    files = _CGROUP_FILES.get(version, _CGROUP_FILES[2])
    root = os.geteuid() == 0 if as_root is None else as_root

    def cgroup(controller: str) -> str:
        extra = ""
        if version == 1 and controller == "memory":
            extra = (
                " (+ memsw, so swap does not dodge it)"
                if swap_limited
                else " (swap not limited: no swap accounting, memory.memsw.* is missing)"
            )
        return f"cgroup v{version} {files[controller]}{extra}"

    how: dict[str, str] = {}
    how["memory_mb"] = (
        cgroup("memory")
        if "memory" in controllers
        else "rlimit RLIMIT_AS (address space)"
        if address_space
        else "sampling only: no cgroup memory controller; RSS is read every second and a "
        "worker above its limit is killed (a fast allocator overshoots meanwhile)"
    )
    how["cpu_seconds"] = "rlimit RLIMIT_CPU"
    how["open_files"] = "rlimit RLIMIT_NOFILE"
    if "pids" in controllers:
        how["processes"] = cgroup("pids")
    elif run_as is not None:
        how["processes"] = "rlimit RLIMIT_NPROC (per user: all workers of this user share it)"
    elif root:
        how["processes"] = (
            "not enforced: the agent runs as root, RLIMIT_NPROC does not apply to root, no "
            "dedicated worker user exists (create edgefn-worker) and no cgroup pids controller"
        )
    else:
        how["processes"] = (
            "not enforced: no cgroup pids controller, and RLIMIT_NPROC would count the "
            "agent's own processes (workers run as the agent's user)"
        )
    how["cpu_cores"] = (
        cgroup("cpu") if "cpu" in controllers else "not enforced: no cgroup cpu controller"
    )
    return how


def enforcement(
    limits: WorkerLimits,
    *,
    run_as: tuple[int, int] | None = None,
    cgroup: WorkerGroup | None = None,
) -> dict[str, str]:
    """How `wrap_command` with these arguments enforces each limit that is set.

    Values as in `mechanisms()`; the sandbox logs them once per function so an operator knows
    a manifest limit is only advisory on this box.
    """
    how = mechanisms(
        run_as=run_as,
        controllers=frozenset() if cgroup is None else cgroup.controllers,
        version=2 if cgroup is None else cgroup.version,
        address_space=bool(limits.address_space_mb),
    )
    if limits.address_space_mb:
        how["address_space_mb"] = "rlimit RLIMIT_AS"
    return {name: text for name, text in how.items() if getattr(limits, name)}


def resolve_worker_user(
    user: str | None = None, group: str | None = None
) -> tuple[int, int] | None:
    """(uid, gid) workers should run as, or None to run them as ourselves.

    Only root switches users (anyone else cannot). With no `user` configured, "edgefn-worker" is
    used if it exists, else "nobody"; a configured user or group that does not exist is an error
    (silently running functions as root would be worse). `user="root"` keeps workers as root.
    The worker user must be able to read the function directories.
    """
    if os.geteuid() != 0:
        return None
    names = [user] if user else [DEFAULT_WORKER_USER, FALLBACK_WORKER_USER]
    entry = None
    for name in names:
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
            break
        except KeyError:
            continue
    if entry is None:
        raise WorkerUserError(
            f"worker user {' or '.join(repr(n) for n in names)} does not exist; create it "
            f"(e.g. useradd --system --no-create-home {DEFAULT_WORKER_USER}) or configure another"
        )
    if entry.pw_uid == 0:
        return None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise WorkerUserError(f"worker group {group!r} does not exist") from None
    return entry.pw_uid, gid

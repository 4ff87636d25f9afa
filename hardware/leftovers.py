"""Workers that outlived the agent run that started them: recorded, then ended at next start.

A PID namespace or a cgroup normally takes a worker's whole tree with it. Where neither
applies (or the agent was SIGKILLed and a cgroup's members are waiting for the next sweep),
the agent records each worker's pid with the process's start time and the boot id in
`<data dir>/run/workers/<pid>`, and deletes the record when the worker is gone. At start,
`WorkerRecords.sweep()` ends what the records prove to be ours:

- the recorded pid, if a process with that pid and exactly that start time (same boot) lives;
- every process whose process group is the recorded pid (workers lead their own group in the
  fallback): the kernel does not reuse a pid while a group of that id exists, so such
  processes are the worker's children, unless the pid now belongs to another process -- which
  proves our group is gone, and then nothing is killed.

Nothing else is touched: a pid with another start time is someone else's. Blocking file I/O.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return raw.rsplit(")", 1)[1].split()


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


class WorkerRecords:
    """One small file per live worker; `sweep()` at start ends what a crashed run left."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._boot = _boot_id()

    def add(self, pid: int) -> None:
        """Record a worker right after it started (it is our unreaped child: pid not reused)."""
        started = start_time(pid)
        if started is None:
            return
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / str(pid)).write_text(f"{self._boot} {started}\n")

    def remove(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            (self.directory / str(pid)).unlink()

    def sweep(self) -> int:
        """Kill processes the records prove to be left by a previous run; returns how many."""
        try:
            records = [p for p in self.directory.iterdir() if p.name.isdigit()]
        except OSError:
            return 0
        killed = 0
        groups: dict[int, int | None] = {}  # recorded pid -> its start time, or None if unknown
        for record in records:
            pid = int(record.name)
            try:
                boot, _, started = record.read_text().strip().partition(" ")
            except OSError:
                continue
            with contextlib.suppress(OSError):
                record.unlink()
            if boot != self._boot or not started.isdigit():
                continue  # another boot: every process of that run is gone
            current = start_time(pid)
            if current is None:
                groups[pid] = None  # leader gone; its group can still have members
            elif current == int(started):
                groups[pid] = current
                killed += _kill(pid)
            # else: the pid was reused, so the kernel let go of our group: nothing of ours left
        if groups:
            killed += self._kill_groups(groups)
        return killed

    def _kill_groups(self, groups: dict[int, int | None]) -> int:
        killed = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            fields = _stat(int(entry))
            if fields is None or fields[0] == "Z":
                continue
            pgid = int(fields[2])
            if pgid in groups and int(entry) != pgid:
                killed += _kill(int(entry))
        return killed


def _kill(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return 0
    return 1

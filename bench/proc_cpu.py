"""CPU seconds of process trees, for benchmarks that run several servers (bench/platform_scale.py).

psutil over the root pids and their descendants, so backends that come and go (PostgreSQL's)
are counted from zero when they appear after `start()`.
"""

from __future__ import annotations

import psutil


def _cpu_of(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class CpuMeter:
    """CPU seconds of named process groups between `start()` and `stop()`. A group is a list of
    root pids and their descendants (PostgreSQL's backends come and go: each is counted from
    zero when it appears after `start()`)."""

    def __init__(self, groups: dict[str, list[int]], *, alone: tuple[str, ...] = ()) -> None:
        self.groups = groups
        self.alone = alone  # groups counted without their descendants (the bench's own process)
        self._t0: dict[int, float] = {}

    def _procs(self, name: str, pid: int) -> list[psutil.Process]:
        if name not in self.alone:
            return _tree(pid)
        try:
            return [psutil.Process(pid)]
        except psutil.Error:
            return []

    def _snapshot(self) -> dict[str, dict[int, float]]:
        return {
            name: {p.pid: _cpu_of(p) for pid in pids for p in self._procs(name, pid)}
            for name, pids in self.groups.items()
        }

    def start(self) -> None:
        self._t0 = {pid: c for snap in self._snapshot().values() for pid, c in snap.items()}

    def stop(self) -> dict[str, float]:
        out = {}
        for name, snap in self._snapshot().items():
            out[name] = round(sum(c - self._t0.get(pid, 0.0) for pid, c in snap.items()), 2)
        return out

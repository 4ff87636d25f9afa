"""What workers and the device are using right now, for metrics and scaling decisions.

Flow: a pool (or the agent's metrics loop) keeps one `UsageSampler` and periodically calls
`await asyncio.to_thread(sampler.sample, pids)`; it gets RSS and CPU percent per worker, with the
worker's own children folded in. `system_usage()` gives the device-wide figures. `over_memory()`
is the watchdog test for workers whose memory limit the kernel cannot enforce (no cgroup).

Everything here is synchronous and reads /proc through psutil: never call it on the event loop.
A sampler is not thread-safe: one sampling call at a time (awaiting each `to_thread` call is
enough).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped]  # no stubs in the venv: types-psutil

_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    pid: int
    rss_mb: float  # the worker plus its descendants
    cpu_percent: float  # since the previous sample; 100 = one core busy (can exceed 100)
    threads: int
    children: int


@dataclass(frozen=True, slots=True)
class SystemUsage:
    cpu_percent: float  # whole device, 0-100, since the previous call
    memory_total_mb: int
    memory_available_mb: int
    load_1m: float


class UsageSampler:
    """Keeps a psutil.Process per pid so CPU percent is measured between successive samples.

    The first sample of a process reports 0.0 CPU (there is no previous one). A pid reused by a
    new process is detected by its start time and measured afresh.
    """

    def __init__(self, *, include_children: bool = True) -> None:
        self.include_children = include_children
        self._known: dict[int, psutil.Process] = {}

    def sample(self, pids: Iterable[int]) -> dict[int, ProcessUsage]:
        """Usage of each pid that still exists (gone or inaccessible pids are left out)."""
        seen: set[int] = set()
        result: dict[int, ProcessUsage] = {}
        for pid in pids:
            usage = self._sample_one(pid, seen)
            if usage is not None:
                result[pid] = usage
        for stale in set(self._known) - seen:
            del self._known[stale]
        return result

    def forget(self, pid: int) -> None:
        self._known.pop(pid, None)

    def _process(self, pid: int, seen: set[int]) -> psutil.Process:
        seen.add(pid)
        proc = self._known.get(pid)
        if proc is None or not proc.is_running():  # is_running() also catches pid reuse
            proc = self._known[pid] = psutil.Process(pid)
            proc.cpu_percent(None)  # start the measurement interval
        return proc

    def _sample_one(self, pid: int, seen: set[int]) -> ProcessUsage | None:
        try:
            proc = self._process(pid, seen)
            with proc.oneshot():
                rss = proc.memory_info().rss
                cpu = proc.cpu_percent(None)
                threads = proc.num_threads()
                children = proc.children(recursive=True) if self.include_children else []
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        for child in children:
            try:
                known = self._process(child.pid, seen)
                rss += known.memory_info().rss
                cpu += known.cpu_percent(None)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return ProcessUsage(pid, rss / _MB, cpu, threads, len(children))


def system_usage() -> SystemUsage:
    """Device-wide CPU (since the previous call; 0.0 on the first), memory and load."""
    vm = psutil.virtual_memory()
    return SystemUsage(
        cpu_percent=float(psutil.cpu_percent(None)),
        memory_total_mb=int(vm.total // _MB),
        memory_available_mb=int(vm.available // _MB),
        load_1m=float(psutil.getloadavg()[0]),
    )


def over_memory(usage: ProcessUsage, memory_mb: int) -> bool:
    """True when a worker's resident memory exceeds its limit (0 = no limit).

    The fallback when no cgroup enforces memory: sampling is coarse, so a worker that allocates
    fast can overshoot between samples; the pool then stops it and reports "killed for memory".
    """
    return memory_mb > 0 and usage.rss_mb > memory_mb

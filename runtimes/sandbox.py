"""What every worker is started inside: parent-death signal, limits, user, cgroup, budget.

One `Sandbox` per agent. For each worker the pool asks `prepare()` (budget lease + wrapped
command + cgroup), spawns the command, hands the worker to `attach()` (memory watchdog and CPU
sampling), and calls `finished()` when it exits (lease released, cgroup read and removed; the
returned reason -- "killed for exceeding its memory limit" -- becomes the worker's exit reason).

Memory limits are enforced by the kernel when a cgroup with the memory controller is available;
otherwise the watchdog samples RSS every `WATCHDOG_INTERVAL_S` and kills a worker over its limit.
CPU time, open files and processes are rlimits (see `hardware.limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hardware.budget import Lease, WorkerBudget
from hardware.cgroup import CgroupManager, WorkerCgroup
from hardware.errors import HardwareError
from hardware.limits import WorkerLimits, enforcement, wrap_command
from hardware.usage import ProcessUsage, UsageSampler
from runtimes.errors import Overloaded, Unavailable
from runtimes.manifest import Manifest

if TYPE_CHECKING:
    from runtimes.worker import Worker

log = logging.getLogger("edgefn.sandbox")

# RSS sampling period: a worker can overshoot its memory limit for at most about this long
# (plus the allocation rate) when no cgroup enforces it. One /proc read per worker per second
# is negligible next to serving requests.
WATCHDOG_INTERVAL_S = 1.0

_ids = itertools.count(1)


@dataclass(slots=True)
class Prepared:
    argv: list[str]
    limits: WorkerLimits
    lease: Lease | None
    cgroup: WorkerCgroup | None
    function: str


def limits_of(manifest: Manifest) -> WorkerLimits:
    lim = manifest.limits
    return WorkerLimits(
        memory_mb=lim.memory_mb,
        cpu_seconds=lim.cpu_seconds,
        open_files=lim.open_files,
        processes=lim.processes,
    )


class Sandbox:
    def __init__(
        self,
        *,
        budget: WorkerBudget | None = None,
        run_as: tuple[int, int] | None = None,
        cgroups: CgroupManager | None = None,
    ) -> None:
        self.budget = budget
        self.run_as = run_as
        self.cgroups = cgroups
        self.usage: dict[int, ProcessUsage] = {}
        self._sampler = UsageSampler()
        self._workers: dict[int, tuple[Worker, Prepared]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self.memory_kills = 0

    def prepare(self, manifest: Manifest, argv: list[str]) -> Prepared:
        limits = limits_of(manifest)
        lease = None
        if self.budget is not None:
            lease = self.budget.admit(limits.memory_mb)
            if lease is None:
                why = self.budget.refusal(limits.memory_mb) or "worker budget exhausted"
                raise Overloaded(f"{manifest.name}: cannot start another worker: {why}")
        cgroup = None
        try:
            if self.cgroups is not None:
                cgroup = self.cgroups.create(manifest.name, f"w{next(_ids)}", limits)
            wrapped = wrap_command(argv, limits, run_as=self.run_as, cgroup=cgroup)
        except HardwareError as exc:
            if lease is not None:
                lease.release()
            raise Unavailable(f"{manifest.name}: cannot sandbox the worker: {exc.message}") from exc
        self._note_enforcement(manifest.name, limits, cgroup)
        return Prepared(wrapped, limits, lease, cgroup, manifest.name)

    def _note_enforcement(
        self, name: str, limits: WorkerLimits, cgroup: WorkerCgroup | None
    ) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        for limit, how in enforcement(limits, run_as=self.run_as, cgroup=cgroup).items():
            log.info("%s: %s enforced by %s", name, limit, how)

    def attach(self, prepared: Prepared, worker: Worker) -> None:
        self._workers[worker.pid] = (worker, prepared)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name="worker watchdog")

    def finished(self, prepared: Prepared, worker: Worker | None) -> str | None:
        """Release what the worker held; return why the kernel or we killed it, if we know."""
        reason = None
        if worker is not None:
            self._workers.pop(worker.pid, None)
            self.usage.pop(worker.pid, None)
        if prepared.lease is not None:
            prepared.lease.release()
        if prepared.cgroup is not None:
            with contextlib.suppress(HardwareError, OSError):
                reason = prepared.cgroup.report().reason
            with contextlib.suppress(HardwareError, OSError):
                prepared.cgroup.remove()
        return reason

    def cpu_percent(self, pid: int) -> float:
        usage = self.usage.get(pid)
        return usage.cpu_percent if usage is not None else 0.0

    async def _watch(self) -> None:
        while self._workers:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            pids = list(self._workers)
            try:
                self.usage = await asyncio.to_thread(self._sampler.sample, pids)
            except Exception:  # psutil on a vanishing process: skip this round
                log.debug("usage sampling failed", exc_info=True)
                continue
            for pid, usage in self.usage.items():
                entry = self._workers.get(pid)
                if entry is None:
                    continue
                worker, prepared = entry
                limit = prepared.limits.memory_mb
                kernel_enforced = prepared.cgroup is not None and "memory" in (
                    prepared.cgroup.controllers
                )
                if limit and not kernel_enforced and usage.rss_mb > limit:
                    self.memory_kills += 1
                    worker.kill(f"exceeded its memory limit ({usage.rss_mb:.0f} MB > {limit} MB)")

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "worker_user": self.run_as,
            "cgroups": self.cgroups.status.describe() if self.cgroups else "off",
            "memory_kills": self.memory_kills,
        }
        if self.budget is not None:
            snap = self.budget.snapshot()
            out["budget"] = {
                "memory_mb": snap.memory_mb,
                "memory_used_mb": snap.memory_used_mb,
                "max_workers": snap.max_workers,
                "workers": snap.workers,
            }
        return out

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

"""What every worker is started inside: parent-death signal, limits, user, cgroup, budget.

One `Sandbox` per agent, built by `host_sandbox()` at start (it also ends what a crashed
previous run left and logs, once, how this host enforces each limit). For each worker the pool
asks `prepare()` (budget lease + wrapped command + cgroup), spawns the command, hands the
worker to `attach()` (recorded for the leftover sweep; memory watchdog and CPU sampling), and
calls `finished()` when it exits (lease released, its process tree ended, cgroup read and
removed; the returned reason -- "exceeded its memory limit" -- becomes the worker's exit reason).

Memory limits are enforced by the kernel when a cgroup (v2 or v1) with the memory controller is
available; otherwise the watchdog samples RSS every `WATCHDOG_INTERVAL_S` and kills a worker
over its limit. CPU time, open files and (without a pids cgroup) processes are rlimits (see
`hardware.limits`). A worker's children die with it through its PID namespace, else its cgroup,
else its process group (`hardware.isolation` says which applies).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hardware.budget import Lease, WorkerBudget
from hardware.cgroupfs import GroupManager, WorkerGroup
from hardware.errors import HardwareError
from hardware.isolation import detect_isolation, instance_prefix
from hardware.leftovers import WorkerRecords
from hardware.limits import PID_NAMESPACE_PROCESSES, WorkerLimits, enforcement, wrap_command
from hardware.usage import ProcessUsage, UsageSampler
from runtimes import tasks
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
    cgroup: WorkerGroup | None
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
        cgroups: GroupManager | None = None,
        pid_namespace: bool = False,
        process_group: bool = False,
        records: WorkerRecords | None = None,
        isolation: str = "",
    ) -> None:
        """`pid_namespace`: each worker in its own (root only, probed by `hardware.isolation`).
        `process_group`: each worker leads its own process group, killed when it exits (the
        fallback without a namespace). `records`: where live workers are written down for the
        next start's leftover sweep. `isolation` is the host summary shown in `status()`.
        """
        self.budget = budget
        self.run_as = run_as
        self.cgroups = cgroups
        self.pid_namespace = pid_namespace
        self.process_group = process_group and not pid_namespace
        self.records = records
        self.isolation = isolation
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
                group_limits = limits
                if self.pid_namespace and limits.processes:
                    # The shim and the init shell live in the group too, outside the budget
                    # the function asked for.
                    group_limits = replace(
                        limits, processes=limits.processes + PID_NAMESPACE_PROCESSES
                    )
                cgroup = self.cgroups.create(manifest.name, f"w{next(_ids)}", group_limits)
            wrapped = wrap_command(
                argv,
                limits,
                run_as=self.run_as,
                cgroup=cgroup,
                pid_namespace=self.pid_namespace,
                new_session=self.process_group,
            )
        except HardwareError as exc:
            if lease is not None:
                lease.release()
            raise Unavailable(f"{manifest.name}: cannot sandbox the worker: {exc.message}") from exc
        self._note_enforcement(manifest.name, limits, cgroup)
        return Prepared(wrapped, limits, lease, cgroup, manifest.name)

    def _note_enforcement(
        self, name: str, limits: WorkerLimits, cgroup: WorkerGroup | None
    ) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        for limit, how in enforcement(limits, run_as=self.run_as, cgroup=cgroup).items():
            log.info("%s: %s enforced by %s", name, limit, how)

    def attach(self, prepared: Prepared, worker: Worker) -> None:
        self._workers[worker.pid] = (worker, prepared)
        if self.records is not None:
            self.records.add(worker.pid)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name="worker watchdog")

    def finished(self, prepared: Prepared, worker: Worker | None) -> str | None:
        """Release what the worker held; return why the kernel or we killed it, if we know."""
        reason = None
        if worker is not None:
            self._workers.pop(worker.pid, None)
            self.usage.pop(worker.pid, None)
            if self.process_group:
                # The worker led its own group: its children that stayed in it go too. The
                # kernel does not reuse the pid while the group has members; an empty group's
                # pid being reused (and made a group leader) within the moment since the
                # worker was reaped would take a full pid wrap-around.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)
            if self.records is not None:
                self.records.remove(worker.pid)
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
            "pid_namespace": self.pid_namespace,
            "isolation": self.isolation,
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
        await tasks.stop(self._watchdog)
        if self.cgroups is not None:
            # The agent created its cgroup subtree, so it removes it (workers are gone by now).
            with contextlib.suppress(HardwareError, OSError):
                await asyncio.to_thread(self.cgroups.close)


def host_sandbox(
    *,
    data_dir: Path,
    budget: WorkerBudget | None,
    run_as: tuple[int, int] | None,
) -> Sandbox:
    """The agent's sandbox for this host. Blocking (reads /proc, writes cgroupfs): call once
    at start via `asyncio.to_thread`.

    Ends processes a previous run left behind (its recorded workers, its cgroups) and logs
    once -- at WARNING unless everything is kernel-enforced -- which mechanism enforces each
    limit, which limit is not enforced, and how a worker's process tree is ended.
    """
    records = WorkerRecords(data_dir / "run" / "workers")
    swept = records.sweep()
    host = detect_isolation(instance_prefix(data_dir), run_as)
    if host.cgroups is not None:
        swept += host.cgroups.swept
    if swept:
        log.warning("ended %d worker processes (or cgroups) left by a previous run", swept)
    level, line = host.summary()
    log.log(level, "%s", line)
    return Sandbox(
        budget=budget,
        run_as=run_as,
        cgroups=host.cgroups,
        pid_namespace=host.pid_namespace,
        process_group=not host.pid_namespace,
        records=records,
        isolation=line,
    )

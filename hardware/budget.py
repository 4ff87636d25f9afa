"""What this box may spend on workers: a memory and a worker-count budget shared by all pools.

Flow: the agent builds one `WorkerBudget.from_profile(profile, BudgetConfig(...))` at start and
hands it to every pool. Before starting a worker a pool asks `admit(memory_mb)` (or `reserve`,
which raises) and gets a `Lease`; it calls `lease.release()` when that worker has exited. A worker
whose function sets no memory limit is charged `default_worker_mb`.

Pure accounting, no I/O and no locks: it belongs to the event loop that owns the pools (do not
share one budget between threads).
"""

from __future__ import annotations

from dataclasses import dataclass

from hardware.errors import BudgetExhausted, HardwareError
from hardware.profile import DeviceProfile

# Left for the agent itself, the OS and page cache on top of the fraction: the agent process is
# ~40 MB RSS with aiohttp, paho, sqlite3 and psutil imported, plus headroom for SQLite caches.
DEFAULT_RESERVE_MB = 64
DEFAULT_MEMORY_FRACTION = 0.5
# A warm worker that declares nothing: a Node worker idles at ~42 MB, a Go or C++ one at a few MB.
DEFAULT_WORKER_MB = 64
# Workers mostly wait on requests; more than a few per core only adds context switches.
WORKERS_PER_CPU = 4


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """Operator settings; 0 in `memory_mb`/`max_workers` means "derive from the profile"."""

    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    reserve_mb: int = DEFAULT_RESERVE_MB
    memory_mb: int = 0
    max_workers: int = 0
    default_worker_mb: int = DEFAULT_WORKER_MB

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_fraction <= 1.0:
            raise HardwareError(
                f"budget: memory_fraction must be in (0, 1], got {self.memory_fraction}",
                code="bad_budget_config",
            )
        for name in ("reserve_mb", "memory_mb", "max_workers"):
            if getattr(self, name) < 0:
                raise HardwareError(f"budget: {name} must be >= 0", code="bad_budget_config")
        if self.default_worker_mb <= 0:
            raise HardwareError("budget: default_worker_mb must be > 0", code="bad_budget_config")


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """For status pages and metrics."""

    memory_mb: int
    memory_used_mb: int
    max_workers: int
    workers: int


class Lease:
    """One admitted worker's share; `release()` is idempotent: a double stop cannot go negative."""

    __slots__ = ("_budget", "memory_mb", "released")

    def __init__(self, budget: WorkerBudget, memory_mb: int) -> None:
        self._budget = budget
        self.memory_mb = memory_mb
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._budget._give_back(self.memory_mb)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Lease {self.memory_mb} MB {state}>"


class WorkerBudget:
    def __init__(
        self, memory_mb: int, max_workers: int, *, default_worker_mb: int = DEFAULT_WORKER_MB
    ) -> None:
        self.memory_mb = max(0, memory_mb)
        self.max_workers = max(0, max_workers)
        self.default_worker_mb = default_worker_mb
        self._used_mb = 0
        self._workers = 0

    @classmethod
    def from_profile(
        cls, profile: DeviceProfile, config: BudgetConfig | None = None
    ) -> WorkerBudget:
        """memory: `fraction * total - reserve` (floored at 0); workers: `cpu_count * 4`."""
        config = config or BudgetConfig()
        memory = config.memory_mb or int(
            profile.memory_total_mb * config.memory_fraction - config.reserve_mb
        )
        workers = config.max_workers or profile.cpu_count * WORKERS_PER_CPU
        return cls(memory, workers, default_worker_mb=config.default_worker_mb)

    def charge(self, memory_mb: int) -> int:
        """What a worker with this memory limit (0 = none) costs against the budget."""
        return memory_mb if memory_mb > 0 else self.default_worker_mb

    def refusal(self, memory_mb: int) -> str | None:
        """Why a worker with this memory limit cannot start now, or None if it can."""
        found = self._check(memory_mb)
        return found[1] if found else None

    def admit(self, memory_mb: int) -> Lease | None:
        """A lease if a worker with this memory limit fits now, else None (nothing is charged)."""
        if self._check(memory_mb) is not None:
            return None
        cost = self.charge(memory_mb)
        self._used_mb += cost
        self._workers += 1
        return Lease(self, cost)

    def reserve(self, memory_mb: int) -> Lease:
        """Like `admit`, but raise BudgetExhausted with the reason.

        The code is "budget_too_small" when the worker could never fit (retrying is pointless),
        else "budget_exhausted" (retry after another worker stops).
        """
        found = self._check(memory_mb)
        if found is not None:
            raise BudgetExhausted(found[1], code=found[0])
        lease = self.admit(memory_mb)
        assert lease is not None  # _check just said it fits
        return lease

    def snapshot(self) -> BudgetSnapshot:
        return BudgetSnapshot(self.memory_mb, self._used_mb, self.max_workers, self._workers)

    def _check(self, memory_mb: int) -> tuple[str, str] | None:
        cost = self.charge(memory_mb)
        if cost > self.memory_mb:
            return "budget_too_small", (
                f"a worker needing {cost} MB can never fit the device's worker memory budget "
                f"of {self.memory_mb} MB"
            )
        if self.max_workers == 0:
            return "budget_too_small", "the device's worker budget allows no workers"
        if self._workers >= self.max_workers:
            return "budget_exhausted", (
                f"worker budget full: {self._workers} of {self.max_workers} workers running"
            )
        if self._used_mb + cost > self.memory_mb:
            return "budget_exhausted", (
                f"worker memory budget full: {self._used_mb} of {self.memory_mb} MB in use, "
                f"{cost} MB more needed"
            )
        return None

    def _give_back(self, memory_mb: int) -> None:
        self._used_mb -= memory_mb
        self._workers -= 1

"""What goes into an executor and what comes out: the contract every runtime host satisfies.

An executor is anything that runs one function: the warm worker pool (`runtimes.pool.Pool`, for
Node, Go and isolated C++) or the in-process C++ host (`runtimes.cpp.inproc.InProcessExecutor`).
The agent's router only ever talks to this interface.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

Health = Literal["healthy", "starting", "unhealthy", "stopping", "stopped"]


@dataclass(frozen=True, slots=True)
class Invocation:
    payload: bytes
    request_id: str
    timeout_s: float
    trace_id: str = ""
    content_type: str = ""
    # Functions already on this invocation's path (a nested `invoke` from a function), so the
    # capability broker can refuse a cycle A -> B -> A before it deadlocks the pools.
    chain: tuple[str, ...] = ()

    @property
    def is_json(self) -> bool:
        return self.content_type.split(";", 1)[0].strip().lower() == "application/json"


@dataclass(frozen=True, slots=True)
class Result:
    payload: bytes
    content_type: str = "application/octet-stream"
    # Where the time went, in seconds: queue wait and execution (worker or in-process call).
    queued_s: float = 0.0
    run_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ExecutorStatus:
    """A snapshot of one executor, read by the HTTP API (`/v1/functions`, `/metrics`), the
    agent's health and the sync client's pool sizes. Each executor kind adds its own fields."""

    health: Health
    instances: int  # workers running (pool) or 1 when the library is loaded (in-process)
    in_flight: int  # requests being executed or waiting
    queued: int  # requests waiting for a slot
    last_error: str | None

    @property
    def rss_mb(self) -> float:
        """Resident memory of the executor's own processes (0 when it has none)."""
        return 0.0

    @property
    def cpu_percent(self) -> float:
        """CPU of the executor's own processes, % of one core (0 when it has none)."""
        return 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    pid: int
    in_flight: int
    served: int
    runtime: str  # what its READY frame said, e.g. "node/20.20.2"
    cold_start_ms: float
    # Sampled by the sandbox; None until the first sample (or without a sandbox).
    rss_mb: float | None = None
    cpu_percent: float | None = None


@dataclass(frozen=True, slots=True)
class PoolStatus(ExecutorStatus):
    """The warm worker pool (`runtimes.pool.Pool`)."""

    peak_instances: int
    ready: int
    starting: int
    restarts: int
    timeouts: int
    recent_crashes: int
    workers: tuple[WorkerStatus, ...]

    @property
    def rss_mb(self) -> float:
        return sum(w.rss_mb or 0.0 for w in self.workers)

    @property
    def cpu_percent(self) -> float:
        return sum(w.cpu_percent or 0.0 for w in self.workers)


@dataclass(frozen=True, slots=True)
class InProcessStatus(ExecutorStatus):
    """The in-process C++ host (`runtimes.cpp.inproc.InProcessExecutor`)."""

    mode: Literal["inline", "pooled"]
    library: str
    loaded: bool
    threads: int
    running: int
    invocations: int
    errors: int
    timeouts: int
    overruns: int
    overdue_running: int
    isolation: Literal["in-process"] = "in-process"


class Executor(Protocol):
    """Runs invocations of one function version. Errors are `runtimes.errors` subclasses."""

    async def start(self) -> None:
        """Load and pre-warm (min_instances); raise if the function cannot start at all."""

    async def invoke(self, inv: Invocation) -> Result: ...

    async def close(self, drain_s: float = 5.0) -> None:
        """Stop taking work, let in-flight work finish until `drain_s`, then stop the rest."""

    def status(self) -> ExecutorStatus:
        """A snapshot: health, instances, in-flight, queue, last error, and the kind's own."""
        ...

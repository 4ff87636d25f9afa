"""What goes into an executor and what comes out: the contract every runtime host satisfies.

An executor is anything that runs one function: the warm worker pool (`runtimes.pool.Pool`, for
Node, Go and isolated C++) or the in-process C++ host (`runtimes.cpp.inproc.InProcessExecutor`).
The agent's router only ever talks to this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Invocation:
    payload: bytes
    request_id: str
    timeout_s: float
    trace_id: str = ""
    content_type: str = ""

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


class Executor(Protocol):
    """Runs invocations of one function version. Errors are `runtimes.errors` subclasses."""

    async def start(self) -> None:
        """Load and pre-warm (min_instances); raise if the function cannot start at all."""

    async def invoke(self, inv: Invocation) -> Result: ...

    async def close(self, drain_s: float = 5.0) -> None:
        """Stop taking work, let in-flight work finish until `drain_s`, then stop the rest."""

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot: health, instances, in-flight, queue, restarts, last error."""
        ...

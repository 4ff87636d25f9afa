"""Where an invocation runs: the one decision point between the HTTP API and the executors.

Today: the function's local executor. The result cache and cloud fallback plug in here, in
that order (cache -> primary -> fallback -> stale cache), without the API changing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge_agent.errors import UnknownFunction
from edge_agent.functions import FunctionSet
from edge_agent.metrics import Metrics
from runtimes.errors import RuntimeErrorBase
from runtimes.invocation import Invocation, Result


@dataclass(frozen=True, slots=True)
class Routed:
    result: Result
    version: str
    served_by: str  # local | cloud | cache
    duration_s: float


class Router:
    def __init__(self, functions: FunctionSet, metrics: Metrics) -> None:
        self._functions = functions
        self._metrics = metrics

    async def invoke(
        self,
        name: str,
        payload: bytes,
        *,
        request_id: str,
        trace_id: str = "",
        content_type: str = "",
    ) -> Routed:
        fn = self._functions.get(name)
        if fn is None:
            problem = self._functions.problems.get(name)
            if problem is not None:
                raise UnknownFunction(f"function {name!r} is not loaded: {problem.message}")
            raise UnknownFunction(f"no function named {name!r} is installed")
        manifest = fn.manifest
        inv = Invocation(
            payload,
            request_id,
            manifest.timeout_ms / 1000,
            trace_id=trace_id,
            content_type=content_type,
        )
        started = time.perf_counter()
        try:
            result = await fn.executor.invoke(inv)
        except RuntimeErrorBase as exc:
            self._metrics.observe(name, time.perf_counter() - started, exc.code)
            raise
        duration = time.perf_counter() - started
        self._metrics.observe(name, duration)
        return Routed(result, manifest.version, "local", duration)

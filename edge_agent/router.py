"""Where an invocation runs: the one decision point between the HTTP API and the executors.

Order for one request: the result cache (when the function's `[cache]` policy enables it and the
client did not send `Cache-Control: no-cache`) -> the function's local executor -> on an error,
a stale cache entry within `stale_if_error_s`. Cloud routing plugs in between the executor and
the stale entry without the API changing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edge_agent.cache import ResultCache
from edge_agent.errors import UnknownFunction
from edge_agent.functions import FunctionSet, LoadedFunction
from edge_agent.metrics import Metrics
from runtimes.errors import RuntimeErrorBase
from runtimes.invocation import Invocation, Result

Pairs = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Routed:
    result: Result
    version: str
    served_by: str  # local | cloud | cache
    cache: str  # hit | miss | stale | bypass
    duration_s: float


class Router:
    def __init__(
        self, functions: FunctionSet, metrics: Metrics, cache: ResultCache | None = None
    ) -> None:
        self._functions = functions
        self._metrics = metrics
        self.cache = cache

    def _lookup(self, name: str) -> LoadedFunction:
        fn = self._functions.get(name)
        if fn is None:
            problem = self._functions.problems.get(name)
            if problem is not None:
                raise UnknownFunction(f"function {name!r} is not loaded: {problem.message}")
            raise UnknownFunction(f"no function named {name!r} is installed")
        return fn

    async def invoke(
        self,
        name: str,
        payload: bytes,
        *,
        request_id: str,
        trace_id: str = "",
        content_type: str = "",
        headers: Pairs = (),
        query: Pairs = (),
        no_cache: bool = False,
    ) -> Routed:
        fn = self._lookup(name)
        manifest = fn.manifest
        inv = Invocation(
            payload,
            request_id,
            manifest.timeout_ms / 1000,
            trace_id=trace_id,
            content_type=content_type,
        )
        started = time.perf_counter()
        policy = fn.cache_policy
        try:
            if self.cache is None or not policy.enabled or no_cache:
                result, cache_status = await fn.executor.invoke(inv), "bypass"
            else:
                key = policy.key_for(name, manifest.version, payload, headers, query)
                answer = await self.cache.run_cached(key, policy, lambda: fn.executor.invoke(inv))
                result, cache_status = answer.result, answer.status
        except RuntimeErrorBase as exc:
            self._metrics.observe(name, time.perf_counter() - started, exc.code)
            raise
        duration = time.perf_counter() - started
        self._metrics.observe(name, duration, cache=cache_status)
        served_by = "cache" if cache_status in ("hit", "stale") else "local"
        return Routed(result, manifest.version, served_by, cache_status, duration)

"""Where an invocation runs: the one decision point between the HTTP API and the executors.

Order for one request:
  1. the result cache, when the function's `[cache]` policy enables it and the client did not
     send `Cache-Control: no-cache` (a fresh entry answers at once);
  2. the primary place of the routing policy (local executor or the platform);
  3. the fallback place, for `local-then-cloud` / `cloud-then-local`, unless the first answer
     was the function's own error;
  4. a stale cache entry within `stale_if_error_s` when every place failed.
An error after all that names each step that failed (`RoutingFailed`).

No confused deputy: the platform runs a forwarded call with the *device's* credentials, so a
call reaches the cloud step only for a caller allowed to invoke that function (`caller`, the
API's Principal), and the platform is told which local token it was (`X-Edgefn-Caller`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from cloud_sync.cloud_invoke import CloudInvoker, CloudUnavailable
from edge_agent.auth import LOCAL, Principal
from edge_agent.cache import ResultCache
from edge_agent.cache_policy import CachePolicy
from edge_agent.errors import UnknownFunction
from edge_agent.functions import FunctionSet, LoadedFunction
from edge_agent.metrics import Metrics
from edge_agent.routing import Policy, RoutingFailed, RoutingPolicy, falls_back
from runtimes.errors import RuntimeErrorBase
from runtimes.invocation import Invocation, Result

Pairs = Mapping[str, str] | Iterable[tuple[str, str]]

# Timeout for functions the device does not have (cloud-only), when the platform is asked.
DEFAULT_CLOUD_TIMEOUT_S = 30.0


# Not frozen: a frozen dataclass sets each field through object.__setattr__, ~3 us per request
# here; nothing mutates a Routed after `invoke` returns it.
@dataclass(slots=True)
class Routed:
    result: Result
    version: str
    served_by: str  # local | cloud | cache
    cache: str  # hit | miss | stale | bypass
    duration_s: float


class Router:
    def __init__(
        self,
        functions: FunctionSet,
        metrics: Metrics,
        cache: ResultCache | None = None,
        cloud: CloudInvoker | None = None,
        default_policy: Policy = "local",
    ) -> None:
        self._functions = functions
        self._metrics = metrics
        self._cache = cache
        self._invoker = cloud
        self.default_policy: Policy = default_policy
        # Per-function policy overrides from the device config (cloud_sync applies them).
        self.overrides: dict[str, Policy] = {}

    @property
    def cache(self) -> ResultCache | None:
        """The result cache given at construction (None: caching off); never swapped later."""
        return self._cache

    @property
    def cloud(self) -> CloudInvoker | None:
        return self._invoker

    def policy_for(self, name: str, fn: LoadedFunction | None) -> RoutingPolicy:
        base = fn.routing if fn is not None else RoutingPolicy(self.default_policy)
        override = self.overrides.get(name)
        return replace(base, policy=override) if override else base

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
        deadline_s: float | None = None,
        chain: tuple[str, ...] = (),
        caller: Principal | None = None,
    ) -> Routed:
        """Route one invocation. `deadline_s` and `chain` come from a nested call (a function
        invoking another through the capability broker): the callee gets no more time than its
        caller has left, and learns who is already on the path. `caller`: who asked through the
        API (None: the agent itself, e.g. a nested call), checked again before a cloud step."""
        fn = self._functions.get(name)
        routing = self.policy_for(name, fn)
        if fn is None and "cloud" not in routing.steps:
            raise self._unknown(name)
        where = {"served_by": "local", "version": fn.manifest.version if fn else ""}

        async def run() -> Result:
            # The Invocation is built here, not before the cache lookup: a hit never needs it.
            timeout_s = fn.manifest.timeout_ms / 1000 if fn else DEFAULT_CLOUD_TIMEOUT_S
            if deadline_s is not None:
                timeout_s = min(timeout_s, deadline_s)
            inv = Invocation(payload, request_id, timeout_s, trace_id, content_type, chain)
            return await self._run_chain(name, fn, inv, routing, where, caller)

        started = time.perf_counter()
        policy = fn.cache_policy if fn is not None else CachePolicy()
        try:
            if self._cache is None or not policy.enabled or no_cache:
                result, cache_status = await run(), "bypass"
            else:
                key = policy.key_for(name, where["version"], payload, headers, query)
                answer = await self._cache.run_cached(key, policy, run)
                result, cache_status = answer.result, answer.status
        except RuntimeErrorBase as exc:
            self._metrics.observe(name, time.perf_counter() - started, exc.code)
            raise
        duration = time.perf_counter() - started
        self._metrics.observe(name, duration, cache=cache_status)
        served_by = "cache" if cache_status in ("hit", "stale") else where["served_by"]
        return Routed(result, where["version"], served_by, cache_status, duration)

    async def _run_chain(
        self,
        name: str,
        fn: LoadedFunction | None,
        inv: Invocation,
        routing: RoutingPolicy,
        where: dict[str, str],
        caller: Principal | None = None,
    ) -> Result:
        failures: list[tuple[str, RuntimeErrorBase]] = []
        for i, step in enumerate(routing.steps):
            try:
                if step == "local":
                    if fn is None:
                        raise self._unknown(name)
                    result = await fn.executor.invoke(inv)
                    where.update(served_by="local", version=fn.manifest.version)
                    return result
                pinned = fn.manifest.version if fn is not None else ""
                result, version = await self._cloud(name, inv, routing, pinned, caller)
                where.update(served_by="cloud", version=version)
                return result
            except RuntimeErrorBase as exc:
                failures.append((step, exc))
                last = i == len(routing.steps) - 1
                if last or not falls_back(exc):
                    if len(failures) == 1:
                        raise
                    raise RoutingFailed(failures) from exc
        raise AssertionError("a routing policy has at least one step")

    async def _cloud(
        self,
        name: str,
        inv: Invocation,
        routing: RoutingPolicy,
        version: str,
        caller: Principal | None = None,
    ) -> tuple[Result, str]:
        if self._invoker is None:
            raise CloudUnavailable("no platform is configured (edge-agent run --cloud URL)")
        if caller is not None and not caller.allows(f"invoke:{name}"):
            # The API's route check already refuses such callers; this keeps every other path
            # to the cloud step (and future ones) from lending them the device's credentials.
            refused = CloudUnavailable(
                f"this caller may not invoke {name!r}, so it is not forwarded to the cloud",
                code="cloud_forbidden",
            )
            refused.status = 403
            raise refused
        if routing.cloud_timeout_ms is not None:
            inv = replace(inv, timeout_s=routing.cloud_timeout_ms / 1000)
        token_id = "" if caller is None or caller is LOCAL else caller.token_id or ""
        return await self._invoker.invoke(name, inv, version, caller=token_id)

    def _unknown(self, name: str) -> UnknownFunction:
        problem = self._functions.problems.get(name)
        if problem is not None:
            return UnknownFunction(f"function {name!r} is not loaded: {problem.message}")
        return UnknownFunction(f"no function named {name!r} is installed")

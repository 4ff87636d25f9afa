"""The running set of functions: loads what the store lists, swaps versions, reports problems.

`sync()` is idempotent: it compares what is on disk (`store.scan`) with what runs, starts
executors for new or changed functions (warm before they take traffic), swaps them in with one
dict assignment, and drains the executor they replaced in the background. A function whose new
version fails to start keeps serving its previous version; the failure shows in `problems`.

A function that cannot start because the device's worker budget is full is not broken: it is
"installed, not running" (`WaitingForBudget`, `status.state == "waiting_for_budget"` in
`describe()`), retried at every scan, and starts as soon as another function frees its share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.cache_policy import CachePolicy, parse_cache_policy
from edge_agent.dapr import DaprEndpoint, dapr_enabled
from edge_agent.routing import RoutingPolicy, parse_routing
from edge_agent.store import FunctionSource, LoadProblem, scan
from runtimes.capabilities import CapabilityHandler
from runtimes.errors import Overloaded, RuntimeErrorBase, Unavailable
from runtimes.invocation import Executor
from runtimes.launchers import make_executor
from runtimes.manifest import Manifest
from runtimes.sandbox import Sandbox

log = logging.getLogger("edgefn.functions")

# A replaced executor finishes the requests it holds within this time before it is stopped.
SWAP_DRAIN_S = 30.0


@dataclass(slots=True)
class LoadedFunction:
    source: FunctionSource
    executor: Executor
    cache_policy: CachePolicy = field(default_factory=CachePolicy)
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    loaded_at: float = field(default_factory=time.time)
    dapr_token: str = ""  # this start's Dapr endpoint token ("": no `[dapr]`)

    @property
    def manifest(self) -> Manifest:
        return self.source.manifest


class FunctionSet:
    def __init__(
        self,
        functions_dir: Path,
        *,
        require_signed: bool,
        sandbox: Sandbox | None,
        on_switch: Callable[[LoadedFunction], Awaitable[None]] | None = None,
        capabilities: CapabilityHandler | None = None,
        dapr: DaprEndpoint | None = None,
    ) -> None:
        self._on_switch = on_switch
        self._dapr = dapr  # the Dapr-compatible endpoint for functions with `[dapr]`
        # Answers the building-block calls of every worker this set starts (the broker).
        self._capabilities = capabilities
        self._dir = functions_dir
        self._require_signed = require_signed
        self._sandbox = sandbox
        self.loaded: dict[str, LoadedFunction] = {}
        self.problems: dict[str, LoadProblem] = {}
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    def get(self, name: str) -> LoadedFunction | None:
        return self.loaded.get(name)

    async def sync(self) -> None:
        async with self._lock:
            sources, problems = await asyncio.to_thread(
                scan, self._dir, require_signed=self._require_signed
            )
            new_problems = {p.name: p for p in problems}
            wanted = {s.manifest.name: s for s in sources}
            changed = [
                s
                for name, s in wanted.items()
                if name not in self.loaded or self.loaded[name].source.fingerprint != s.fingerprint
            ]
            # A failed candidate keeps failing until its files change: do not retry it each scan.
            changed = [
                s
                for s in changed
                if not (
                    (p := self.problems.get(s.manifest.name)) is not None
                    and getattr(p, "fingerprint", None) == s.fingerprint
                )
            ]
            results = await asyncio.gather(*(self._start(s) for s in changed))
            for source, outcome in zip(changed, results, strict=True):
                name = source.manifest.name
                if isinstance(outcome, LoadProblem):
                    new_problems[name] = outcome
                    continue
                old = self.loaded.get(name)
                self.loaded[name] = outcome
                if old is not None:
                    log.info(
                        "%s: switched %s -> %s", name, old.manifest.version, source.manifest.version
                    )
                    self._retire(old)
                    if self._on_switch is not None:
                        await self._on_switch(outcome)
                else:
                    log.info("%s@%s loaded (%s)", name, source.manifest.version, source.directory)
            for name in list(self.loaded):
                if name not in wanted and name not in new_problems:
                    log.info("%s: removed", name)
                    self._retire(self.loaded.pop(name))
            # Keep problems of failed candidates whose files did not change since.
            for name, prob in self.problems.items():
                if name not in new_problems and isinstance(prob, _CandidateProblem):
                    src = wanted.get(name)
                    if src is not None and src.fingerprint == prob.fingerprint:
                        new_problems[name] = prob
            self.problems = new_problems

    async def _start(self, source: FunctionSource) -> LoadedFunction | LoadProblem:
        manifest = source.manifest
        try:
            where = str(source.directory / "edgefn.toml")
            policy = parse_cache_policy(manifest.extra.get("cache"), where)
            routing = parse_routing(manifest.extra.get("routing"), where)
            token, dapr_env = await self._dapr_env(manifest)
            try:
                executor = make_executor(
                    manifest,
                    source.directory,
                    sandbox=self._sandbox,
                    extra_env=dapr_env,
                    capabilities=self._capabilities,
                )
                await executor.start()
            except BaseException:
                self._revoke(token)
                raise
        except Overloaded as exc:
            # Only the worker budget refuses a start (no request is queued yet): installed,
            # not running, and retried at every scan (not pinned by fingerprint like a fault).
            prev = self.problems.get(manifest.name)
            if not isinstance(prev, WaitingForBudget):
                log.warning(
                    "%s@%s installed but not running: %s (starts when budget frees up)",
                    manifest.name,
                    manifest.version,
                    exc.message,
                )
            return WaitingForBudget(manifest.name, source.directory, exc.message)
        except RuntimeErrorBase as exc:
            log.error("%s@%s not loaded: %s", manifest.name, manifest.version, exc.message)
            return _CandidateProblem(
                manifest.name, source.directory, exc.message, fingerprint=source.fingerprint
            )
        return LoadedFunction(source, executor, policy, routing, dapr_token=token)

    async def _dapr_env(self, manifest: Manifest) -> tuple[str, dict[str, str] | None]:
        """(token, what its workers' environment gains) for a `[dapr]` function, else ("", None)."""
        if not dapr_enabled(manifest):
            return "", None
        if self._dapr is None:
            raise Unavailable(f"{manifest.name}: this agent offers no Dapr-compatible endpoint")
        return await self._dapr.grant(manifest)

    def _revoke(self, token: str) -> None:
        if token and self._dapr is not None:
            self._dapr.revoke(token)

    def _retire(self, fn: LoadedFunction) -> None:
        task = asyncio.create_task(fn.executor.close(SWAP_DRAIN_S))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        task.add_done_callback(lambda _: self._revoke(fn.dapr_token))

    async def close(self, drain_s: float) -> None:
        loaded, self.loaded = list(self.loaded.values()), {}
        await asyncio.gather(*(f.executor.close(drain_s) for f in loaded), return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()
        if self._dapr is not None:
            await self._dapr.close()

    def not_running(self) -> dict[str, str]:
        """Functions installed on disk that do not run now, with the reason (for reports)."""
        return {n: p.message for n, p in sorted(self.problems.items()) if n not in self.loaded}

    def describe(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name in sorted(set(self.loaded) | set(self.problems)):
            fn = self.loaded.get(name)
            prob = self.problems.get(name)
            item: dict[str, Any] = {"name": name}
            if fn is not None:
                m = fn.manifest
                item.update(
                    version=m.version,
                    runtime=m.runtime,
                    isolation=m.isolation if m.runtime == "cpp" else "process",
                    signed=fn.source.signed,
                    timeout_ms=m.timeout_ms,
                    status=fn.executor.status().to_json(),
                )
            if prob is not None:
                item["error"] = prob.message
                if fn is None and isinstance(prob, WaitingForBudget):
                    item["status"] = {"health": "waiting", "state": "waiting_for_budget"}
                elif fn is None:
                    item["status"] = {"health": "failed"}
            out.append(item)
        return out


@dataclass(frozen=True, slots=True)
class _CandidateProblem(LoadProblem):
    fingerprint: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class WaitingForBudget(LoadProblem):
    """Installed, but the worker budget is full: retried at every scan until it fits."""

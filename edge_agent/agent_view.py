"""What the running function set looks like from outside, and what the platform's desired state
does to it (pool sizes, pushed LAN tokens), and a function's event into the outbox.

The sync client and the deployer are handed callbacks (`cloud_sync` never imports the agent);
the reads behind them live here, as functions of the function set and the metrics, so
`edge_agent.agent` keeps only the wiring. All of them run on the event loop and are cheap:
counters and dicts the pools already keep.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.capabilities import Event
from edge_agent.functions import FunctionSet
from edge_agent.metrics import BUCKETS, Metrics
from runtimes.capabilities import CapabilityUnavailable
from runtimes.pool import Pool

if TYPE_CHECKING:
    from cloud_sync.state import AgentConfig
    from cloud_sync.sync import FunctionCounters, SyncClient
    from edge_agent.deployer_health import HealthSample

log = logging.getLogger("edgefn.agent")


def restarts(functions: FunctionSet, name: str) -> int:
    """Worker restarts of the function's pool (0 for in-process C++ or when not loaded)."""
    from runtimes.invocation import PoolStatus

    fn = functions.loaded.get(name)
    status = fn.executor.status() if fn is not None else None
    return status.restarts if isinstance(status, PoolStatus) else 0


def metrics_snapshot(functions: FunctionSet, metrics: Metrics) -> dict[str, FunctionCounters]:
    """Per-function counters for the platform's metrics records (cumulative)."""
    from cloud_sync.sync import FunctionCounters

    bounds = tuple(b * 1000.0 for b in BUCKETS)
    return {
        name: FunctionCounters(
            invocations=st.invocations,
            errors=sum(st.errors.values()),
            cache_hits=st.cache.get("hit", 0) + st.cache.get("stale", 0),
            cache_misses=st.cache.get("miss", 0),
            latency_bounds_ms=bounds,
            latency_counts=tuple(st.bucket_counts),
            latency_sum_ms=st.duration_sum * 1000.0,
            restarts=restarts(functions, name),
        )
        for name, st in metrics.functions.items()
    }


def versions(functions: FunctionSet) -> dict[str, str]:
    return {n: f.manifest.version for n, f in sorted(functions.loaded.items())}


def pool_sizes(functions: FunctionSet) -> dict[str, int]:
    return {name: fn.executor.status().instances for name, fn in functions.loaded.items()}


def health_sample(functions: FunctionSet, metrics: Metrics, name: str) -> HealthSample:
    """What the deployer's health window watches (cumulative, cheap, on the loop)."""
    from edge_agent.deployer_health import HealthSample

    fn = functions.loaded.get(name)
    st = metrics.functions.get(name)
    problem = functions.problems.get(name)
    return HealthSample(
        loaded_version=fn.manifest.version if fn is not None else None,
        restarts=restarts(functions, name),
        invocations=st.invocations if st else 0,
        errors=sum(st.errors.values()) if st else 0,
        problem=problem.message if problem is not None else None,
    )


def apply_pools(functions: FunctionSet, desired: AgentConfig | None) -> None:
    """The desired per-function pool sizes (or the manifest's) onto the running pools."""
    for name, fn in functions.loaded.items():
        if not isinstance(fn.executor, Pool):
            continue  # in-process C++: no pool to size
        base = fn.manifest.pool
        fc = desired.functions.get(name) if desired is not None else None
        want = base
        if fc is not None:
            lo = fc.min_instances if fc.min_instances is not None else base.min_instances
            hi = fc.max_instances if fc.max_instances is not None else base.max_instances
            want = replace(
                base,
                min_instances=lo,
                max_instances=max(lo, hi),
                concurrency=fc.concurrency or base.concurrency,
            )
        if fn.executor.settings != want:
            log.info("%s: pool %s -> %s", name, fn.executor.settings, want)
            fn.executor.update_settings(want)


async def publish_event(sync: SyncClient | None, event: Event) -> None:
    """A function's event, durable in the outbox before the function hears back; the sender
    delivers it over MQTT or the HTTP fallback, the platform dedupes on its key."""
    if sync is None or sync.outbox is None:
        raise CapabilityUnavailable("this agent is not joined to a platform: nothing to publish to")
    from cloud_sync import topics

    body = {
        "at": time.time(),
        "type": "function_event",
        "function": event.function,
        "version": event.version,
        "topic": event.topic,
        "request_id": event.request_id,
        "size": len(event.payload),
        "payload_b64": base64.b64encode(event.payload).decode(),
    }
    await sync.outbox.append(
        "events", topics.device_topic(sync.device_id, "events"), json.dumps(body).encode()
    )


async def apply_lan_tokens(tokens_file: Path, entries: list[dict[str, Any]]) -> None:
    """Desired `lan.tokens` (validated by cloud_sync.state) into the token store, beside the
    local tokens; the running Authenticator picks the change up like any other (issue 14)."""
    from edge_agent.tokens import TokenError, TokenStore

    store = TokenStore(tokens_file)
    try:
        count, skipped = await asyncio.to_thread(store.set_pushed, list(entries))
    except TokenError as exc:
        log.error("cannot apply the platform's LAN tokens: %s", exc.message)
        return
    if skipped:
        log.warning("platform LAN tokens %s skipped: a local token has that id", skipped)
    log.info("platform LAN tokens applied: %d", count)

"""The sync client's metrics intervals: counter deltas, pool gauges and system figures.

Split out of `cloud_sync.sync` (which keeps the loop that calls it) so that module stays one
concept, the link to the platform, and under the project's module size. A `MetricsCollector`
owns the interval bookkeeping (the last counters and the interval start) and closes one
interval at a time into the outbox; the deltas advance only after the append committed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cloud_sync import topics
from cloud_sync.device_figures import FunctionCounters, counter_delta, system_figures
from cloud_sync.outbox import METRICS_SCHEMA, Outbox, OutboxStats, gauge


class MetricsCollector:
    """Closes metrics intervals for one device; `prime()` at start, then `collect(outbox)`."""

    def __init__(
        self,
        device_id: str,
        data_dir: Path,
        metrics_snapshot: Callable[[], Mapping[str, FunctionCounters]],
        pool_sizes: Callable[[], Mapping[str, int]],
        versions: Callable[[], Mapping[str, str]] | None,
    ) -> None:
        self.device_id = device_id
        self.data_dir = data_dir
        self.metrics_snapshot = metrics_snapshot
        self.pool_sizes = pool_sizes
        self.versions = versions
        self._last_counters: dict[str, FunctionCounters] = {}
        self._last_tick = time.time()
        # The metrics loop and the deployer (at a switch) close intervals: one at a time.
        self._lock = asyncio.Lock()

    async def prime(self) -> None:
        """Start the first interval now (and prime psutil's cpu_percent)."""
        await asyncio.to_thread(system_figures, self.data_dir)
        self._last_counters = dict(self.metrics_snapshot())
        self._last_tick = time.time()

    async def collect(self, outbox: Outbox) -> OutboxStats:
        """Close the current interval: deltas since the last one, gauges, system figures.
        Returns the outbox figures after the append."""
        async with self._lock:
            return await self._collect(outbox)

    async def _collect(self, outbox: Outbox) -> OutboxStats:
        now = time.time()
        counters = dict(self.metrics_snapshot())
        pools = dict(self.pool_sizes())
        system = await asyncio.to_thread(system_figures, self.data_dir)
        functions: dict[str, Any] = {}
        for name in sorted(set(counters) | set(pools)):
            entry: dict[str, Any] = {}
            c = counters.get(name)
            if c is not None:
                d = counter_delta(c, self._last_counters.get(name))
                if d.restarts:
                    entry["restarts"] = d.restarts
                if d.invocations:
                    entry.update(
                        invocations=d.invocations,
                        errors=d.errors,
                        cache_hits=d.cache_hits,
                        cache_misses=d.cache_misses,
                        latency_ms={
                            "bounds": list(d.latency_bounds_ms),
                            "counts": list(d.latency_counts),
                            "sum": d.latency_sum_ms,
                        },
                    )
            if name in pools:
                entry["pool"] = {"instances": gauge(pools[name])}
            if entry:
                functions[name] = entry
        record = {
            "schema": METRICS_SCHEMA,
            "device": self.device_id,
            "interval_start": self._last_tick,
            "interval_end": now,
            "samples": 1,
            "functions": functions,
            **({"versions": dict(self.versions())} if self.versions else {}),
            "system": {k: gauge(v) for k, v in system.items()},
        }
        await outbox.append(
            "metrics",
            topics.device_topic(self.device_id, "metrics"),
            json.dumps(record, separators=(",", ":")).encode(),
            interval=(self._last_tick, now),
        )
        # Only after the append committed: a failed append leaves the deltas for the next one.
        self._last_counters = counters
        self._last_tick = now
        return await outbox.stats()

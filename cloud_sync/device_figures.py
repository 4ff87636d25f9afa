"""What the device counts and measures for each metrics interval (no I/O but psutil).

`FunctionCounters` is what the agent keeps per function since it started; the sync client turns
two snapshots into one interval with `counter_delta` and adds `system_figures` (psutil) before
writing the metrics record into the outbox (`cloud_sync.sync.SyncClient.collect_metrics`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class FunctionCounters:
    """Cumulative counters of one function since the agent started (what the agent keeps)."""

    invocations: int
    errors: int
    cache_hits: int
    cache_misses: int
    latency_bounds_ms: tuple[float, ...]
    latency_counts: tuple[int, ...]  # per bucket, len(bounds) + 1
    latency_sum_ms: float
    restarts: int = 0  # worker restarts of the running version's pool (a new pool starts at 0)


def counter_delta(now: FunctionCounters, before: FunctionCounters | None) -> FunctionCounters:
    """What happened between two snapshots; `now` itself after a reset or on the first one."""
    if (
        before is None
        or now.invocations < before.invocations
        or (now.latency_bounds_ms != before.latency_bounds_ms)
    ):
        return now  # first interval, or the counters were reset (agent restart)
    return FunctionCounters(
        invocations=now.invocations - before.invocations,
        errors=now.errors - before.errors,
        cache_hits=now.cache_hits - before.cache_hits,
        cache_misses=now.cache_misses - before.cache_misses,
        latency_bounds_ms=now.latency_bounds_ms,
        latency_counts=tuple(
            a - b for a, b in zip(now.latency_counts, before.latency_counts, strict=True)
        ),
        latency_sum_ms=now.latency_sum_ms - before.latency_sum_ms,
        # A version switch brings a new pool whose count starts again at 0.
        restarts=now.restarts - before.restarts
        if now.restarts >= before.restarts
        else now.restarts,
    )


def system_figures(data_dir: Path) -> dict[str, float]:
    """psutil figures present on this machine (blocking: call in a thread)."""
    import psutil

    out: dict[str, float] = {
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "memory_used_bytes": float(psutil.virtual_memory().used),
        "memory_percent": float(psutil.virtual_memory().percent),
    }
    with contextlib.suppress(OSError):
        disk = psutil.disk_usage(str(data_dir))
        out["disk_used_bytes"] = float(disk.used)
        out["disk_percent"] = float(disk.percent)
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is not None:
        with contextlib.suppress(OSError, RuntimeError):
            temps = [t.current for entries in sensors().values() for t in entries if t.current]
            if temps:
                out["temperature_c"] = float(max(temps))
    return out

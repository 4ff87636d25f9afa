"""A sample edgefn.metrics/1 record, shared by the metrics-record and outbox tests."""

from __future__ import annotations

from typing import Any

from cloud_sync.metrics_record import METRICS_SCHEMA, gauge, new_histogram, observe


def metrics(start: float, end: float, *, invocations: int = 1, cpu: float = 10.0) -> dict[str, Any]:
    hist = new_histogram()
    for _ in range(invocations):
        observe(hist, 3.0)
    return {
        "schema": METRICS_SCHEMA,
        "device": "d1",
        "interval_start": start,
        "interval_end": end,
        "functions": {
            "resize": {
                "invocations": invocations,
                "errors": 0,
                "cache_hits": 1,
                "cache_misses": invocations - 1,
                "latency_ms": hist,
                "pool": {"instances": gauge(2)},
            }
        },
        "system": {"cpu_percent": gauge(cpu), "memory_used_bytes": gauge(1e8)},
    }

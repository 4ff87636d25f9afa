"""Seeding the platform for console tests through the device API, as a device would.

`enrol(...)` uses the operator API; `report(...)` posts a reported document and metrics
records through the device's own HTTP fallback endpoint with its own token (the agent's path
when MQTT is down), so the console reads what the real intake stored.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from cloud_sync import topics
from cloud_sync.metrics_record import METRICS_SCHEMA, new_histogram, observe


def call(url: str, method: str, path: str, token: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def enrol(url: str, operator_token: str, device: str, labels: dict[str, str]) -> str:
    """Enrol and return the device's own token."""
    doc = call(url, "POST", "/v1/devices", operator_token, {"id": device, "labels": labels})
    return str(doc["token"])


def report(
    url: str,
    device: str,
    device_token: str,
    *,
    functions: dict[str, str],
    arch: str,
    labels: dict[str, str] | None = None,
    intervals: int = 6,
    errors_every: int = 3,
    start: float = 1_800_000_000.0,
) -> None:
    records = []
    reported = {
        "device": device, "version": 1, "reported_at": start, "desired_seen": None,
        "applied": {"device_version": 0, "config": {"log": {"level": "info"}}},
        "status": "applied", "error": None, "functions": functions,
        "profile": {"arch": arch, "cpu_count": 2, "memory_total_mb": 2048, "hostname": device,
                    "labels": labels or {}},
    }  # fmt: skip
    records.append(("reported", reported, f"reported-{device}-1"))
    for i in range(intervals):
        fns = {}
        for name in functions:
            hist = new_histogram()
            for k in range(10):
                observe(hist, 3.0 + k * (i + 1))
            fns[name] = {"invocations": 10 + i, "errors": i % errors_every, "latency_ms": hist}
        rec = {"schema": METRICS_SCHEMA, "device": device, "interval_start": start + i * 10,
               "interval_end": start + (i + 1) * 10, "samples": 1, "functions": fns}  # fmt: skip
        records.append(("metrics", rec, f"metrics-{device}-{i}"))
    body = {
        "records": [
            {"key": key, "kind": kind, "topic": topics.device_topic(device, kind),
             "payload": json.dumps(doc)}
            for kind, doc, key in records
        ]
    }  # fmt: skip
    got = call(url, "POST", f"/v1/devices/{device}/records", device_token, body)
    assert got["stored"] == len(records), got

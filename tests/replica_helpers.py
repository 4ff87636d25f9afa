"""Helpers of the replica tests: several real `edge-cloud serve` processes on one broker and one
leader lease, and devices that publish metric records with the device's own MQTT session."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from cloud_sync import credentials, topics
from cloud_sync.credentials import DeviceCredentials
from cloud_sync.mqtt import USER_PROPERTY_KEY, USER_PROPERTY_KIND, MqttSession
from cloud_sync.outbox import METRICS_SCHEMA, new_histogram, observe
from tests.mosquitto import Broker, eventually
from tests.registry_helpers import Platform, start_platform


def start_replica(
    data_dir: Path, broker: Broker, database_url: str, replica: str, *extra: str
) -> Platform:
    """One replica: its own port, the state in PostgreSQL (the leader lease too), the broker,
    a stable id. The data dir is shared: it holds the platform CA the broker trusts and the
    bundle blobs (a shared directory, as `--blobs file:///PATH` names one)."""
    return start_platform(
        data_dir,
        "--broker", broker.url,
        "--database", database_url,
        "--replica-id", replica,
        *extra,
    )  # fmt: skip


def call(plat: Platform, method: str, path: str, body: Any = None, *, token: str = "") -> Any:
    req = urllib.request.Request(
        plat.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token or plat.token}",
                 "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


async def replica_view(plat: Platform) -> dict[str, Any]:
    doc: dict[str, Any] = await asyncio.to_thread(call, plat, "GET", "/v1/replica")
    return doc


async def wait_subscribed(*replicas: Platform, within_s: float = 30) -> None:
    async def all_ready() -> bool:
        views = [await replica_view(p) for p in replicas]
        return all(v["mqtt"] and v["mqtt"]["subscribed"] for v in views)

    await eventually(all_ready, within_s, "every replica subscribed")


async def leaders(*replicas: Platform) -> list[str]:
    """The ids of the replicas that say they lead (live ones only)."""
    out = []
    for p in replicas:
        if p.proc.poll() is not None:
            continue
        view = await replica_view(p)
        if view["lease"]["leader"]:
            out.append(str(view["replica"]))
    return out


def enrol(
    plat: Platform, device_id: str, labels: dict[str, str] | None = None
) -> DeviceCredentials:
    doc = call(plat, "POST", "/v1/devices", {"id": device_id, "labels": labels or {}})
    return credentials.from_dict(doc)


def metrics_record(device: str, n: int) -> bytes:
    hist = new_histogram()
    observe(hist, 3.0)
    now = time.time()
    record = {
        "schema": METRICS_SCHEMA, "device": device, "interval_start": now - 1,
        "interval_end": now, "samples": 1,
        "functions": {"echo": {"invocations": n + 1, "errors": 0, "latency_ms": hist}},
    }  # fmt: skip
    return json.dumps(record).encode()


async def send_metrics(creds: DeviceCredentials, count: int, first: int = 0) -> list[str]:
    """Publish metric records `first`..`first+count-1` (QoS 1, each acknowledged by the
    broker: from then on the platform owes it to the device); their keys."""
    keys = []
    async with MqttSession.for_device(creds) as session:
        await session.wait_ready(30)
        for n in range(first, first + count):
            key = f"m-{creds.device_id}-{n}"
            props = [(USER_PROPERTY_KEY, key), (USER_PROPERTY_KIND, "metrics")]
            await session.publish(
                topics.device_topic(creds.device_id, "metrics"),
                metrics_record(creds.device_id, n),
                user_properties=props,
            )
            keys.append(key)
    return keys

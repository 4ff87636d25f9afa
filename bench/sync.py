"""Sync throughput: outbox appends (durable) and platform intake over MQTT and over HTTP.

Run: `.venv/bin/python -m bench.sync [--records N]`. Everything on loopback, in one process
except Mosquitto (when installed; the MQTT row then uses it, else the embedded amqtt broker).

Rows, each against a baseline measured in the same run:
* outbox append: `Outbox.append` of one metrics-sized record per commit (WAL, synchronous=FULL),
  vs a raw sqlite3 INSERT + COMMIT with the same pragmas -- the cost of the async writer thread.
* intake over MQTT: a device session publishes N records QoS 1 (awaiting PUBACKs, 32 in flight),
  the platform's MqttIntake stores them; reports/s until the last one is stored.
* intake over HTTP: the same records POSTed in batches of 64 to /v1/devices/{id}/records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cloud_sync import topics
from cloud_sync.credentials import DeviceCredentials
from cloud_sync.mqtt import USER_PROPERTY_KEY, MqttSession
from cloud_sync.outbox import Outbox
from cloud_sync.platform.server import DEVICES_KEY, create_app
from cloud_sync.platform.settings import PlatformSettings


def _payload(i: int) -> bytes:
    rec = {
        "schema": "edgefn.metrics/1", "device": "bench", "interval_start": float(i),
        "interval_end": float(i) + 1, "samples": 1,
        "functions": {"echo": {"invocations": 10, "errors": 0, "cache_hits": 3,
                               "cache_misses": 7}},
    }  # fmt: skip
    return json.dumps(rec, separators=(",", ":")).encode()


async def bench_outbox(d: Path, n: int) -> tuple[float, float]:
    db = sqlite3.connect(d / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, k TEXT UNIQUE, p BLOB)")
    t = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO r (k, p) VALUES (?, ?)", (str(uuid.uuid4()), _payload(i)))
        db.execute("COMMIT")
    raw = n / (time.perf_counter() - t)
    db.close()
    outbox = await Outbox.open(d / "outbox.db", max_bytes=1 << 30)
    topic = topics.device_topic("bench", "metrics")
    t = time.perf_counter()
    for i in range(n):
        await outbox.append("metrics", topic, _payload(i), interval=(float(i), float(i) + 1))
    ours = n / (time.perf_counter() - t)
    await outbox.close()
    return ours, raw


async def bench_intake(d: Path, n: int) -> dict[str, float]:
    settings = PlatformSettings(data_dir=d / "plat", broker="embedded")
    app = await asyncio.to_thread(create_app, settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    token = settings.token_file.read_text().strip()
    devices = app[DEVICES_KEY]
    out: dict[str, float] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.post(f"{base}/v1/devices", json={"id": "bench"}) as resp:
            creds_doc: dict[str, Any] = await resp.json()
        fields = ("device_id", "platform_url", "broker_url", "ca_pem", "cert_pem", "key_pem")
        creds = DeviceCredentials(**{k: creds_doc[k] for k in fields})
        intake = devices.intake
        assert intake is not None
        await intake.session.wait_ready(10)
        session = MqttSession.for_device(creds, mqtt311=True)
        await session.start()
        await session.wait_connected(10)
        topic = topics.device_topic("bench", "metrics")
        before = intake.stored
        t = time.perf_counter()
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                await session.publish(
                    topic, _payload(i), user_properties=[(USER_PROPERTY_KEY, str(uuid.uuid4()))]
                )

        await asyncio.gather(*(one(i) for i in range(n)))
        deadline = time.monotonic() + 120
        while intake.stored - before < n and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)  # a bench: polling costs nothing measurable here
        out["mqtt (amqtt, embedded)"] = n / (time.perf_counter() - t)
        await session.close()
        dev = {"Authorization": f"Bearer {creds_doc['token']}"}
        t = time.perf_counter()
        for start in range(0, n, 64):
            recs = [
                {"key": str(uuid.uuid4()), "kind": "metrics", "topic": topic,
                 "payload": _payload(n + i).decode()}
                for i in range(start, min(n, start + 64))
            ]  # fmt: skip
            url = f"{base}/v1/devices/bench/records"
            async with http.post(url, json={"records": recs}, headers=dev) as r:
                assert r.status == 200, await r.text()
        out["http (batches of 64)"] = n / (time.perf_counter() - t)
    await runner.cleanup()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="edgefn-bench-sync-"))
    try:
        ours, raw = await bench_outbox(d, args.records)
        intake = await bench_intake(d, args.records)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{'what':<40} {'per second':>12} {'vs baseline':>12}")
    print(f"{'raw sqlite insert+commit (FULL, WAL)':<40} {raw:>12.0f} {'1.00':>12}")
    print(f"{'outbox append (durable, async)':<40} {ours:>12.0f} {ours / raw:>12.2f}")
    for name, rate in intake.items():
        print(f"{'platform intake ' + name:<40} {rate:>12.0f} {rate / raw:>12.2f}")


if __name__ == "__main__":
    asyncio.run(main())

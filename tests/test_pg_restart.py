"""PostgreSQL restarted under load: the fleet store reconnects by itself, every record whose
`ingest` returned is stored, and every one that failed was reported to its caller (raised), none
dropped in silence; nothing is stored that no caller sent."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_sync import topics
from cloud_sync.platform.fleet_store import FleetStore, record_digest
from cloud_sync.platform.server import create_app
from cloud_sync.platform.settings import PlatformSettings
from cloud_sync.platform.sql import SqlError, pg_engine
from cloud_sync.platform.sql.pg_engine import PgEngine
from tests.postgres import PostgresDatabase

MAX_RECORDS = 20_000
TIMEOUT_S = 60.0


def _wait(cond: object, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_restart_under_ingest_loses_nothing_acknowledged(postgres_db: PostgresDatabase) -> None:
    store = FleetStore(PgEngine(postgres_db.url, acquire_timeout_s=0.5))
    store.enroll("d1", {}, "tok", 1)
    topic = topics.device_topic("d1", "events")
    acked: list[int] = []
    failed: list[tuple[int, str]] = []
    stop = threading.Event()

    def ingest() -> None:
        started = time.monotonic()
        for i in range(MAX_RECORDS):
            if stop.is_set() or time.monotonic() - started > TIMEOUT_S:
                return
            try:
                store.ingest("d1", "events", topic, b'{"i": %d}' % i, key=f"k{i}", via="mqtt")
            except SqlError as exc:  # DatabaseUnavailable while the server is down
                failed.append((i, exc.code))
                time.sleep(0.05)
            else:
                acked.append(i)

    worker = threading.Thread(target=ingest)
    worker.start()
    server = postgres_db.server
    try:
        _wait(lambda: len(acked) >= 50)
        server.restart()  # a quick restart: the in-flight call is retried (ingest is idempotent)
        after = len(acked)
        _wait(lambda: len(acked) >= after + 100)  # it reconnected and goes on
        server.stop()  # a longer outage: calls fail, and say so
        try:
            _wait(lambda: len(failed) >= 3)
        finally:
            server.start()
        after = len(acked)
        _wait(lambda: len(acked) >= after + 100)
    finally:
        stop.set()
        worker.join(TIMEOUT_S)
    assert not worker.is_alive()
    tried = len(acked) + len(failed)
    assert sorted(acked + [i for i, _ in failed]) == list(range(tried))  # each one accounted for
    assert failed and {code for _, code in failed} == {"database_unavailable"}
    rows = store.engine.read(lambda c: c.execute("SELECT key, digest FROM records").fetchall())
    stored = {str(k): str(d) for k, d in rows}
    for i in acked:  # acknowledged means stored, with the bytes that were sent
        assert stored[f"k{i}"] == record_digest(topic, b'{"i": %d}' % i)
    # Whatever else is there was sent by a call that raised (it may have committed before the
    # connection broke: the caller resends, and the digest makes the resend a duplicate).
    assert set(stored) - {f"k{i}" for i in acked} <= {f"k{i}" for i, _ in failed}
    store.close()


async def test_http_intake_answers_503_while_the_database_is_down_then_stores(
    postgres_db: PostgresDatabase,
    aiohttp_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device posting over HTTP during an outage is told to retry (503, a stable code), not
    told "stored"; its retry after the restart is stored once."""
    monkeypatch.setattr(pg_engine, "ACQUIRE_TIMEOUT_S", 0.5)
    settings = PlatformSettings(data_dir=tmp_path / "plat", database_url=postgres_db.url)
    client = await aiohttp_client(create_app(settings))
    op = {"Authorization": f"Bearer {settings.token_file.read_text().strip()}"}
    resp = await client.post("/v1/devices", json={"id": "dev-1", "labels": {}}, headers=op)
    dev = {"Authorization": f"Bearer {(await resp.json())['token']}"}
    rec = {"key": "k-1", "kind": "events", "topic": topics.device_topic("dev-1", "events"),
           "payload": json.dumps({"n": 1})}  # fmt: skip
    # Authorised once while the database is up: the short cache carries the identity over.
    assert (await client.get("/v1/devices/dev-1/desired", headers=dev)).status == 200
    server = postgres_db.server
    server.stop()
    try:
        down = await client.post("/v1/devices/dev-1/records", json={"records": [rec]}, headers=dev)
        assert down.status == 503, await down.text()
        assert (await down.json())["error"]["code"] == "database_unavailable"
    finally:
        server.start()
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # bounded: the pool reconnects in the background
        up = await client.post("/v1/devices/dev-1/records", json={"records": [rec]}, headers=dev)
        if up.status != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert up.status == 200, await up.text()
    assert await up.json() == {"stored": 1, "duplicates": 0}

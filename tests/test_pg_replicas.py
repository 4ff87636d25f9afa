"""Two platform instances (`create_app`, each its own data dir) on one PostgreSQL database, as two
replicas behind a load balancer: one operator token, a device enrolled through one is accepted by
the other at once, records sent to either are stored once and visible from both, and a
revocation through one is refused by the other."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cloud_sync import topics
from cloud_sync.director_check import unverified_document
from cloud_sync.platform import device_auth
from cloud_sync.platform.server import create_app
from cloud_sync.platform.settings import PlatformSettings
from tests.postgres import PostgresDatabase


def _op(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_two_replicas_share_tokens_devices_and_records(
    postgres_db: PostgresDatabase,
    aiohttp_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # postgres_db first: torn down last, after the apps closed their pools.
    monkeypatch.setattr(device_auth, "CACHE_TTL_S", 0.5)  # the real 5 s would only slow this
    clients: list[TestClient[Any, Any]] = []
    tokens: list[str] = []
    for name in ("a", "b"):
        settings = PlatformSettings(data_dir=tmp_path / name, database_url=postgres_db.url)
        clients.append(await aiohttp_client(create_app(settings)))
        tokens.append(settings.token_file.read_text().strip())
    a, b = clients
    assert tokens[0] == tokens[1]  # B took A's token from the database and wrote its own file
    op = _op(tokens[0])
    resp = await a.post("/v1/devices", json={"id": "dev-1", "labels": {}}, headers=op)
    assert resp.status == 201, await resp.text()
    dev = {"Authorization": f"Bearer {(await resp.json())['token']}"}
    # Enrolled through A, accepted by B straight away (B never cached anything about it).
    assert (await b.get("/v1/devices/dev-1/desired", headers=dev)).status == 200
    assert (await b.post("/v1/devices", json={"id": "dev-1"}, headers=op)).status == 409
    rec = {"key": "k-1", "kind": "events", "topic": topics.device_topic("dev-1", "events"),
           "payload": json.dumps({"n": 1})}  # fmt: skip
    first = await a.post("/v1/devices/dev-1/records", json={"records": [rec]}, headers=dev)
    assert await first.json() == {"stored": 1, "duplicates": 0}
    again = await b.post("/v1/devices/dev-1/records", json={"records": [rec]}, headers=dev)
    assert await again.json() == {"stored": 0, "duplicates": 1}  # once, across replicas
    listed = await (await b.get("/v1/devices/dev-1/records", headers=op)).json()
    assert [r["value"] for r in listed["records"]] == [{"n": 1}]
    # Config set through B is the next version seen from A.
    resp = await b.post("/v1/devices/dev-1/config", json={"set": {"log_level": "debug"}},
                        headers=op)  # fmt: skip
    assert resp.status == 200, await resp.text()
    desired = await (await a.get("/v1/devices/dev-1/desired", headers=dev)).json()
    assert (unverified_document(desired["device"]) or {})["version"] == 1  # signed by the director
    # Revoked through B: refused by B at once, by a replica that never cached it at once, and
    # by A (which cached "dev-1" a moment ago) once that short-lived answer expired.
    assert (await b.post("/v1/devices/dev-1/revoke", headers=op)).status == 200
    assert (await b.get("/v1/devices/dev-1/desired", headers=dev)).status == 403
    c_settings = PlatformSettings(data_dir=tmp_path / "c", database_url=postgres_db.url)
    c = await aiohttp_client(create_app(c_settings))
    assert (await c.get("/v1/devices/dev-1/desired", headers=dev)).status == 403
    deadline = time.monotonic() + 30
    while (await a.get("/v1/devices/dev-1/desired", headers=dev)).status != 403:
        assert time.monotonic() < deadline, "A kept accepting a revoked token"
        await asyncio.sleep(0.05)

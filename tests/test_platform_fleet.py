"""The platform's device API in-process: enrolment, device identity, HTTP intake, config; on
SQLite and on PostgreSQL (the `backend` fixture)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cloud_sync import credentials, topics
from cloud_sync.director_check import director_gate
from cloud_sync.platform.fleet_store import FleetStore, apply_assignments, parse_assignments
from cloud_sync.platform.server import create_app
from cloud_sync.platform.settings import PlatformSettings
from tests.platform_backends import Backend


@pytest.fixture
async def platform(
    backend: Backend, aiohttp_client: Any, tmp_path: Path
) -> tuple[TestClient[Any, Any], str]:
    """The platform in-process on each backend (SQLite files, or PostgreSQL). `backend` first:
    its database is dropped after the app's cleanup closed the pool."""
    settings = PlatformSettings(data_dir=tmp_path / "plat", database_url=backend.database_url)
    app = create_app(settings)
    client = await aiohttp_client(app)
    token = settings.token_file.read_text().strip()
    return client, token


def _op(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _enroll(client: TestClient[Any, Any], token: str, device: str, **labels: str) -> Any:
    resp = await client.post(
        "/v1/devices", json={"id": device, "labels": labels}, headers=_op(token)
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_enrol_issues_credentials_the_agent_accepts(
    platform: tuple[TestClient[Any, Any], str], tmp_path: Path
) -> None:
    client, token = platform
    doc = await _enroll(client, token, "edge-01", group="west")
    creds = credentials.from_dict(doc)
    assert creds.device_id == "edge-01"
    assert doc["groups"] == ["west"] and doc["token"]
    again = await client.post("/v1/devices", json={"id": "edge-01"}, headers=_op(token))
    assert again.status == 409
    anonymous = await client.post("/v1/devices", json={"id": "edge-02"})
    assert anonymous.status == 401
    reserved = await client.post("/v1/devices", json={"id": "edgefn-platform"}, headers=_op(token))
    assert reserved.status == 400


async def test_device_token_reaches_only_its_own_subtree(
    platform: tuple[TestClient[Any, Any], str],
) -> None:
    client, token = platform
    a = await _enroll(client, token, "dev-a")
    await _enroll(client, token, "dev-b")
    dev = {"Authorization": f"Bearer {a['token']}"}
    assert (await client.get("/v1/devices/dev-a/desired", headers=dev)).status == 200
    assert (await client.get("/v1/devices/dev-b/desired", headers=dev)).status == 403
    assert (await client.get("/v1/devices", headers=dev)).status == 403  # operator only
    # A record for another device's topic, posted to its own endpoint, is refused too.
    rec = {"key": "k", "kind": "events", "topic": topics.device_topic("dev-b", "events"),
           "payload": "{}"}  # fmt: skip
    resp = await client.post("/v1/devices/dev-a/records", json={"records": [rec]}, headers=dev)
    assert resp.status == 403
    # Revoked: the token stops working.
    assert (await client.post("/v1/devices/dev-a/revoke", headers=_op(token))).status == 200
    assert (await client.get("/v1/devices/dev-a/desired", headers=dev)).status == 403


async def test_http_intake_stores_each_record_once(
    platform: tuple[TestClient[Any, Any], str],
) -> None:
    client, token = platform
    a = await _enroll(client, token, "dev-a")
    dev = {"Authorization": f"Bearer {a['token']}"}
    metrics = {
        "schema": "edgefn.metrics/1", "device": "dev-a", "interval_start": 1.0,
        "interval_end": 2.0, "samples": 1,
        "functions": {"echo": {"invocations": 7, "errors": 1, "cache_hits": 2,
                               "cache_misses": 5}},
    }  # fmt: skip
    rec = {"key": "key-1", "kind": "metrics", "topic": topics.device_topic("dev-a", "metrics"),
           "payload": json.dumps(metrics)}  # fmt: skip
    first = await client.post("/v1/devices/dev-a/records", json={"records": [rec]}, headers=dev)
    assert await first.json() == {"stored": 1, "duplicates": 0}
    # The same record again, and again under another key (an MQTT 3.1.1 copy has none): once.
    again = await client.post("/v1/devices/dev-a/records", json={"records": [rec]}, headers=dev)
    assert await again.json() == {"stored": 0, "duplicates": 1}
    other_key = {**rec, "key": "key-2"}
    resp = await client.post(
        "/v1/devices/dev-a/records", json={"records": [other_key]}, headers=dev
    )
    assert await resp.json() == {"stored": 0, "duplicates": 1}
    summary = await (await client.get("/v1/devices/dev-a/metrics", headers=_op(token))).json()
    assert summary["functions"]["echo"]["invocations"] == 7
    assert summary["functions"]["echo"]["cache_hit_ratio"] == pytest.approx(2 / 7, abs=1e-3)
    listed = await (await client.get("/v1/devices", headers=_op(token))).json()
    (device,) = listed["devices"]
    assert device["online"] is True  # seen over HTTP just now
    assert set(device) >= {"id", "online", "last_seen", "labels", "functions", "config_version"}


async def test_config_set_bumps_version_and_rejects_bad_values(
    platform: tuple[TestClient[Any, Any], str], tmp_path: Path
) -> None:
    client, token = platform
    a = await _enroll(client, token, "dev-a")
    ok = await client.post(
        "/v1/devices/dev-a/config",
        json={"set": {"functions.echo.pool.max_instances": 3, "log_level": "debug"}},
        headers=_op(token),
    )
    assert (await ok.json())["version"] == 1
    bad = await client.post(
        "/v1/devices/dev-a/config",
        json={"set": {"functions.echo.routing": "sideways"}},
        headers=_op(token),
    )
    assert bad.status == 422
    assert "routing" in json.dumps(await bad.json())
    desired = await (
        await client.get(
            "/v1/devices/dev-a/desired", headers={"Authorization": f"Bearer {a['token']}"}
        )
    ).json()
    # A director instruction (docs/update-security.md) the device checks with its enrolment key.
    gate = director_gate("dev-a", a["director_key"], tmp_path / "gate", required=True)
    doc, _ = gate.screen("device", desired["device"])
    assert doc == {
        "version": 1,
        "config": {"functions": {"echo": {"pool": {"max_instances": 3}}}, "log_level": "debug"},
    }


def test_assignments_parse_json_values_and_null_removes() -> None:
    sets = parse_assignments(["a.b=3", "a.c=text", "d=null", 'e={"x": true}'])
    assert sets == {"a.b": 3, "a.c": "text", "d": None, "e": {"x": True}}
    config = apply_assignments({"d": 1, "a": {"z": 1}}, sets)
    assert config == {"a": {"z": 1, "b": 3, "c": "text"}, "e": {"x": True}}
    with pytest.raises(ValueError):
        parse_assignments(["novalue"])


def test_store_dedupes_on_key_or_digest(backend: Backend) -> None:
    store = FleetStore(backend.engine("fleet.db"))
    store.enroll("d", {}, "tok", 1)
    topic = topics.device_topic("d", "events")
    assert store.ingest("d", "events", topic, b'{"a":1}', key="k1", via="mqtt")
    assert not store.ingest("d", "events", topic, b'{"a":2}', key="k1", via="http")  # same key
    assert not store.ingest("d", "events", topic, b'{"a":1}', key=None, via="mqtt")  # same bytes
    assert store.ingest("d", "events", topic, b'{"a":3}', key=None, via="mqtt")
    assert store.record_counts("d") == {"events": 2}
    store.close()


def test_store_under_concurrent_intake_and_queries(backend: Backend) -> None:
    """Intake threads write while query threads read (the platform's to_thread pattern): every
    record is stored once, queries never fail, and a reopened store has everything."""
    store = FleetStore(backend.engine("fleet.db"))
    for d in ("d1", "d2"):
        store.enroll(d, {}, f"tok-{d}", 1)
    topic = {d: topics.device_topic(d, "events") for d in ("d1", "d2")}
    errors: list[BaseException] = []
    new: list[bool] = []

    def intake(device: str) -> None:
        try:
            for i in range(50):
                payload = b'{"i": %d}' % i
                # The same record twice, by both paths: stored once.
                new.append(
                    store.ingest(device, "events", topic[device], payload, key=None, via="mqtt")
                )
                new.append(
                    store.ingest(device, "events", topic[device], payload, key=None, via="http")
                )
        except BaseException as exc:
            errors.append(exc)

    seen_counts: list[int] = []

    def query() -> None:
        try:
            for _ in range(50):
                counts = store.record_counts("d1")
                seen_counts.append(counts.get("events", 0))
                store.describe()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=intake, args=(d,)) for d in ("d1", "d2")]
    threads += [threading.Thread(target=query) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert new.count(True) == 100 and new.count(False) == 100
    assert all(0 <= n <= 50 for n in seen_counts)
    assert store.record_counts("d1") == {"events": 50}
    store.close()
    again = FleetStore(backend.engine("fleet.db"))
    try:
        assert again.record_counts("d2") == {"events": 50}
        assert {d["id"] for d in again.describe()} == {"d1", "d2"}
    finally:
        again.close()

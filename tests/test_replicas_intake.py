"""Two platform replicas (real processes) on one Mosquitto share device traffic through MQTT 5
shared subscriptions: every record a device sends is stored exactly once across them.

The replicas keep their state in one real PostgreSQL (`--database`), which also holds the
leader lease; they share the data dir only for the platform CA the broker trusts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mosquitto import Broker, eventually
from tests.postgres import PostgresDatabase
from tests.registry_helpers import Platform
from tests.replica_helpers import (
    call,
    enrol,
    leaders,
    replica_view,
    send_metrics,
    start_replica,
    wait_subscribed,
)

pytestmark = pytest.mark.slow
DEVICES = 4
PER_DEVICE = 30


@pytest.fixture
def replicas(mosquitto: Broker, postgres_db: PostgresDatabase) -> Iterator[list[Platform]]:
    data = mosquitto.workdir / "platform"
    started: list[Platform] = []
    try:
        for name in ("a", "b"):
            started.append(start_replica(data, mosquitto, postgres_db.url, name))
        yield started
    finally:
        for p in started:
            p.stop()


def _stored_numbers(plat: Platform, device: str) -> list[int]:
    """Which of the device's records are stored (each carries its number + 1 as invocations)."""
    doc = call(plat, "GET", f"/v1/devices/{device}/records?kind=metrics&limit=1000")
    return [int(r["value"]["functions"]["echo"]["invocations"]) - 1 for r in doc["records"]]


async def test_each_record_reaches_exactly_one_replica(
    replicas: list[Platform], tmp_path: Path
) -> None:
    a, b = replicas
    await wait_subscribed(a, b)
    views = [await replica_view(p) for p in replicas]
    assert [v["mqtt"]["shared"] for v in views] == [True, True]
    assert {v["mqtt"]["client_id"] for v in views} == {"edgefn-platform-a", "edgefn-platform-b"}
    await eventually(lambda: _one_leader(replicas), 20, "one leader")

    devices = [await asyncio.to_thread(enrol, a, f"dev-{i}") for i in range(DEVICES)]
    sent = await asyncio.gather(*(send_metrics(c, PER_DEVICE) for c in devices))
    total = DEVICES * PER_DEVICE

    async def all_counted() -> bool:
        views = [await replica_view(p) for p in replicas]
        return sum(v["mqtt"]["stored"] + v["mqtt"]["duplicates"] for v in views) >= total

    await eventually(all_counted, 60, f"{total} records taken in")
    await asyncio.sleep(0.5)  # a second copy, were there one, would arrive meanwhile
    views = [await replica_view(p) for p in replicas]
    stored = [v["mqtt"]["stored"] for v in views]
    duplicates = [v["mqtt"]["duplicates"] for v in views]
    # Each message went to one replica (no copy for the other: no duplicates at all), and the
    # broker spread them over both.
    assert sum(stored) == total, (stored, duplicates)
    assert duplicates == [0, 0]
    assert all(n > 0 for n in stored), stored
    # And the shared store has every record once, whichever replica is asked.
    for creds, keys in zip(devices, sent, strict=True):
        for plat in replicas:
            got = await asyncio.to_thread(_stored_numbers, plat, creds.device_id)
            assert sorted(got) == list(range(PER_DEVICE)), keys


async def test_without_shared_subscriptions_both_replicas_get_every_record(
    mosquitto: Broker, postgres_db: PostgresDatabase
) -> None:
    """The control: the same two replicas without `$share/` each receive every message (the
    store's de-duplication then drops the second copy) -- what shared subscriptions avoid."""
    data = mosquitto.workdir / "platform"
    started = [
        start_replica(data, mosquitto, postgres_db.url, n, "--no-shared-subscriptions")
        for n in ("a", "b")
    ]
    try:
        await wait_subscribed(*started)
        creds = await asyncio.to_thread(enrol, started[0], "dev-x")
        await send_metrics(creds, 10)

        async def both_saw_all() -> bool:
            views = [await replica_view(p) for p in started]
            return all(v["mqtt"]["stored"] + v["mqtt"]["duplicates"] == 10 for v in views)

        await eventually(both_saw_all, 60, "both replicas saw all 10 records")
        views = [await replica_view(p) for p in started]
        assert sum(v["mqtt"]["stored"] for v in views) == 10
        assert sum(v["mqtt"]["duplicates"] for v in views) == 10
    finally:
        for p in started:
            p.stop()


async def test_postgres_restarted_under_load_loses_nothing_the_broker_acknowledged(
    replicas: list[Platform], postgres_db: PostgresDatabase
) -> None:
    """Records the broker acknowledged to devices while PostgreSQL was down are stored once it
    is back (the replicas reconnect and retry the messages they hold), and one replica leads."""
    await wait_subscribed(*replicas)
    devices = [await asyncio.to_thread(enrol, replicas[0], f"pg-{i}") for i in range(2)]
    await asyncio.gather(*(send_metrics(c, 10) for c in devices))
    for creds in devices:
        await eventually(
            lambda c=creds: len(_stored_numbers(replicas[1], c.device_id)) == 10, 60, "stored"
        )
    await asyncio.to_thread(postgres_db.server.stop, "immediate")
    try:
        # Acknowledged by the broker (each publish waits for its PUBACK) with the store down.
        await asyncio.gather(*(send_metrics(c, 10, first=10) for c in devices))
        await eventually(lambda: _no_leader(replicas), 30, "nobody leads without PostgreSQL")
        # Long enough that storing fails (not just waits for a connection): a replica holds
        # messages it could not store, and tries them again.
        await eventually(lambda: _retrying(replicas), 60, "a replica retrying a message")
    finally:
        await asyncio.to_thread(postgres_db.server.start)
    for creds in devices:
        await eventually(
            lambda c=creds: len(_stored_numbers(replicas[0], c.device_id)) >= 20, 90, "stored"
        )
        got = await asyncio.to_thread(_stored_numbers, replicas[1], creds.device_id)
        assert sorted(got) == list(range(20))
    await eventually(lambda: _one_leader(replicas), 30, "one leader again")


async def _retrying(replicas: list[Platform]) -> bool:
    views = [await replica_view(p) for p in replicas]
    return any(v["mqtt"]["retries"] > 0 for v in views)


async def _no_leader(replicas: list[Platform]) -> bool:
    return not await leaders(*replicas)


async def _one_leader(replicas: list[Platform]) -> bool:
    return len(await leaders(*replicas)) == 1

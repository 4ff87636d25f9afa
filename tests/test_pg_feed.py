"""The rollout feed on PostgreSQL, where record ids do not commit in order: a transaction in
flight holding a lower id must not be stepped over, and a gap nobody fills (a rolled-back
insert) must not stop the feed for good."""

from __future__ import annotations

import time

import psycopg
import pytest

from cloud_sync.platform import rollout_feed
from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.rollout_feed import RecordFeed
from cloud_sync.platform.sql import Borrowed
from cloud_sync.platform.sql.pg_engine import PgEngine
from cloud_sync.rollout.messages import StatusReport
from cloud_sync.rollout.states import DeviceState
from tests.postgres import PostgresDatabase


def _report(seq: int) -> bytes:
    return StatusReport("d1", "resize", "r-1", "1.4.0", DeviceState.HEALTHY, seq, 10.0).to_json()


def _insert(conn: psycopg.Connection[tuple[object, ...]], seq: int) -> int:
    row = conn.execute(
        "INSERT INTO records (key, digest, device, kind, via, received_at, payload)"
        " VALUES (%s, %s, 'd1', 'rollout', 'mqtt', %s, %s) RETURNING id",
        (f"k{seq}", f"digest-{seq}", time.time(), _report(seq)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _read_until(feed: RecordFeed, after: int, want: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = feed.read(after)
        if batch.last_id >= want:
            return batch.last_id
        time.sleep(0.05)
    raise AssertionError(f"the feed did not pass id {want}")


def test_feed_waits_for_a_lower_id_still_in_flight_then_passes_a_dead_gap(
    postgres_db: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = PgEngine(postgres_db.url)
    fleet = FleetStore(Borrowed(engine))
    feed = RecordFeed(engine)
    slow = psycopg.connect(postgres_db.url)
    fast = psycopg.connect(postgres_db.url, autocommit=True)
    try:
        first = _insert(fast, 1)
        low = _insert(slow, 2)  # taken, not committed (slow is in a transaction)
        high = _insert(fast, 3)
        assert first < low < high
        batch = feed.read(0)
        assert batch.last_id == first  # stops before the id still in flight
        assert [r.seq for r in batch.reports] == [1]
        again = feed.read(batch.last_id)
        assert again.last_id == first and again.reports == []
        slow.commit()
        batch = feed.read(first)
        assert batch.last_id == high and [r.seq for r in batch.reports] == [2, 3]
        # A rolled-back insert leaves a hole for good: passed once it is old.
        monkeypatch.setattr(rollout_feed, "GAP_WAIT_S", 0.3)
        _insert(slow, 4)
        slow.rollback()
        last = _insert(fast, 5)
        assert _read_until(feed, high, last) == last
    finally:
        slow.close()
        fast.close()
        fleet.close()
        engine.close()

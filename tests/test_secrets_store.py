"""The platform's secret store on both backends (`backend`: its own SQLite file, or the shared
PostgreSQL database): versions per name only grow, also with two stores (two replicas) setting
one name at once; device keys and acknowledgements are shared; a secrets.db from before the SQL
seam opens with its rows and counts on from its versions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cloud_sync.platform.secret_store import MIGRATIONS, SecretStore
from tests.platform_backends import Backend
from tests.threads import in_threads

ROUNDS = 10  # per thread, bounded
THREADS = 4


def _store(backend: Backend) -> SecretStore:
    return SecretStore(backend.engine("secrets.db"))


def test_rows_keys_and_acks_survive_reopening(backend: Backend) -> None:
    store = _store(backend)
    try:
        assert store.set("api-key", "group", "north", {"b": "1"}, 5) == 1
        assert store.set("api-key", "device", "edge-01", {"b": "2"}, 5) == 2
        store.register_key("edge-01", "PEM-1")
        store.register_key("edge-01", "PEM-2")  # re-enrolled: the new key replaces the old
        store.ack("edge-01", {"api-key": 2})
    finally:
        store.close()
    again = _store(backend)  # a restarted platform, or another replica
    try:
        assert again.set("api-key", "group", "north", {"b": "3"}, 5) == 3
        assert again.set("other", "device", "edge-01", {"b": "4"}, 1) == 1
        mine = again.for_device("edge-01", ["north"])
        assert {n: (r.scope, r.version, r.sealed) for n, r in mine.items()} == {
            "api-key": ("device", 2, {"b": "2"}),
            "other": ("device", 1, {"b": "4"}),
        }
        assert again.for_device("edge-02", ["north"])["api-key"].version == 3
        assert [r.listing()["version"] for r in again.rows()] == [2, 3, 1]
        assert again.device_key("edge-01") == "PEM-2" and again.device_key("edge-02") is None
        assert again.acks() == {"api-key": {"edge-01": 2}}
        again.ack("edge-01", {"other": 1})  # what it holds now: api-key is forgotten
        assert again.acks() == {"other": {"edge-01": 1}}
    finally:
        again.close()


def test_two_stores_setting_one_name_at_once_never_share_a_version(backend: Backend) -> None:
    stores = [_store(backend), _store(backend)]

    def set_one(i: int, r: int) -> int:
        # Half the threads share one target, half have their own: both must count on.
        target = "north" if i % 2 else f"edge-{i}"
        scope = "group" if i % 2 else "device"
        return stores[i % 2].set("api-key", scope, target, {"b": f"{i}-{r}"}, 3)

    try:
        got = in_threads(THREADS, ROUNDS, set_one)
        for mine in got:
            assert mine == sorted(mine) and len(set(mine)) == ROUNDS
        assert sorted(v for mine in got for v in mine) == list(range(1, THREADS * ROUNDS + 1))
        # The stored row of the shared target is its last set: the highest version it got.
        north = max(v for i, mine in enumerate(got) if i % 2 for v in mine)
        assert stores[0].for_device("edge-x", ["north"])["api-key"].version == north
    finally:
        for s in stores:
            s.close()


def test_a_secrets_db_from_before_migrations_counts_on_from_its_versions(tmp_path: Path) -> None:
    path = tmp_path / "secrets.db"
    with sqlite3.connect(path) as conn:  # what SecretStore used to create itself
        conn.executescript(MIGRATIONS[0].sqlite)
        conn.execute(
            "INSERT INTO secrets VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("api-key", "group", "north", 7, '{"b": "old"}', 3, 1.0),
        )
    conn.close()
    store = SecretStore(path)
    try:
        assert store.for_device("edge-01", ["north"])["api-key"].sealed == {"b": "old"}
        assert store.set("api-key", "device", "edge-01", {"b": "new"}, 3) == 8
        assert store.set("fresh", "device", "edge-01", {"b": "x"}, 1) == 1
    finally:
        store.close()

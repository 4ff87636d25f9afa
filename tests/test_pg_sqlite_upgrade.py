"""Data dirs from before the SQL seam open unchanged: their tables already exist (made by the old
`CREATE TABLE IF NOT EXISTS` scripts, and registry.db by sqlite-utils), and migration step 1 of
each store is recorded as applied without touching a row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from cloud_sync.platform.fleet_schema import MIGRATIONS as FLEET_MIGRATIONS
from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.store import LocalStore


def test_an_old_fleet_db_opens_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with sqlite3.connect(path) as conn:  # what FleetStore used to create itself
        conn.executescript(FLEET_MIGRATIONS[0].sqlite)
        conn.execute(
            "INSERT INTO devices (id, token_hash, cert_serial, enrolled_at) VALUES (?, ?, ?, ?)",
            ("old-1", "h", "5", 1.0),
        )
    store = FleetStore(path)
    try:
        assert store.device_ids() == ["old-1"]
        assert store.ingest("old-1", "events", "t", b"{}", key="k", via="http")
        steps = store.engine.read(
            lambda c: c.execute("SELECT component, version FROM schema_migrations").fetchall()
        )
        assert [tuple(s) for s in steps] == [("fleet", 1)]
    finally:
        store.close()


def test_a_registry_db_made_by_sqlite_utils_opens_with_its_versions(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    db = sqlite_utils.Database(path)  # exactly what LocalStore's schema step used to do
    versions = db.table("versions")
    versions.create(
        {"name": str, "version": str, "digest": str, "size": int, "runtime": str,
         "arches": str, "publisher": str, "created_at": str, "published_at": str},
        pk=("name", "version"),
    )  # fmt: skip
    versions.create_index(["digest"])
    versions.insert(
        {"name": "resize", "version": "1.0.0", "digest": "a" * 64, "size": 1, "runtime": "node",
         "arches": "[]", "publisher": "k", "created_at": "c", "published_at": "p"}
    )  # fmt: skip
    before = {r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")}
    db.close()
    store = LocalStore(path, tmp_path / "blobs")
    try:
        got = store.get_version("resize", "1.0.0")
        assert got is not None and got.digest == "a" * 64
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        after = {r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")}
    # Nothing of the old schema changed; only the migrations table was added.
    assert before <= after
    assert [s for s in after - before if "schema_migrations" not in s] == []

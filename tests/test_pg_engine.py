"""The SQL engine seam on both backends: migrations (also two replicas migrating one empty
PostgreSQL database at once), the error tree, placeholders, and a token issued through one
store instance accepted by another on the same database."""

from __future__ import annotations

import threading

import pytest

from cloud_sync.platform.fleet_store import FleetStore, token_hash
from cloud_sync.platform.sql import Borrowed, Conn, IntegrityError, Migration, SqlError
from cloud_sync.platform.sql.pg_engine import PgEngine, redact, to_pyformat
from tests.platform_backends import Backend
from tests.postgres import PostgresDatabase

_STEPS = (
    Migration(
        1,
        "t",
        "CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
        "CREATE TABLE t (k TEXT PRIMARY KEY, v BIGINT NOT NULL)",
    ),
    Migration(
        2, "t.note", "ALTER TABLE t ADD COLUMN note TEXT", "ALTER TABLE t ADD COLUMN note TEXT"
    ),
)


def test_migrations_apply_once_in_order_and_resume(backend: Backend) -> None:
    engine = backend.engine("m.db")
    engine.migrate("demo", _STEPS[:1])
    engine.write(lambda c: c.execute("INSERT INTO t (k, v) VALUES (?, ?)", ("a", 1)))
    engine.close()
    again = backend.engine("m.db")  # a restart with a newer release: only step 2 runs
    again.migrate("demo", _STEPS)
    again.migrate("demo", _STEPS)  # nothing left to do
    rows = again.read(
        lambda c: c.execute(
            "SELECT version, name FROM schema_migrations WHERE component=? ORDER BY version",
            ("demo",),
        ).fetchall()
    )
    assert [tuple(r) for r in rows] == [(1, "t"), (2, "t.note")]
    assert again.read(lambda c: c.execute("SELECT k, v, note FROM t").fetchall()) == [
        ("a", 1, None)
    ]
    with pytest.raises(SqlError):
        again.migrate("bad", (_STEPS[1],))  # numbered from 2: refused before touching anything


def test_errors_and_transactions_are_the_same_on_both(backend: Backend) -> None:
    engine = backend.engine("e.db")
    engine.migrate("demo", _STEPS)
    engine.write(lambda c: c.execute("INSERT INTO t (k, v) VALUES (?, ?)", ("a", 1)))

    def two(c: Conn) -> None:
        c.execute("INSERT INTO t (k, v) VALUES (?, ?)", ("b", 2))
        c.execute("INSERT INTO t (k, v) VALUES (?, ?)", ("a", 3))  # duplicate key

    with pytest.raises(IntegrityError):
        engine.write(two)
    # The whole transaction rolled back: "b" is not there either.
    assert engine.read(lambda c: c.execute("SELECT k FROM t ORDER BY k").fetchall()) == [("a",)]

    class Mine(Exception):
        pass

    def fails(c: Conn) -> None:
        c.execute("UPDATE t SET v=? WHERE k=?", (9, "a"))
        raise Mine

    with pytest.raises(Mine):  # the store's own exceptions pass through unchanged
        engine.write(fails)
    assert engine.read(lambda c: c.execute("SELECT v FROM t").fetchone()) == (1,)
    # A literal % and a ? inside quotes survive the placeholder translation.
    got = engine.read(lambda c: c.execute("SELECT '100%?', ? || 'x'", ("y",)).fetchone())
    assert tuple(got) == ("100%?", "yx")


def test_placeholder_translation_and_redaction() -> None:
    assert to_pyformat("SELECT ? , 'a?%' WHERE x LIKE '%b' AND y=?") == (
        "SELECT %s , 'a?%%' WHERE x LIKE '%%b' AND y=%s"
    )
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_two_replicas_migrating_one_empty_database_at_once(postgres_db: PostgresDatabase) -> None:
    """Both run every step under the advisory lock: each step applied exactly once, no error."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=30)

    def replica() -> None:
        try:
            engine = PgEngine(postgres_db.url)
            try:
                barrier.wait()
                FleetStore(Borrowed(engine)).close()  # the fleet schema, from nothing
                engine.migrate("demo", _STEPS)
            finally:
                engine.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    rows = postgres_db.server.psql(
        "SELECT component, version, COUNT(*) FROM schema_migrations"
        " GROUP BY component, version ORDER BY 1, 2",
        dbname=postgres_db.name,
    )
    assert rows.split() == ["demo|1|1", "demo|2|1", "fleet|1|1"]


def test_token_issued_on_one_replica_works_on_another(postgres_db: PostgresDatabase) -> None:
    a, b = FleetStore(PgEngine(postgres_db.url)), FleetStore(PgEngine(postgres_db.url))
    try:
        assert b.device_for_token(token_hash("tok-1")) is None
        a.enroll("dev-1", {"site": "x"}, "tok-1", 17)
        assert b.device_for_token(token_hash("tok-1")) == "dev-1"
        assert b.certificate_ok("dev-1", 17)
        assert b.revoke("dev-1") == 17
        assert a.device_for_token(token_hash("tok-1")) is None
        assert not a.certificate_ok("dev-1", 17)
    finally:
        a.close()
        b.close()

"""The shared PostgreSQL fixture itself: a real server, a fresh database per test, restartable."""

from __future__ import annotations

import psycopg

from tests.postgres import PostgresDatabase


def test_fresh_database_accepts_sql_and_survives_a_restart(postgres_db: PostgresDatabase) -> None:
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (41)")
    postgres_db.server.restart()
    with psycopg.connect(postgres_db.url) as conn:
        row = conn.execute(
            "SELECT v + 1, current_setting('server_version_num')::int FROM t"
        ).fetchone()
    assert row is not None
    assert row[0] == 42
    assert row[1] >= 150000  # PostgreSQL 15 or newer

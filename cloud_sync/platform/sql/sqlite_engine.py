"""`Engine` over `runtimes.sqlitedb.Database`: the embedded default, one WAL file per store.

Nothing changes for a SQLite deployment: the same writer thread runs each `write` in one
`BEGIN IMMEDIATE` transaction, reads run on per-thread connections in one snapshot. This class
only converts errors into the engine's tree and keeps `schema_migrations`. A file made before
migrations existed has the tables already; step 1 of every store is `IF NOT EXISTS`, so it is
recorded as applied without changing anything.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cloud_sync.platform.sql.engine import (
    Conn,
    Cursor,
    Dialect,
    IntegrityError,
    Migration,
    SqlError,
    T,
    check_migrations,
    split_script,
)
from runtimes.sqlitedb import Database, Synchronous

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL,
    PRIMARY KEY (component, version)
)
"""


class _SqliteConn:
    dialect: Dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)


def _converted(fn: Callable[[Conn], T]) -> Callable[[sqlite3.Connection], T]:
    def job(conn: sqlite3.Connection) -> T:
        try:
            return fn(_SqliteConn(conn))
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise SqlError(str(exc)) from exc

    return job


class SqliteEngine:
    dialect: Dialect = "sqlite"

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: Synchronous, name: str
    ) -> None:
        self.path = path
        self._db = Database(path, synchronous=synchronous, name=name)
        try:
            self._db.opened.result()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise SqlError(f"cannot open {path}: {exc}") from exc

    def read(self, fn: Callable[[Conn], T]) -> T:
        try:
            return self._db.read(_converted(fn))
        except sqlite3.Error as exc:  # opening the reader, BEGIN, COMMIT
            raise SqlError(str(exc)) from exc

    def write(self, fn: Callable[[Conn], T], *, idempotent: bool = False) -> T:
        del idempotent  # one local writer: a write never half-happens on a lost connection
        try:
            return self._db.write(_converted(fn))
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:  # BEGIN IMMEDIATE / COMMIT (busy, disk full)
            raise SqlError(str(exc)) from exc

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        """Apply the missing steps of `component`, all in one write transaction (the writer
        thread runs nothing else meanwhile; another process waits on the file lock)."""
        check_migrations(component, migrations)

        def apply(c: Conn) -> None:
            c.execute(_MIGRATIONS_TABLE)
            rows = c.execute(
                "SELECT version FROM schema_migrations WHERE component=?", (component,)
            ).fetchall()
            done = {int(v) for (v,) in rows}
            for step in migrations:
                if step.version in done:
                    continue
                for stmt in split_script(step.sqlite):
                    c.execute(stmt)
                c.execute(
                    "INSERT INTO schema_migrations (component, version, name, applied_at)"
                    " VALUES (?, ?, ?, ?)",
                    (component, step.version, step.name, time.time()),
                )

        self.write(apply)

    def close(self) -> None:
        self._db.close()

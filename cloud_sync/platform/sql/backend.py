"""Which engine the platform's stores run on, chosen once by `PlatformSettings.database_url`.

None (the default): SQLite, one file per store in the data dir, exactly the layout of before
(`fleet.db`, `rollouts.db`, `registry.db`). `postgresql://USER@HOST:PORT/DB`: one PostgreSQL
engine (one connection pool) shared by every store; each store gets it `Borrowed`, so closing a
store leaves the pool to `Databases.close()`, which the server calls after every store closed.
psycopg is imported only on that path: a SQLite deployment does not need it installed.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cloud_sync.platform.sql.engine import Borrowed, Engine, SqlError
from cloud_sync.platform.sql.sqlite_engine import SqliteEngine
from runtimes.sqlitedb import Synchronous

SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(url: str) -> bool:
    return url.startswith(SCHEMES)


class Databases:
    def __init__(self, database_url: str | None, data_dir: Path) -> None:
        self.url = database_url
        self.data_dir = Path(data_dir)
        self._shared: Engine | None = None
        self._lock = threading.Lock()
        if database_url is not None and not is_postgres_url(database_url):
            raise SqlError(
                f"unsupported database URL scheme in {database_url.split('://')[0]!r}:"
                " use postgresql://USER@HOST:PORT/DB (or none for SQLite in the data dir)",
                code="bad_database_url",
            )

    @property
    def dialect(self) -> str:
        return "sqlite" if self.url is None else "postgresql"

    def engine(self, filename: str, *, synchronous: Synchronous, name: str) -> Engine:
        """The engine a store opens: its own SQLite file, or the shared PostgreSQL pool."""
        if self.url is None:
            return SqliteEngine(self.data_dir / filename, synchronous=synchronous, name=name)
        return Borrowed(self.shared())

    def shared(self) -> Engine:
        """The one PostgreSQL engine (opened on first use). SQLite has no shared engine."""
        if self.url is None:
            raise SqlError("no shared engine: the platform runs on SQLite files")
        with self._lock:
            if self._shared is None:
                from cloud_sync.platform.sql.pg_engine import PgEngine

                self._shared = PgEngine(self.url)
            return self._shared

    def close(self) -> None:
        with self._lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()

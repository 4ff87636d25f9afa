"""Which engine the platform's stores run on, chosen once by `PlatformSettings.database_url`.

None (the default): SQLite, one file per store in the data dir, exactly the layout of before
(`fleet.db`, `rollouts.db`, `registry.db`), each store opening its own. With
`postgresql://USER@HOST:PORT/DB`: one PostgreSQL engine (one connection pool) shared by every
store; each gets it `Borrowed`, so closing a store leaves the pool to `Databases.close()`, which
the server calls after every store closed.
psycopg is imported only on that path: a SQLite deployment does not need it installed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cloud_sync.platform.sql.engine import Borrowed, Engine, SqlError

SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(url: str) -> bool:
    return url.startswith(SCHEMES)


def refuse_password_in_url(url: str) -> None:
    """For URLs given on a command line (where `ps` shows them to every user): no password."""
    parts = urlsplit(url)
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise SqlError(
            "the --database URL must not contain a password (every user sees command lines):"
            " set PGPASSWORD, EDGEFN_DATABASE_PASSWORD or EDGEFN_DATABASE_PASSWORD_FILE",
            code="password_in_url",
        )


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

    def borrowed(self) -> Engine | None:
        """What a store gets: None (it opens its own SQLite file, as always) or the shared
        PostgreSQL engine, `Borrowed` so that closing the store leaves the pool open."""
        return None if self.url is None else Borrowed(self.shared())

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

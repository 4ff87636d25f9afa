"""`Engine` over PostgreSQL: psycopg 3 with a `psycopg_pool.ConnectionPool`, shared by every store
of one platform process (and by every replica, each with its own pool, on one database).

Why these choices:

* **A pool, checked at checkout** (`ConnectionPool.check_connection`): after a server restart every
  pooled connection is dead; the check finds that before `fn` runs and the pool opens a new one, so
  a restart costs the operations that were in flight at that moment, not one failure per pooled
  connection afterwards.
* **Explicit transactions** on autocommit connections: `write` is `BEGIN` (READ COMMITTED) ...
  `COMMIT`; `read` is `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, one snapshot like SQLite's
  read transaction. Stores write each read-modify-write as one statement (`UPDATE ... RETURNING`,
  `ON CONFLICT DO UPDATE`), so READ COMMITTED loses no update between replicas.
* **Retry once, only where safe**: a connection that broke under `fn` (server restart,
  `terminating connection`) is retried once on a fresh connection for reads and for writes the
  store declared idempotent; a serialization failure or deadlock (the server rolled the whole
  transaction back) is retried once for any write. Everything else surfaces: `DatabaseUnavailable`
  when the server cannot be reached, `IntegrityError` for constraints, `SqlError` otherwise.
* **Migrations under `pg_advisory_xact_lock`**: two replicas starting on an empty database at once
  apply each step exactly once; the second waits for the first's transaction, then finds the steps
  recorded.

The password never travels on a command line: libpq reads `PGPASSWORD` / `PGPASSFILE` itself, and
`EDGEFN_DATABASE_PASSWORD` or `EDGEFN_DATABASE_PASSWORD_FILE` (a file, e.g. a systemd credential)
are passed to it here. `redact(url)` is what logs show.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from cloud_sync.platform.sql.engine import (
    Conn,
    Cursor,
    DatabaseUnavailable,
    Dialect,
    IntegrityError,
    Migration,
    SqlError,
    T,
    check_migrations,
    split_script,
)

log = logging.getLogger("edgefn.sql")

# How long an operation waits for a pooled connection (the server may be restarting).
ACQUIRE_TIMEOUT_S = 5.0
# How long start-up waits for the first connection before saying the database is unreachable.
OPEN_TIMEOUT_S = 10.0
POOL_MAX = 8
# One constant key for every edgefn schema change in this database.
MIGRATION_LOCK = int.from_bytes(
    hashlib.sha256(b"edgefn.schema_migrations").digest()[:8], "big", signed=True
)

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (component, version)
)
"""


def redact(url: str) -> str:
    """The URL without a password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def password_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """EDGEFN_DATABASE_PASSWORD, else the first line of EDGEFN_DATABASE_PASSWORD_FILE; None lets
    libpq use PGPASSWORD / PGPASSFILE / ~/.pgpass as it always does."""
    env = os.environ if env is None else env
    if env.get("EDGEFN_DATABASE_PASSWORD"):
        return env["EDGEFN_DATABASE_PASSWORD"]
    path = env.get("EDGEFN_DATABASE_PASSWORD_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise SqlError(
                f"EDGEFN_DATABASE_PASSWORD_FILE {path}: cannot read a password: {exc}",
                code="database_password",
            ) from exc
    return None


@functools.lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """`?` placeholders -> psycopg's `%s` (outside quotes); a literal `%` -> `%%`."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if ch == "%":
            out.append("%%")
            continue
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append(ch)
    return "".join(out)


class _PgConn:
    dialect: Dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(to_pyformat(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(to_pyformat(sql), [tuple(r) for r in rows])


class _Broken(Exception):
    """Internal: the connection died under `fn`; `cause` is what psycopg raised."""

    def __init__(self, cause: psycopg.Error) -> None:
        self.cause = cause


class _Rolledback(Exception):
    """Internal: serialization failure / deadlock: the server undid the whole transaction."""

    def __init__(self, cause: psycopg.Error) -> None:
        self.cause = cause


class PgEngine:
    dialect: Dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        max_size: int = POOL_MAX,
        acquire_timeout_s: float | None = None,
        open_timeout_s: float | None = None,
        name: str = "edgefn-pg",
    ) -> None:
        self.url = redact(url)
        # Defaults read now, not at import: tests (and a future setting) can change them.
        if acquire_timeout_s is None:
            acquire_timeout_s = ACQUIRE_TIMEOUT_S
        if open_timeout_s is None:
            open_timeout_s = OPEN_TIMEOUT_S
        self._acquire_timeout_s = acquire_timeout_s
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 5}
        if password is None:
            password = password_from_env()
        if password is not None:
            kwargs["password"] = password
        # One direct connection first: libpq's own reason (refused, no such database, password
        # failed) is a better error at start than the pool's "timed out" after retrying.
        try:
            psycopg.connect(url, **kwargs).close()
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())
            raise DatabaseUnavailable(f"cannot connect to {self.url}: {reason}") from exc
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs=kwargs,
            open=False,
            check=ConnectionPool.check_connection,
            timeout=acquire_timeout_s,
            name=name,
        )
        try:
            self._pool.open(wait=True, timeout=open_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise DatabaseUnavailable(
                f"cannot connect to {self.url} within {open_timeout_s:g} s"
                " (is the server running, the user allowed, the password set?)"
            ) from exc

    # -- running fn ---------------------------------------------------------------------------

    def _once(self, fn: Callable[[Conn], T], begin: str) -> T:
        try:
            with self._pool.connection(timeout=self._acquire_timeout_s) as conn:
                try:
                    conn.execute(begin)
                    result = fn(_PgConn(conn))
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    if not conn.closed:
                        with contextlib.suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
                    raise
        except PoolClosed as exc:
            raise SqlError(f"the engine for {self.url} is closed", code="database_closed") from exc
        except PoolTimeout as exc:
            raise DatabaseUnavailable(
                f"no connection to {self.url} within {self._acquire_timeout_s:g} s"
            ) from exc
        except psycopg.errors.IntegrityError as exc:
            raise IntegrityError(str(exc).strip()) from exc
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as exc:
            raise _Rolledback(exc) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise _Broken(exc) from exc
        except psycopg.Error as exc:
            raise SqlError(str(exc).strip()) from exc

    def _run(self, fn: Callable[[Conn], T], begin: str, *, retry_broken: bool) -> T:
        for attempt in (1, 2):
            try:
                return self._once(fn, begin)
            except _Broken as exc:
                if attempt == 2 or not retry_broken:
                    raise DatabaseUnavailable(
                        f"lost the connection to {self.url}: {str(exc.cause).strip()}"
                    ) from exc.cause
                log.info("connection to %s lost, retrying once: %s", self.url, exc.cause)
            except _Rolledback as exc:
                if attempt == 2:
                    raise SqlError(str(exc.cause).strip(), code="database_conflict") from exc.cause
        raise AssertionError("unreachable")

    def read(self, fn: Callable[[Conn], T]) -> T:
        return self._run(fn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", retry_broken=True)

    def write(self, fn: Callable[[Conn], T], *, idempotent: bool = False) -> T:
        return self._run(fn, "BEGIN", retry_broken=idempotent)

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        check_migrations(component, migrations)

        def apply(c: Conn) -> int:
            c.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            c.execute(_MIGRATIONS_TABLE)
            rows = c.execute(
                "SELECT version FROM schema_migrations WHERE component=?", (component,)
            ).fetchall()
            done = {int(v) for (v,) in rows}
            applied = 0
            for step in migrations:
                if step.version in done:
                    continue
                for stmt in split_script(step.postgresql):
                    c.execute(stmt)
                c.execute(
                    "INSERT INTO schema_migrations (component, version, name, applied_at)"
                    " VALUES (?, ?, ?, ?)",
                    (component, step.version, step.name, time.time()),
                )
                applied += 1
            return applied

        applied = self.write(apply, idempotent=True)  # it re-checks what is applied
        if applied:
            log.info("%s: applied %d schema migration(s) on %s", component, applied, self.url)

    def close(self) -> None:
        self._pool.close()

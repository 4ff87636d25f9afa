"""The SQL engine seam: what every platform store needs from a database, and nothing more.

A store (fleet, rollouts, registry metadata, operator accounts) is written once against
`Engine` and runs on SQLite (`sqlite_engine.py`, the embedded default, one file per store in the
data dir) or PostgreSQL (`pg_engine.py`, one pooled database shared by every replica). The
contract:

* `read(fn)` runs `fn(conn)` in one read snapshot; `write(fn)` runs it in one transaction that
  commits when `fn` returns and rolls back when it raises. `fn` may run more than once only when
  the caller said so (`idempotent=True`, or any read): a PostgreSQL connection that broke mid-way
  is retried once on a fresh one, because the first attempt may or may not have committed.
* SQL is portable: `?` placeholders (the PostgreSQL engine translates them), `ON CONFLICT`,
  `RETURNING`, no `INSERT OR IGNORE`, no SQLite-only functions. Where the backends differ (column
  types, identity columns) the schema migrations say it per backend (`Migration`).
* Errors come out as one tree whatever the backend: `IntegrityError` (a UNIQUE/PRIMARY KEY
  refused the row), `DatabaseUnavailable` (cannot reach the server; try later), `SqlError`
  (anything else). Exceptions `fn` raises itself pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from cloud_sync.errors import CloudSyncError

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]


class SqlError(CloudSyncError):
    code = "database_error"
    category = "storage"


class IntegrityError(SqlError):
    """A constraint refused the change (duplicate key); nothing of the transaction is kept."""

    code = "integrity_error"


class DatabaseUnavailable(SqlError):
    """The database cannot be reached (server down, restarting, pool exhausted): retry later.

    Whether a failed write committed is unknown to the caller; stores only retry what is safe."""

    code = "database_unavailable"
    status = 503  # what an HTTP handler it escapes answers: Service Unavailable, retry later


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Conn(Protocol):
    """The connection `fn` gets inside `read`/`write`: portable SQL with `?` placeholders."""

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step of one store, as a script per backend; `version` counts from 1.

    Applied in order at start, each once, recorded in `schema_migrations` (component, version).
    Never edit a released step: add the next one."""

    version: int
    name: str
    sqlite: str
    postgresql: str

    def script(self, dialect: Dialect) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


class Engine(Protocol):
    dialect: Dialect

    def read(self, fn: Callable[[Conn], T]) -> T: ...

    def write(self, fn: Callable[[Conn], T], *, idempotent: bool = False) -> T: ...

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None: ...

    def close(self) -> None: ...


class Borrowed:
    """An engine lent to a store that must not close it (the shared PostgreSQL pool): every
    call goes through, `close()` does nothing; the owner closes the engine itself."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.dialect: Dialect = engine.dialect

    def read(self, fn: Callable[[Conn], T]) -> T:
        return self._engine.read(fn)

    def write(self, fn: Callable[[Conn], T], *, idempotent: bool = False) -> T:
        return self._engine.write(fn, idempotent=idempotent)

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        self._engine.migrate(component, migrations)

    def close(self) -> None:
        return None


def split_script(script: str) -> list[str]:
    """The statements of a migration script: split at `;` outside quotes, blanks dropped."""
    out: list[str] = []
    current: list[str] = []
    quote: str | None = None
    for ch in script:
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == ";":
            stmt = "".join(current).strip()
            if stmt:
                out.append(stmt)
            current = []
            continue
        current.append(ch)
    tail = "".join(current).strip()
    if tail:
        out.append(tail)
    return out


def check_migrations(component: str, migrations: Sequence[Migration]) -> None:
    """Versions 1..n in order: a gap or a repeat is a programming error, caught at start."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise SqlError(f"{component}: migrations must be numbered 1..n in order, got {versions}")

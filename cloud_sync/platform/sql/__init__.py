"""The platform's SQL seam: one store class per concept, on SQLite (default) or PostgreSQL.

`engine.py` is the contract (`Engine`, `Conn`, `Migration`, the error tree); `sqlite_engine.py`
and `pg_engine.py` implement it; `backend.py` picks one from the settings. Only `pg_engine`
imports psycopg, and only `backend.Databases` imports `pg_engine`, when a PostgreSQL URL is set.
"""

from cloud_sync.platform.sql.backend import Databases, is_postgres_url, refuse_password_in_url
from cloud_sync.platform.sql.engine import (
    Borrowed,
    Conn,
    DatabaseUnavailable,
    Engine,
    IntegrityError,
    Migration,
    SqlError,
)
from cloud_sync.platform.sql.sqlite_engine import SqliteEngine

__all__ = [
    "Borrowed",
    "Conn",
    "DatabaseUnavailable",
    "Databases",
    "Engine",
    "IntegrityError",
    "Migration",
    "SqlError",
    "SqliteEngine",
    "is_postgres_url",
    "refuse_password_in_url",
]

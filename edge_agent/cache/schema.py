"""The result cache's schema and its migrations, in plain SQL.

Plain sqlite3 on purpose: the agent does not import sqlite-utils at all (it cost the agent
~3 MB of RSS the first time a cache opened, for one table). The statements create exactly what
sqlite-utils created for files made by earlier agents, so those files open unchanged.

`schema_version` holds one row (id 1) with the number of steps applied. Each step brings the
schema from version i to i + 1: append, never edit a released step.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from edge_agent.errors import AgentError
from runtimes.sqlitedb import transaction


class Incompatible(AgentError):
    """The file is a SQLite database, but not one we can use (newer schema, missing table).

    It never reaches a client: the cache goes degraded (every lookup a miss) and rebuilds.
    """

    code = "cache_incompatible"
    category = "storage"


def _m1_entries(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE "entries" (
   "key" TEXT PRIMARY KEY,
   "function" TEXT NOT NULL,
   "scope" TEXT NOT NULL,
   "value" BLOB NOT NULL,
   "content_type" TEXT NOT NULL,
   "created" REAL NOT NULL,
   "expires" REAL NOT NULL,
   "stale_until" REAL NOT NULL,
   "size" INTEGER NOT NULL,
   "last_access" REAL NOT NULL
)"""
    )
    # LRU eviction; purge and version invalidation; sweeping dead entries.
    conn.execute('CREATE INDEX "idx_entries_last_access" ON "entries" ("last_access")')
    conn.execute('CREATE INDEX "idx_entries_function_scope" ON "entries" ("function", "scope")')
    conn.execute('CREATE INDEX "idx_entries_stale_until" ON "entries" ("stale_until")')


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_m1_entries,)

# What the cache's statements read and write; a file whose `entries` lacks one is unusable.
REQUIRED_COLUMNS = frozenset(
    {"key", "function", "scope", "value", "content_type", "created", "expires", "stale_until"}
    | {"size", "last_access"}
)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date in one transaction; return the version it now has."""
    with transaction(conn):
        conn.execute(
            'CREATE TABLE IF NOT EXISTS "schema_version" '
            '("id" INTEGER PRIMARY KEY, "version" INTEGER)'
        )
        conn.execute("INSERT OR IGNORE INTO schema_version (id, version) VALUES (1, 0)")
        (current,) = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        current = int(current or 0)
        if current > len(MIGRATIONS):
            raise Incompatible(
                f"schema version {current} is newer than this agent knows ({len(MIGRATIONS)})"
            )
        for step in MIGRATIONS[current:]:
            step(conn)
        conn.execute(
            "INSERT OR REPLACE INTO schema_version (id, version) VALUES (1, ?)", (len(MIGRATIONS),)
        )
    columns = {name for _, name, *_ in conn.execute('PRAGMA table_info("entries")')}
    if not columns >= REQUIRED_COLUMNS:
        raise Incompatible(f"table 'entries' lacks columns (has {sorted(columns)})")
    return len(MIGRATIONS)

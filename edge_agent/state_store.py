"""Per-function key-value state (`state.get/set/delete` of the building blocks), in SQLite.

One table keyed by (function, key), in `state.db` in the agent's data dir, behind the shared
writer thread of `runtimes.sqlitedb.Database`: every call, reads included, is a job on that
thread, so the event loop never touches the disk. State belongs to the function *name*, not a
version: it survives restarts and version switches, unless the manifest says
`state = { keep_on_switch = false }`, in which case the first state call of a new version
clears what older versions left.

Each function's bytes (key + value lengths) are bounded by its manifest's
`[permissions] state.max_bytes`: a set that would pass the bound fails with `QuotaExceeded`
and changes nothing, so one function flooding its store never touches another's.

Durability: WAL with synchronous=NORMAL. A process crash (kill -9) loses nothing committed;
a power cut may lose the last commits. Function state is the function's working memory (a
counter, a last position), not a record of truth like the outbox, so one fsync per set (~0.2 ms)
is not worth paying on every call.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from runtimes.capabilities import CapabilityNotFound, QuotaExceeded
from runtimes.sqlitedb import Database

# Longest key accepted: keys are names, not data.
MAX_KEY_BYTES = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    function TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (function, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_owner (
    function TEXT PRIMARY KEY,
    version TEXT NOT NULL
);
"""


def _setup(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)


class StateStore:
    """Async facade over one SQLite file; build with `StateStore(path)`, `aclose()` at the end."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path, synchronous="NORMAL", setup=_setup, name="edgefn-state-writer")

    async def aclose(self) -> None:
        await self._db.aclose()

    async def claim(self, function: str, version: str, *, keep: bool) -> None:
        """Record that `version` now owns `function`'s state; without `keep`, a change of
        version wipes it (the manifest's `keep_on_switch = false`)."""

        def job(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT version FROM state_owner WHERE function = ?", (function,)
            ).fetchone()
            if row is not None and row[0] == version:
                return
            if row is not None and not keep:
                conn.execute("DELETE FROM state WHERE function = ?", (function,))
            conn.execute(
                "INSERT INTO state_owner (function, version) VALUES (?, ?) "
                "ON CONFLICT (function) DO UPDATE SET version = excluded.version",
                (function, version),
            )

        await self._db.awrite(job)

    async def get(self, function: str, key: str) -> bytes:
        def job(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM state WHERE function = ? AND key = ?", (function, key)
            ).fetchone()
            return None if row is None else bytes(row[0])

        value = await self._db.awrite(job, txn=False)
        if value is None:
            raise CapabilityNotFound(f"no state key {key!r}")
        return value

    async def set(self, function: str, key: str, value: bytes, *, max_bytes: int) -> None:
        _check_key(key)

        def job(conn: sqlite3.Connection) -> int:
            used, old = conn.execute(
                "SELECT COALESCE(SUM(length(CAST(key AS BLOB)) + length(value)), 0), "
                "COALESCE(SUM(CASE WHEN key = ? THEN length(CAST(key AS BLOB)) + length(value) "
                "END), 0) FROM state WHERE function = ?",
                (key, function),
            ).fetchone()
            after = used - old + len(key.encode()) + len(value)
            if after > max_bytes:
                return int(after)
            conn.execute(
                "INSERT INTO state (function, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (function, key) DO UPDATE SET value = excluded.value",
                (function, key, value),
            )
            return 0

        refused = await self._db.awrite(job)
        if refused:
            raise QuotaExceeded(
                f"state would grow to {refused} bytes, over the function's bound of {max_bytes}"
            )

    async def delete(self, function: str, key: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM state WHERE function = ? AND key = ?", (function, key))
            return cur.rowcount > 0

        return await self._db.awrite(job)

    async def used_bytes(self, function: str) -> int:
        def job(conn: sqlite3.Connection) -> int:
            (used,) = conn.execute(
                "SELECT COALESCE(SUM(length(CAST(key AS BLOB)) + length(value)), 0) "
                "FROM state WHERE function = ?",
                (function,),
            ).fetchone()
            return int(used)

        return await self._db.awrite(job, txn=False)


def _check_key(key: str) -> None:
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise CapabilityNotFound(f"state keys are 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")

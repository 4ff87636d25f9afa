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

import asyncio
import logging
import sqlite3
from pathlib import Path

from runtimes.capabilities import CapabilityNotFound, QuotaExceeded
from runtimes.setaside import set_aside
from runtimes.sqlitedb import Database, WalUnavailable, is_transient

log = logging.getLogger("edgefn.state")

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
    # Reads every page once at open (off the loop, on the writer thread): garbage and a
    # truncated file show here, where `open` can set them aside, not on a function's call.
    problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"quick_check: {'; '.join(map(str, problems))}")
    conn.executescript(_SCHEMA)


class StateStore:
    """Async facade over one SQLite file; build with `await StateStore.open(path)` (or
    `StateStore(path)`, which does not repair), `aclose()` at the end."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # What `open` set aside ("" when nothing): for the log and the operator.
        self.recovered = ""
        self._db = Database(path, synchronous="NORMAL", setup=_setup, name="edgefn-state-writer")

    @classmethod
    async def open(cls, path: Path) -> StateStore:
        """Open `path`; a damaged file is set aside (`runtimes.setaside`) and a fresh one made.

        Functions lose their state then, which they already tolerate (a new device has none);
        one broken file must not take every function that uses state offline. A busy file
        (another process holds the lock) is not damage and is not moved; the store then fails
        each call with the error, as before.
        """
        self = cls(path)
        try:
            await asyncio.wrap_future(self._db.opened)
            return self
        except sqlite3.Error as exc:
            await self._db.aclose()
            # Busy, no WAL on this filesystem, not a regular file: not damage, not ours to move.
            if is_transient(exc) or isinstance(exc, WalUnavailable) or not self.path.is_file():
                return cls(path)
            problem = f"{type(exc).__name__}: {exc}"
        try:
            aside = await asyncio.to_thread(set_aside, self.path)
        except OSError as err:
            log.error(
                "function state %s is damaged (%s) and cannot be set aside: %s; state calls fail",
                self.path.name,
                problem,
                err.strerror,
            )
            return cls(path)
        log.warning(
            "function state %s was damaged (%s): set aside as %s, starting empty",
            self.path.name,
            problem,
            aside,
        )
        fresh = cls(path)
        fresh.recovered = f"{problem}; set aside as {aside}"
        return fresh

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

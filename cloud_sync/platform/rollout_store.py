"""Rollout state in the platform store: one row per rollout, its whole `Rollout.to_dict()`.

The controller (`rollouts.py`) is the only writer. Every change of a rollout is one
transaction on an `sql.Engine`, so a platform killed at any moment restarts from the last
stored value and `controller.step` continues exactly where it was (its decisions are
deterministic in the stored value and the time of the event). On SQLite the file is
`<data_dir>/rollouts.db`, apart from the fleet store: a rollout is a handful of writes per
second, the fleet's intake many more, and the two never need one transaction. On PostgreSQL
the table sits in the shared database, beside the fleet's.

`function` and `state` are columns of their own so that "the active rollout of a function"
and "the last succeeded rollout" are indexed queries, not a scan of every document.
"""

from __future__ import annotations

import json
from pathlib import Path

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.sql import Engine, Migration, SqlError, SqliteEngine
from cloud_sync.rollout.model import Rollout
from cloud_sync.rollout.states import ACTIVE_ROLLOUT_STATES, RolloutState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_function ON rollouts(function, state, updated_at);
"""
# Step 1 is the table the SQLite store always had (IF NOT EXISTS: an older file is kept as is);
# PostgreSQL's REAL is 4 bytes, so times are DOUBLE PRECISION there.
MIGRATIONS = (
    Migration(
        1,
        "rollouts",
        _SCHEMA.format(real="REAL"),
        _SCHEMA.format(real="DOUBLE PRECISION"),
    ),
)

_ACTIVE = tuple(s.value for s in ACTIVE_ROLLOUT_STATES)


class RolloutStoreError(CloudSyncError):
    code = "rollout_store_error"
    category = "storage"


class RolloutStore:
    """Blocking methods; async callers use `asyncio.to_thread`."""

    def __init__(self, where: Path | Engine) -> None:
        """`where`: the SQLite file (opened and owned here) or an engine (`sql.Databases`)."""
        try:
            if isinstance(where, Path | str):
                self.path: Path | None = Path(where)
                self._db: Engine = SqliteEngine(
                    self.path, synchronous="NORMAL", name="edgefn-rollout-db"
                )
            else:
                self.path, self._db = None, where
        except SqlError as exc:
            raise RolloutStoreError(f"cannot open the rollout store {where}: {exc}") from exc
        try:
            self._db.migrate("rollouts", MIGRATIONS)
        except SqlError as exc:
            self._db.close()
            raise RolloutStoreError(f"cannot open the rollout store: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def save(self, rollout: Rollout) -> None:
        row = (
            rollout.id,
            rollout.spec.function,
            rollout.state.value,
            rollout.created_at,
            rollout.updated_at,
            json.dumps(rollout.to_dict(), separators=(",", ":")),
        )
        self._db.write(
            lambda c: c.execute(
                "INSERT INTO rollouts (id, function, state, created_at, updated_at, doc)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " state=excluded.state, updated_at=excluded.updated_at, doc=excluded.doc",
                row,
            ),
            idempotent=True,  # the same row again is the same end state
        )

    def get(self, rollout_id: str) -> Rollout | None:
        row = self._db.read(
            lambda c: c.execute("SELECT doc FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        )
        return Rollout.from_dict(json.loads(row[0])) if row else None

    def all(self) -> list[Rollout]:
        """Every rollout, oldest first."""
        rows = self._db.read(
            lambda c: c.execute("SELECT doc FROM rollouts ORDER BY created_at, id").fetchall()
        )
        return [Rollout.from_dict(json.loads(doc)) for (doc,) in rows]

    def active(self) -> list[Rollout]:
        """The rollouts that still decide something (pending, running, paused, failed)."""
        marks = ",".join("?" * len(_ACTIVE))
        rows = self._db.read(
            lambda c: c.execute(
                f"SELECT doc FROM rollouts WHERE state IN ({marks}) ORDER BY created_at, id",
                _ACTIVE,
            ).fetchall()
        )
        return [Rollout.from_dict(json.loads(doc)) for (doc,) in rows]

    def last_succeeded(self) -> dict[str, Rollout]:
        """Per function, its most recent succeeded rollout: what devices joining later get."""
        rows = self._db.read(
            lambda c: c.execute(
                "SELECT function, doc FROM rollouts WHERE state=? ORDER BY updated_at",
                (RolloutState.SUCCEEDED.value,),
            ).fetchall()
        )
        return {fn: Rollout.from_dict(json.loads(doc)) for fn, doc in rows}

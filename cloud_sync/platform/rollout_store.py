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

What a large rollout costs: the document holds every device's record, and the controller reads
the active rollouts on every pass and stores one on every change. Decoding 10,000 records took
~95 ms and encoding ~60 ms, every half second, which made a rollout cost devices squared
(docs/BENCHMARKS.md). So the store keeps two caches, neither of which can make it wrong:

* a document text read is decoded only when it differs from the text last decoded for that
  rollout (a string comparison; another replica's write differs, and is decoded);
* `save` encodes only the device records that changed since the last save (records are
  immutable: an unchanged one is the same object) and splices the cached JSON of the others,
  byte for byte what `json.dumps(rollout.to_dict())` gives.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
from pathlib import Path

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.sql import Engine, Migration, SqlError, SqliteEngine
from cloud_sync.rollout.model import DeviceRecord, Rollout
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
_SEPARATORS = (",", ":")


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
        # rollout id -> (document text, its decoded value); id -> device -> (record, its JSON).
        self._decoded: dict[str, tuple[str, Rollout]] = {}
        self._encoded: dict[str, dict[str, tuple[DeviceRecord, str]]] = {}
        self._encode_lock = threading.Lock()
        # Stands for the device list in the encoded head; escaped JSON cannot contain it twice.
        self._hole = f"devices-{secrets.token_hex(8)}"

    def close(self) -> None:
        self._db.close()

    def save(self, rollout: Rollout) -> None:
        row = (
            rollout.id,
            rollout.spec.function,
            rollout.state.value,
            rollout.created_at,
            rollout.updated_at,
            self.encode(rollout),
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
        self._decoded[rollout.id] = (row[5], rollout)

    def encode(self, rollout: Rollout) -> str:
        """`json.dumps(rollout.to_dict())` (compact), re-encoding only the changed records."""
        with self._encode_lock:  # the per-record cache is shared by the threads that save
            old = self._encoded.get(rollout.id, {})
            new: dict[str, tuple[DeviceRecord, str]] = {}
            parts = []
            for device in sorted(rollout.devices):
                rec = rollout.devices[device]
                have = old.get(device)
                if have is None or have[0] is not rec:
                    have = (rec, json.dumps(rec.to_dict(), separators=_SEPARATORS))
                new[device] = have
                parts.append(have[1])
            self._encoded[rollout.id] = new
        head = dict(dataclasses.replace(rollout, devices={}).to_dict(), devices=self._hole)
        text = json.dumps(head, separators=_SEPARATORS)
        return text.replace(json.dumps(self._hole), "[" + ",".join(parts) + "]", 1)

    def _decode(self, rollout_id: str, doc: str) -> Rollout:
        """The stored document as a `Rollout`; decoded again only when its text changed."""
        have = self._decoded.get(rollout_id)
        if have is not None and have[0] == doc:
            return have[1]
        rollout = Rollout.from_dict(json.loads(doc))
        self._decoded[rollout_id] = (doc, rollout)
        return rollout

    def get(self, rollout_id: str) -> Rollout | None:
        row = self._db.read(
            lambda c: c.execute("SELECT doc FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        )
        return self._decode(rollout_id, row[0]) if row else None

    def all(self) -> list[Rollout]:
        """Every rollout, oldest first."""
        rows = self._db.read(
            lambda c: c.execute("SELECT id, doc FROM rollouts ORDER BY created_at, id").fetchall()
        )
        return [self._decode(i, doc) for i, doc in rows]

    def active(self) -> list[Rollout]:
        """The rollouts that still decide something (pending, running, paused, failed)."""
        marks = ",".join("?" * len(_ACTIVE))
        rows = self._db.read(
            lambda c: c.execute(
                f"SELECT id, doc FROM rollouts WHERE state IN ({marks}) ORDER BY created_at, id",
                _ACTIVE,
            ).fetchall()
        )
        return [self._decode(i, doc) for i, doc in rows]

    def last_succeeded(self) -> dict[str, Rollout]:
        """Per function, its most recent succeeded rollout: what devices joining later get."""
        rows = self._db.read(
            lambda c: c.execute(
                "SELECT function, id, doc FROM rollouts WHERE state=? ORDER BY updated_at",
                (RolloutState.SUCCEEDED.value,),
            ).fetchall()
        )
        return {fn: self._decode(i, doc) for fn, i, doc in rows}

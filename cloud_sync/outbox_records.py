"""The outbox's records table and everything done to it, on the outbox's writer thread.

`Records` is the state only the writer thread touches -- the committed byte total, the ids on
the wire (leases, in memory only) and the pending drop report -- and the SQL of every outbox
operation: append (idempotent by key, coalescing), lease, delete, and the byte bound (merge two
adjacent metric intervals of one topic, else drop lowest priority, oldest first; drops counted
and reported as one synthetic event). The async face is `cloud_sync.outbox.Outbox`; it runs
each call here in one transaction and restores `snapshot()` when that transaction rolls back.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.errors import MetricsFormatError, OutboxError, RecordTooLarge
from cloud_sync.metrics_record import merge_metrics
from runtimes.sqlitedb import transaction

log = logging.getLogger("cloud_sync.outbox")
# Bytes charged per record on top of topic + payload: key, timestamps, row and index entries.
# It also makes a flood of tiny records hit the bound, which raw payload bytes would not.
RECORD_OVERHEAD = 96
# Room always kept free for the synthetic "outbox_dropped" event, so reporting a drop never
# needs another drop.
DROP_EVENT_RESERVE = 512
# Which kinds go first when something must be dropped (lower = dropped earlier). Metrics are
# aggregates the platform can live without; a rollout status is what an operator waits for.
KIND_PRIORITY = {"metrics": 0, "events": 1, "reported": 2, "rollout": 3}
DEFAULT_PRIORITY = 1
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a late ack cannot hit a new record
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    key TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    interval_start REAL,
    interval_end REAL,
    samples INTEGER NOT NULL DEFAULT 1,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_metrics ON records(kind, topic, interval_start);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# The columns an `OutboxRecord` is read from, in SELECT order (`_row` maps them by name).
_FIELDS = (
    "id", "kind", "topic", "payload", "key", "created", "attempts",
    "interval_start", "interval_end", "size",
)  # fmt: skip
_COLUMNS = ", ".join(_FIELDS)


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    id: int
    kind: str
    topic: str
    payload: bytes
    key: str  # idempotency key (uuid4 unless the producer chose one)
    created: float
    attempts: int
    size: int
    interval_start: float | None = None
    interval_end: float | None = None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    records: int
    bytes: int
    max_bytes: int
    leased: int
    dropped: int  # records dropped at the bound or refused by the cloud, since the file was made
    dropped_bytes: int
    merged: int  # metric merges performed
    by_kind: Mapping[str, int]


def _row(r: tuple[Any, ...]) -> OutboxRecord:
    fields = dict(zip(_FIELDS, r, strict=True))
    fields["payload"] = bytes(fields["payload"])
    return OutboxRecord(**fields)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    total: int
    leased: frozenset[int]
    drop_event_id: int | None


@dataclass
class Records:
    """The writer thread's view of the outbox file (see the module docstring)."""

    path: Path
    max_bytes: int
    events_topic: str | None
    reserve: int  # bytes kept free for the drop report (0 without an events topic)
    total: int = 0  # committed bytes, as counted against max_bytes
    leased: set[int] = field(default_factory=set)
    drop_event_id: int | None = None

    def snapshot(self) -> _Snapshot:
        return _Snapshot(self.total, frozenset(self.leased), self.drop_event_id)

    def restore(self, snap: _Snapshot) -> None:
        """The database rolled back, so must this in-memory view of it."""
        self.total, self.leased, self.drop_event_id = (
            snap.total,
            set(snap.leased),
            snap.drop_event_id,
        )

    def setup(self, conn: sqlite3.Connection) -> None:
        """The Database's setup step: schema check and creation, the byte total."""
        # Reads every page once: a truncated or scribbled file fails here, at open, where it
        # can be set aside, instead of on some later append.
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"quick_check: {'; '.join(map(str, problems))}")
        with transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(f"outbox {self.path} has schema {version}, newer than this agent")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0]

    def append(
        self,
        conn: sqlite3.Connection,
        kind: str,
        topic: str,
        payload: bytes,
        key: str | None,
        interval: tuple[float, float] | None,
        samples: int,
        coalesce: bool,
        now: float,
    ) -> OutboxRecord:
        size = len(payload) + len(topic.encode()) + RECORD_OVERHEAD
        if size + self.reserve > self.max_bytes:
            raise RecordTooLarge(
                f"record of {size} bytes can never fit an outbox of {self.max_bytes} bytes"
            )
        if key is not None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM records WHERE key=?", (key,)).fetchone()
            if row is not None:
                return _row(row)
        if coalesce:
            rows = conn.execute(
                "SELECT id FROM records WHERE kind=? AND topic=?", (kind, topic)
            ).fetchall()
            superseded = [rid for (rid,) in rows if rid not in self.leased]
            if superseded:
                self.delete(conn, superseded, drop=False)
        dropped = self.make_room(conn, size + self.reserve)
        start, end = interval if interval else (None, None)
        rec_key = key or str(uuid.uuid4())
        cur = conn.execute(
            "INSERT INTO records (kind, topic, payload, key, created, attempts, interval_start,"
            " interval_end, samples, size) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            (kind, topic, payload, rec_key, now, start, end, samples, size),
        )
        self.total += size
        rec_id = cur.lastrowid
        assert rec_id is not None
        if dropped:
            self.report_drops(conn, now)
        return OutboxRecord(rec_id, kind, topic, payload, rec_key, now, 0, size, start, end)

    def make_room(self, conn: sqlite3.Connection, needed: int) -> int:
        """Merge, then drop, until `needed` more bytes fit; returns how many records dropped."""
        dropped = 0
        unmergeable: set[tuple[int, int]] = set()
        while self.total + needed > self.max_bytes:
            if self.merge_one(conn, unmergeable):
                continue
            victim = self.pick_victim(conn)
            if victim is None:  # nothing left to drop: cannot happen when size <= max_bytes
                raise OutboxError("outbox bound reached with nothing left to drop")
            self.delete(conn, [victim], drop=True)
            dropped += 1
        return dropped

    def merge_one(self, conn: sqlite3.Connection, unmergeable: set[tuple[int, int]]) -> bool:
        rows = conn.execute(
            "SELECT id, topic, samples FROM records WHERE kind='metrics'"
            " ORDER BY topic, interval_start, id"
        ).fetchall()
        best: tuple[int, int, int] | None = None  # (samples of both, id a, id b)
        for (id_a, topic_a, s_a), (id_b, topic_b, s_b) in itertools.pairwise(rows):
            if topic_a != topic_b or id_a in self.leased or id_b in self.leased:
                continue  # a leased record may be on the wire: merging it would double count
            if (id_a, id_b) in unmergeable:
                continue
            cand = (s_a + s_b, min(id_a, id_b), max(id_a, id_b))
            if best is None or cand < best:
                best = cand
        if best is None:
            return False
        _, keep, gone = best
        ra, rb = (
            _row(conn.execute(f"SELECT {_COLUMNS} FROM records WHERE id=?", (i,)).fetchone())
            for i in (keep, gone)
        )
        try:
            merged = merge_metrics(json.loads(ra.payload), json.loads(rb.payload))
        except (ValueError, MetricsFormatError) as exc:
            log.warning("outbox: metrics records %s and %s cannot merge: %s", keep, gone, exc)
            unmergeable.add((min(keep, gone), max(keep, gone)))
            unmergeable.add((max(keep, gone), min(keep, gone)))
            return True  # progress of a kind: the next round tries another pair or drops
        payload = json.dumps(merged, separators=(",", ":"), sort_keys=True).encode()
        size = len(payload) + len(ra.topic.encode()) + RECORD_OVERHEAD
        # The merged record is new content, so it gets a new idempotency key; it keeps the
        # older id so it keeps its place in the send order.
        conn.execute(
            "UPDATE records SET payload=?, key=?, interval_start=?, interval_end=?, samples=?,"
            " size=?, attempts=0, created=? WHERE id=?",
            (
                payload,
                str(uuid.uuid4()),
                merged["interval_start"],
                merged["interval_end"],
                merged["samples"],
                size,
                min(ra.created, rb.created),
                keep,
            ),
        )
        conn.execute("DELETE FROM records WHERE id=?", (gone,))
        self.total += size - ra.size - rb.size
        self._bump(conn, "merged", 1)
        return True

    def pick_victim(self, conn: sqlite3.Connection) -> int | None:
        rows = conn.execute("SELECT id, kind FROM records ORDER BY id").fetchall()
        if not rows:
            return None

        def order(row: tuple[int, str]) -> tuple[int, int, int]:
            rid, kind = row
            # Records on the wire go last: dropping one is harmless but usually wasted.
            return (rid in self.leased, KIND_PRIORITY.get(kind, DEFAULT_PRIORITY), rid)

        return int(min(rows, key=order)[0])

    def delete(self, conn: sqlite3.Connection, ids: list[int], *, drop: bool) -> int:
        deleted = 0
        for chunk_at in range(0, len(ids), 500):
            chunk = ids[chunk_at : chunk_at + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT id, size FROM records WHERE id IN ({marks})", chunk
            ).fetchall()
            if rows:
                found = [rid for rid, _ in rows]
                conn.execute(
                    f"DELETE FROM records WHERE id IN ({','.join('?' * len(found))})", found
                )
                freed = sum(size for _, size in rows)
                self.total -= freed
                deleted += len(rows)
                if drop:
                    self._bump(conn, "dropped", len(rows))
                    self._bump(conn, "dropped_bytes", freed)
            self.leased.difference_update(chunk)
        return deleted

    def discard(self, conn: sqlite3.Connection, ids: list[int]) -> int:
        deleted = self.delete(conn, ids, drop=True)
        if deleted:
            self.report_drops(conn, time.time())
        return deleted

    def report_drops(self, conn: sqlite3.Connection, now: float) -> None:
        """Keep exactly one pending synthetic event carrying the cumulative drop counters."""
        if self.events_topic is None:
            return
        eid = self.drop_event_id
        if eid is not None and eid not in self.leased:
            self.delete(conn, [eid], drop=False)  # superseded by the fresher totals below
        for _ in range(3):  # making room may drop more, which changes the totals: recompute
            counters = self._counters(conn)
            payload = json.dumps(
                {
                    "type": "outbox_dropped",
                    "at": now,
                    "dropped_total": counters.get("dropped", 0),
                    "dropped_bytes_total": counters.get("dropped_bytes", 0),
                    "merged_total": counters.get("merged", 0),
                },
                separators=(",", ":"),
            ).encode()
            size = len(payload) + len(self.events_topic.encode()) + RECORD_OVERHEAD
            if self.total + size <= self.max_bytes:
                break
            self.make_room(conn, size + 32)  # 32: the totals may gain a few digits
        cur = conn.execute(
            "INSERT INTO records (kind, topic, payload, key, created, size)"
            " VALUES ('events', ?, ?, ?, ?, ?)",
            (self.events_topic, payload, str(uuid.uuid4()), now, size),
        )
        self.total += size
        self.drop_event_id = cur.lastrowid

    def lease(self, conn: sqlite3.Connection, limit: int) -> list[OutboxRecord]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM records ORDER BY id LIMIT ?", (limit + len(self.leased),)
        ).fetchall()
        picked = [rec for rec in map(_row, rows) if rec.id not in self.leased][:limit]
        if not picked:
            return []
        ids = [r.id for r in picked]
        conn.execute(
            f"UPDATE records SET attempts = attempts + 1 WHERE id IN ({','.join('?' * len(ids))})",
            ids,
        )
        self.leased.update(ids)
        return [
            OutboxRecord(
                r.id,
                r.kind,
                r.topic,
                r.payload,
                r.key,
                r.created,
                r.attempts + 1,
                r.size,
                r.interval_start,
                r.interval_end,
            )
            for r in picked
        ]

    def peek(self, conn: sqlite3.Connection, limit: int) -> list[OutboxRecord]:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM records ORDER BY id LIMIT ?", (limit,))
        return [_row(r) for r in rows.fetchall()]

    def stats(self, conn: sqlite3.Connection) -> OutboxStats:
        counters = self._counters(conn)
        by_kind = dict(conn.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall())
        return OutboxStats(
            records=sum(by_kind.values()),
            bytes=self.total,
            max_bytes=self.max_bytes,
            leased=len(self.leased),
            dropped=counters.get("dropped", 0),
            dropped_bytes=counters.get("dropped_bytes", 0),
            merged=counters.get("merged", 0),
            by_kind=by_kind,
        )

    @staticmethod
    def _counters(conn: sqlite3.Connection) -> dict[str, int]:
        return dict(conn.execute("SELECT name, value FROM counters").fetchall())

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

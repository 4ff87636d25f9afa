"""Durable store-and-forward outbox: everything the device tells the cloud waits here first.

Flow::

    producer --append()--> [SQLite, one writer thread] --lease()--> sender (MQTT or HTTP)
                                   ^                                   |
                                   +--------ack(ids) after PUBACK/2xx--+   (release(ids) on failure)

* A record is (id, kind, topic, payload bytes, idempotency key, created, attempts, interval for
  metrics, size). `append` returns once the row is committed, so an acknowledged append survives
  `kill -9` and power loss; `ack` is the only way a record leaves (besides the bound, below).
* Sending is at-least-once: a record whose acknowledgement was lost is sent again with the same
  `key`; the platform dedupes on it.
* `lease` hands records to one sender and hides them from other senders (MQTT drain and HTTP
  fallback may run at the same time) until `ack` or `release`. Leases live in memory only: after a
  restart every unacknowledged record is sendable again.
* The store is bounded in bytes (`max_bytes`, counted as payload + topic + `RECORD_OVERHEAD` per
  record). At the bound it first merges the two adjacent metric intervals (same topic) with the
  fewest original samples, oldest first -- counters add, histograms add bucket-wise, the interval
  widens -- and only when nothing can merge does it drop: lowest priority kind first (metrics, then
  events, then reported, then rollout status), oldest first. Drops are counted in the database and
  reported as one coalesced synthetic event on `events_topic`.

Durability choice: WAL with `synchronous=FULL`. NORMAL survives a process crash but may lose the
last commits on power loss, and power loss is the common failure of an edge box. FULL costs one
fsync per commit (~0.2 ms here); the outbox commits once per metrics interval, event or send batch,
not per invocation, so the cost is small.

Every database call runs on the writer thread of a `runtimes.sqlitedb.Database`, which owns the
connection (one `BEGIN IMMEDIATE` transaction per call); the event loop only awaits futures.
Reads run there too: leases and the byte total are the writer's in-memory state. Plain sqlite3:
one table, a counters table and a `user_version` check are all the schema management this
needs. One process owns an outbox file at a time (in-memory leases and byte totals are per
process).

The metrics record format and its merge rule (what makes the bound lossless for counters) live
in `cloud_sync.metrics_record`; its names are re-exported here for the outbox's callers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cloud_sync.errors import CloudSyncError, MetricsFormatError, OutboxError, RecordTooLarge
from cloud_sync.metrics_record import (
    DEFAULT_LATENCY_BOUNDS_MS,
    METRICS_SCHEMA,
    gauge,
    merge_metrics,
    new_histogram,
    observe,
    validate_metrics,
)
from runtimes.sqlitedb import Database, transaction

__all__ = [
    "DEFAULT_LATENCY_BOUNDS_MS",
    "DEFAULT_MAX_BYTES",
    "DROP_EVENT_RESERVE",
    "KIND_PRIORITY",
    "METRICS_SCHEMA",
    "RECORD_OVERHEAD",
    "Outbox",
    "OutboxRecord",
    "OutboxStats",
    "gauge",
    "merge_metrics",
    "new_histogram",
    "observe",
    "validate_metrics",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # ~a day of 10 s metrics for 50 functions before merging
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


class Outbox:
    """The async face of the outbox; create with `await Outbox.open(path, ...)`."""

    def __init__(self, path: Path, *, max_bytes: int, events_topic: str | None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.events_topic = events_topic
        self._reserve = DROP_EVENT_RESERVE if events_topic else 0
        if max_bytes < self._reserve + RECORD_OVERHEAD + 1:
            raise ValueError(f"max_bytes {max_bytes} is too small for any record")
        # Everything below is touched only on the writer thread.
        self._total = 0
        self._leased: set[int] = set()
        self._drop_event_id: int | None = None
        self._db: Database | None = None
        self._closed = False
        self._appended = asyncio.Event()

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        events_topic: str | None = None,
    ) -> Outbox:
        """Open (creating if needed) the outbox file; `events_topic` receives drop reports."""
        self = cls(Path(path), max_bytes=max_bytes, events_topic=events_topic)
        # FULL: see the module docstring (power loss is the common failure of an edge box).
        self._db = Database(self.path, synchronous="FULL", setup=self._init, name="edgefn-outbox")
        try:
            await asyncio.wrap_future(self._db.opened)
        except sqlite3.Error as exc:
            await self.close()
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Finish queued work, then close the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._db is not None:
            await self._db.aclose()

    # ---- public async API -------------------------------------------------------------------

    async def append(
        self,
        kind: str,
        topic: str,
        payload: bytes,
        *,
        key: str | None = None,
        interval: tuple[float, float] | None = None,
        samples: int = 1,
        coalesce: bool = False,
    ) -> OutboxRecord:
        """Store a record durably; returns after commit.

        `key` makes appends idempotent (the same key returns the stored record). `coalesce=True`
        replaces pending records of the same kind and topic -- for state-like messages (reported
        documents) where only the latest matters.
        """
        if not isinstance(payload, bytes | bytearray):
            raise TypeError("payload must be bytes")
        rec = await self._call(
            lambda c: self._append(
                c, kind, topic, bytes(payload), key, interval, samples, coalesce, time.time()
            )
        )
        self._appended.set()
        return rec

    async def append_metrics(self, topic: str, record: Mapping[str, Any]) -> OutboxRecord:
        """Append one edgefn.metrics/1 record (validated) so the bound can merge it later."""
        rec = validate_metrics({"samples": 1, **record})
        payload = json.dumps(rec, separators=(",", ":"), sort_keys=True).encode()
        return await self.append(
            "metrics",
            topic,
            payload,
            interval=(float(rec["interval_start"]), float(rec["interval_end"])),
            samples=int(rec.get("samples", 1)),
        )

    async def lease(self, limit: int = 32) -> list[OutboxRecord]:
        """The oldest `limit` records no other sender holds; each lease counts as an attempt.

        Cancellation-safe: if the caller is cancelled while the lease runs on the writer, what it
        leased is released again (else those records would wait for a restart).
        """
        fut = self._submit(lambda c: self._lease(c, limit))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._release_orphaned_lease)
            raise

    def _release_orphaned_lease(self, fut: concurrent.futures.Future[list[OutboxRecord]]) -> None:
        if fut.cancelled() or fut.exception() is not None or not fut.result():
            return
        ids = [r.id for r in fut.result()]
        if self._db is not None and not self._closed:
            # A job, not a direct update: this callback may run on the caller's thread.
            self._db.submit(lambda c: self._leased.difference_update(ids), txn=False)

    async def peek(self, limit: int = 100) -> list[OutboxRecord]:
        """The oldest records, leased or not, without touching them (inspection, tests)."""
        return await self._call(lambda c: self._peek(c, limit))

    async def ack(self, ids: Iterable[int]) -> int:
        """Delete records the cloud acknowledged (PUBACK / HTTP 2xx); returns how many existed."""
        id_list = list(ids)
        if not id_list:
            return 0
        return await self._call(lambda c: self._delete(c, id_list, drop=False))

    async def release(self, ids: Iterable[int]) -> None:
        """Give leased records back unsent (the send failed); they are sent again later."""
        id_list = list(ids)
        if id_list:
            await self._call(lambda c: self._leased.difference_update(id_list), txn=False)

    async def discard(self, ids: Iterable[int]) -> int:
        """Drop records the cloud refused for good; counted and reported like bound drops."""
        id_list = list(ids)
        if not id_list:
            return 0
        return await self._call(lambda c: self._discard(c, id_list))

    async def stats(self) -> OutboxStats:
        return await self._call(self._stats)

    async def wait_for_records(self, within_s: float) -> bool:
        """Wait until something is appended (at most `within_s`); True if something was."""
        try:
            await asyncio.wait_for(self._appended.wait(), within_s)
        except TimeoutError:
            return False
        return True

    def clear_appended(self) -> None:
        """Reset the append signal; call before `lease` so no append slips between the two."""
        self._appended.clear()

    # ---- writer thread ----------------------------------------------------------------------

    def _submit(
        self, fn: Callable[[sqlite3.Connection], T], *, txn: bool = True
    ) -> concurrent.futures.Future[T]:
        if self._closed or self._db is None:
            raise OutboxError("outbox is closed", code="outbox_closed")
        return self._db.submit(lambda conn: self._job(conn, fn, txn), txn=False)

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, txn: bool = True) -> T:
        return await asyncio.wrap_future(self._submit(fn, txn=txn))

    def _job(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], txn: bool) -> T:
        """One call on the writer thread: its transaction, and the in-memory state with it."""
        leased_before = set(self._leased)
        total_before, drop_id_before = self._total, self._drop_event_id
        try:
            if not txn:
                return fn(conn)
            with transaction(conn):
                return fn(conn)
        except BaseException as exc:
            # The database rolled back, so must our in-memory view of it.
            self._leased = leased_before
            self._total, self._drop_event_id = total_before, drop_id_before
            if isinstance(exc, sqlite3.Error):
                raise OutboxError(f"outbox database error: {exc}") from exc
            if not isinstance(exc, CloudSyncError | ValueError | TypeError):
                log.exception("outbox job failed")
            raise

    def _init(self, conn: sqlite3.Connection) -> None:
        """The Database's setup step: schema check and creation, the byte total."""
        with transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(f"outbox {self.path} has schema {version}, newer than this agent")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0]

    def _append(
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
        if size + self._reserve > self.max_bytes:
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
            superseded = [rid for (rid,) in rows if rid not in self._leased]
            if superseded:
                self._delete(conn, superseded, drop=False)
        dropped = self._make_room(conn, size + self._reserve)
        start, end = interval if interval else (None, None)
        rec_key = key or str(uuid.uuid4())
        cur = conn.execute(
            "INSERT INTO records (kind, topic, payload, key, created, attempts, interval_start,"
            " interval_end, samples, size) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            (kind, topic, payload, rec_key, now, start, end, samples, size),
        )
        self._total += size
        rec_id = cur.lastrowid
        assert rec_id is not None
        if dropped:
            self._report_drops(conn, now)
        return OutboxRecord(rec_id, kind, topic, payload, rec_key, now, 0, size, start, end)

    def _make_room(self, conn: sqlite3.Connection, needed: int) -> int:
        """Merge, then drop, until `needed` more bytes fit; returns how many records dropped."""
        dropped = 0
        unmergeable: set[tuple[int, int]] = set()
        while self._total + needed > self.max_bytes:
            if self._merge_one(conn, unmergeable):
                continue
            victim = self._pick_victim(conn)
            if victim is None:  # nothing left to drop: cannot happen when size <= max_bytes
                raise OutboxError("outbox bound reached with nothing left to drop")
            self._delete(conn, [victim], drop=True)
            dropped += 1
        return dropped

    def _merge_one(self, conn: sqlite3.Connection, unmergeable: set[tuple[int, int]]) -> bool:
        rows = conn.execute(
            "SELECT id, topic, samples FROM records WHERE kind='metrics'"
            " ORDER BY topic, interval_start, id"
        ).fetchall()
        best: tuple[int, int, int] | None = None  # (samples of both, id a, id b)
        for (id_a, topic_a, s_a), (id_b, topic_b, s_b) in itertools.pairwise(rows):
            if topic_a != topic_b or id_a in self._leased or id_b in self._leased:
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
        self._total += size - ra.size - rb.size
        self._bump(conn, "merged", 1)
        return True

    def _pick_victim(self, conn: sqlite3.Connection) -> int | None:
        rows = conn.execute("SELECT id, kind FROM records ORDER BY id").fetchall()
        if not rows:
            return None

        def order(row: tuple[int, str]) -> tuple[int, int, int]:
            rid, kind = row
            # Records on the wire go last: dropping one is harmless but usually wasted.
            return (rid in self._leased, KIND_PRIORITY.get(kind, DEFAULT_PRIORITY), rid)

        return int(min(rows, key=order)[0])

    def _delete(self, conn: sqlite3.Connection, ids: list[int], *, drop: bool) -> int:
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
                self._total -= freed
                deleted += len(rows)
                if drop:
                    self._bump(conn, "dropped", len(rows))
                    self._bump(conn, "dropped_bytes", freed)
            self._leased.difference_update(chunk)
        return deleted

    def _discard(self, conn: sqlite3.Connection, ids: list[int]) -> int:
        deleted = self._delete(conn, ids, drop=True)
        if deleted:
            self._report_drops(conn, time.time())
        return deleted

    def _report_drops(self, conn: sqlite3.Connection, now: float) -> None:
        """Keep exactly one pending synthetic event carrying the cumulative drop counters."""
        if self.events_topic is None:
            return
        eid = self._drop_event_id
        if eid is not None and eid not in self._leased:
            self._delete(conn, [eid], drop=False)  # superseded by the fresher totals below
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
            if self._total + size <= self.max_bytes:
                break
            self._make_room(conn, size + 32)  # 32: the totals may gain a few digits
        cur = conn.execute(
            "INSERT INTO records (kind, topic, payload, key, created, size)"
            " VALUES ('events', ?, ?, ?, ?, ?)",
            (self.events_topic, payload, str(uuid.uuid4()), now, size),
        )
        self._total += size
        self._drop_event_id = cur.lastrowid

    def _lease(self, conn: sqlite3.Connection, limit: int) -> list[OutboxRecord]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM records ORDER BY id LIMIT ?", (limit + len(self._leased),)
        ).fetchall()
        picked = [rec for rec in map(_row, rows) if rec.id not in self._leased][:limit]
        if not picked:
            return []
        ids = [r.id for r in picked]
        conn.execute(
            f"UPDATE records SET attempts = attempts + 1 WHERE id IN ({','.join('?' * len(ids))})",
            ids,
        )
        self._leased.update(ids)
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

    def _peek(self, conn: sqlite3.Connection, limit: int) -> list[OutboxRecord]:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM records ORDER BY id LIMIT ?", (limit,))
        return [_row(r) for r in rows.fetchall()]

    def _stats(self, conn: sqlite3.Connection) -> OutboxStats:
        counters = self._counters(conn)
        by_kind = dict(conn.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall())
        return OutboxStats(
            records=sum(by_kind.values()),
            bytes=self._total,
            max_bytes=self.max_bytes,
            leased=len(self._leased),
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

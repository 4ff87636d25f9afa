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

Every database call runs on one thread that owns the connection (one transaction per call,
`BEGIN IMMEDIATE`); the event loop only awaits futures. Plain sqlite3: one table, a counters
table and a `user_version` check are all the schema management this needs. One process owns an
outbox file at a time (in-memory leases and byte totals are per process).

The metrics record format and its pure merge function live here too, because the merge rule is
what makes the bound lossless for counters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import math
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cloud_sync.errors import CloudSyncError, MetricsFormatError, OutboxError, RecordTooLarge

log = logging.getLogger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Metrics record format (edgefn.metrics/1) and its merge. Pure.
# ---------------------------------------------------------------------------------------------

METRICS_SCHEMA = "edgefn.metrics/1"
# Upper bounds (ms, inclusive) of the latency buckets; one more bucket catches everything above.
# Roughly 1-2.5-5 steps: enough resolution for p50/p99 of both 1 ms in-process calls and 30 s jobs.
DEFAULT_LATENCY_BOUNDS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
)  # fmt: skip
_GAUGE_KEYS = ("avg", "max", "last")


def new_histogram(bounds: Iterable[float] = DEFAULT_LATENCY_BOUNDS_MS) -> dict[str, Any]:
    b = [float(x) for x in bounds]
    return {"bounds": b, "counts": [0] * (len(b) + 1), "sum": 0.0}


def observe(hist: dict[str, Any], value_ms: float) -> None:
    """Count one latency into its bucket (the first bound >= value, else the overflow bucket)."""
    bounds = hist["bounds"]
    i = 0
    while i < len(bounds) and value_ms > bounds[i]:
        i += 1
    hist["counts"][i] += 1
    hist["sum"] += value_ms


def gauge(value: float) -> dict[str, float]:
    """A gauge sampled once: average, maximum and last value are all the sample."""
    return {"avg": float(value), "max": float(value), "last": float(value)}


def _num(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def validate_metrics(rec: Any) -> dict[str, Any]:
    """Check a record against edgefn.metrics/1; MetricsFormatError names every bad field."""
    bad: list[str] = []
    if not isinstance(rec, dict):
        raise MetricsFormatError("metrics record must be a JSON object")
    if rec.get("schema") != METRICS_SCHEMA:
        bad.append(f"schema: must be {METRICS_SCHEMA!r}")
    if not isinstance(rec.get("device"), str) or not rec.get("device"):
        bad.append("device: must be a non-empty string")
    start: Any = rec.get("interval_start")
    end: Any = rec.get("interval_end")
    if not (_num(start) and _num(end)) or end < start:
        bad.append("interval_start/interval_end: must be numbers with start <= end")
    samples = rec.get("samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        bad.append("samples: must be an integer >= 1")
    fns = rec.get("functions", {})
    if not isinstance(fns, dict):
        bad.append("functions: must be an object")
        fns = {}
    for name, entry in fns.items():
        path = f"functions.{name}"
        if not isinstance(entry, dict):
            bad.append(f"{path}: must be an object")
            continue
        for key, value in entry.items():
            if key == "latency_ms":
                bad.extend(_hist_problems(f"{path}.latency_ms", value))
            elif key == "pool":
                bad.extend(_gauges_problems(f"{path}.pool", value))
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad.append(f"{path}.{key}: counters must be integers >= 0")
    bad.extend(_gauges_problems("system", rec.get("system", {})))
    if bad:
        raise MetricsFormatError("bad metrics record: " + "; ".join(bad))
    return rec


def _hist_problems(path: str, h: Any) -> list[str]:
    if not isinstance(h, dict):
        return [f"{path}: must be an object"]
    bounds, counts = h.get("bounds"), h.get("counts")
    if not isinstance(bounds, list) or not all(_num(b) for b in bounds):
        return [f"{path}.bounds: must be a list of numbers"]
    if any(b2 <= b1 for b1, b2 in itertools.pairwise(bounds)):
        return [f"{path}.bounds: must be strictly increasing"]
    if (
        not isinstance(counts, list)
        or len(counts) != len(bounds) + 1
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    ):
        return [f"{path}.counts: must be len(bounds)+1 integers >= 0"]
    if not _num(h.get("sum", 0.0)):
        return [f"{path}.sum: must be a number"]
    return []


def _gauges_problems(path: str, table: Any) -> list[str]:
    if not isinstance(table, dict):
        return [f"{path}: must be an object"]
    return [
        f"{path}.{k}: must be a gauge {{avg, max, last}}"
        for k, g in table.items()
        if not isinstance(g, dict) or not all(_num(g.get(x)) for x in _GAUGE_KEYS)
    ]


def merge_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Merge two records of one device into one record covering both intervals.

    Counters add; histograms add bucket-wise (bounds must match); gauges combine as a
    duration-weighted average, the maximum, and the later record's last value; `samples` adds.
    Order of the arguments does not matter. Neither input is modified.
    """
    first, second = sorted(
        (validate_metrics(dict(a)), validate_metrics(dict(b))),
        key=lambda r: (r["interval_start"], r["interval_end"]),
    )
    if first["device"] != second["device"]:
        raise MetricsFormatError(
            f"cannot merge metrics of {first['device']!r} and {second['device']!r}"
        )
    w1 = _weight(first)
    w2 = _weight(second)
    functions: dict[str, Any] = {}
    f1, f2 = first.get("functions", {}), second.get("functions", {})
    for name in sorted(set(f1) | set(f2)):
        if name not in f1 or name not in f2:
            functions[name] = json.loads(json.dumps(f1.get(name) or f2.get(name)))
            continue
        e1, e2 = f1[name], f2[name]
        entry: dict[str, Any] = {}
        for key in sorted(set(e1) | set(e2)):
            if key not in e1 or key not in e2:
                entry[key] = json.loads(json.dumps(e1.get(key, e2.get(key))))
            elif key == "latency_ms":
                entry[key] = _merge_hist(f"functions.{name}.latency_ms", e1[key], e2[key])
            elif key == "pool":
                entry[key] = _merge_gauges(e1[key], e2[key], w1, w2)
            else:
                entry[key] = e1[key] + e2[key]
        functions[name] = entry
    out: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "device": first["device"],
        "interval_start": first["interval_start"],
        "interval_end": max(first["interval_end"], second["interval_end"]),
        "samples": first.get("samples", 1) + second.get("samples", 1),
        "functions": functions,
    }
    system = _merge_gauges(first.get("system", {}), second.get("system", {}), w1, w2)
    if system:
        out["system"] = system
    return out


def _weight(rec: Mapping[str, Any]) -> float:
    # Weigh averages by time covered; zero-length intervals (tests, clock steps) by sample count.
    duration = float(rec["interval_end"] - rec["interval_start"])
    return duration if duration > 0 else 1e-9 * rec.get("samples", 1)


def _merge_hist(path: str, h1: Mapping[str, Any], h2: Mapping[str, Any]) -> dict[str, Any]:
    if list(h1["bounds"]) != list(h2["bounds"]):
        raise MetricsFormatError(f"{path}: histogram bounds differ, cannot merge")
    return {
        "bounds": list(h1["bounds"]),
        "counts": [x + y for x, y in zip(h1["counts"], h2["counts"], strict=True)],
        "sum": h1.get("sum", 0.0) + h2.get("sum", 0.0),
    }


def _merge_gauges(
    g1: Mapping[str, Any], g2: Mapping[str, Any], w1: float, w2: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(set(g1) | set(g2)):
        if key not in g1 or key not in g2:  # e.g. temperature appeared or vanished
            out[key] = dict(g1.get(key) or g2[key])
            continue
        a, b = g1[key], g2[key]
        out[key] = {
            "avg": (a["avg"] * w1 + b["avg"] * w2) / (w1 + w2),
            "max": max(a["max"], b["max"]),
            "last": b["last"],
        }
    return out


# ---------------------------------------------------------------------------------------------
# The outbox.
# ---------------------------------------------------------------------------------------------

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
_COLUMNS = "id, kind, topic, payload, key, created, attempts, interval_start, interval_end, size"


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
    return OutboxRecord(
        id=r[0],
        kind=r[1],
        topic=r[2],
        payload=bytes(r[3]),
        key=r[4],
        created=r[5],
        attempts=r[6],
        interval_start=r[7],
        interval_end=r[8],
        size=r[9],
    )


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
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future[Any], bool] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
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
        self._thread = threading.Thread(target=self._run, name="edgefn-outbox", daemon=True)
        self._thread.start()
        try:
            await self._call(self._init, txn=False)
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
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

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
        """The oldest `limit` records no other sender holds; each lease counts as an attempt."""
        return await self._call(lambda c: self._lease(c, limit))

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

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, txn: bool = True) -> T:
        if self._closed:
            raise OutboxError("outbox is closed", code="outbox_closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, fut, txn))
        return await asyncio.wrap_future(fut)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        err: OutboxError | None = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            err = OutboxError(f"cannot open outbox {self.path}: {exc}")
        while True:
            item = self._jobs.get()
            if item is None:
                break
            fn, fut, txn = item
            if not fut.set_running_or_notify_cancel():
                continue
            if err is not None or conn is None:
                fut.set_exception(err or OutboxError("outbox is not open"))
                continue
            leased_before = set(self._leased)
            total_before, drop_id_before = self._total, self._drop_event_id
            try:
                if txn:
                    # IMMEDIATE takes the write lock up front: no lock-upgrade failure midway.
                    conn.execute("BEGIN IMMEDIATE")
                result = fn(conn)
                if txn:
                    conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.exception("outbox rollback failed")
                # The database rolled back, so must our in-memory view of it.
                self._leased = leased_before
                self._total, self._drop_event_id = total_before, drop_id_before
                if isinstance(exc, sqlite3.Error):
                    exc = OutboxError(f"outbox database error: {exc}")
                elif not isinstance(exc, CloudSyncError | ValueError | TypeError):
                    log.exception("outbox job failed")
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        if conn is not None:
            conn.close()

    def _init(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"outbox {self.path}: cannot enable WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous=FULL")  # see the module docstring
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxError(f"outbox {self.path} has schema {version}, newer than this agent")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0]
        conn.execute("COMMIT")

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
            superseded = [r[0] for r in rows if r[0] not in self._leased]
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

        def order(r: tuple[int, str]) -> tuple[int, int, int]:
            # Records on the wire go last: dropping one is harmless but usually wasted.
            return (r[0] in self._leased, KIND_PRIORITY.get(r[1], DEFAULT_PRIORITY), r[0])

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
                found = [r[0] for r in rows]
                conn.execute(
                    f"DELETE FROM records WHERE id IN ({','.join('?' * len(found))})", found
                )
                freed = sum(r[1] for r in rows)
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
        picked = [_row(r) for r in rows if r[0] not in self._leased][:limit]
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

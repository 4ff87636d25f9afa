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
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cloud_sync.errors import CloudSyncError, OutboxError
from cloud_sync.metrics_record import (
    DEFAULT_LATENCY_BOUNDS_MS,
    METRICS_SCHEMA,
    gauge,
    merge_metrics,
    new_histogram,
    observe,
    validate_metrics,
)
from cloud_sync.outbox_records import (
    DROP_EVENT_RESERVE,
    KIND_PRIORITY,
    RECORD_OVERHEAD,
    OutboxRecord,
    OutboxStats,
    Records,
)
from runtimes.sqlitedb import Database, is_transient, transaction

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


class _Damaged(Exception):
    """The outbox file exists and SQLite says it is not a usable database."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class Outbox:
    """The async face of the outbox; create with `await Outbox.open(path, ...)`."""

    def __init__(self, path: Path, *, max_bytes: int, events_topic: str | None) -> None:
        self.path = Path(path)
        self.events_topic = events_topic
        reserve = DROP_EVENT_RESERVE if events_topic else 0
        if max_bytes < reserve + RECORD_OVERHEAD + 1:
            raise ValueError(f"max_bytes {max_bytes} is too small for any record")
        # Touched only on the writer thread.
        self._records = Records(self.path, max_bytes, events_topic, reserve)
        self._db: Database | None = None
        self._closed = False
        self._appended = asyncio.Event()
        # Set by `open` when a damaged file had to be set aside: what was wrong, where it went.
        self.recovered = ""
        self.recoveries = 0

    @property
    def max_bytes(self) -> int:
        return self._records.max_bytes

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        events_topic: str | None = None,
    ) -> Outbox:
        """Open (creating if needed) the outbox file; `events_topic` receives drop reports.

        A damaged file (garbage, truncated, failing `quick_check`) must not keep the agent from
        serving: telemetry is not worth every local function. It is set aside
        (`runtimes.setaside`: `outbox.db.corrupt-<stamp>`, the newest few kept), a fresh file is
        made, and an `outbox_recovered` event saying what was set aside waits in it for the link
        (`recovered` says the same to the caller). A busy file (another process holds the lock)
        and a schema from a newer agent are not damage: they raise `OutboxError`.
        """
        try:
            return await cls._open_once(Path(path), max_bytes, events_topic)
        except _Damaged as exc:
            problem = exc.problem
        from runtimes.setaside import set_aside

        try:
            aside = await asyncio.to_thread(set_aside, Path(path))
        except OSError as err:
            raise OutboxError(
                f"outbox {path} is damaged ({problem}) and cannot be set aside: {err}"
            ) from err
        log.warning(
            "outbox %s was damaged (%s): set aside as %s, starting empty", path, problem, aside
        )
        self = await cls._open_once(Path(path), max_bytes, events_topic)
        self.recovered = f"{problem}; set aside as {aside}"
        self.recoveries = 1
        if events_topic:
            payload = {
                "type": "outbox_recovered",
                "at": time.time(),
                "problem": problem,
                "set_aside": aside,
            }
            await self.append(
                "events", events_topic, json.dumps(payload, separators=(",", ":")).encode()
            )
        return self

    @classmethod
    async def _open_once(cls, path: Path, max_bytes: int, events_topic: str | None) -> Outbox:
        self = cls(path, max_bytes=max_bytes, events_topic=events_topic)
        # FULL: see the module docstring (power loss is the common failure of an edge box).
        self._db = Database(
            self.path, synchronous="FULL", setup=self._records.setup, name="edgefn-outbox"
        )
        try:
            await asyncio.wrap_future(self._db.opened)
        except sqlite3.Error as exc:
            await self.close()
            if not is_transient(exc) and await asyncio.to_thread(path.is_file):
                raise _Damaged(f"{type(exc).__name__}: {exc}") from exc
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
            lambda c: self._records.append(
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
        fut = self._submit(lambda c: self._records.lease(c, limit))
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
            self._db.submit(lambda c: self._records.leased.difference_update(ids), txn=False)

    async def peek(self, limit: int = 100) -> list[OutboxRecord]:
        """The oldest records, leased or not, without touching them (inspection, tests)."""
        return await self._call(lambda c: self._records.peek(c, limit))

    async def ack(self, ids: Iterable[int]) -> int:
        """Delete records the cloud acknowledged (PUBACK / HTTP 2xx); returns how many existed."""
        id_list = list(ids)
        if not id_list:
            return 0
        return await self._call(lambda c: self._records.delete(c, id_list, drop=False))

    async def release(self, ids: Iterable[int]) -> None:
        """Give leased records back unsent (the send failed); they are sent again later."""
        id_list = list(ids)
        if id_list:
            await self._call(lambda c: self._records.leased.difference_update(id_list), txn=False)

    async def discard(self, ids: Iterable[int]) -> int:
        """Drop records the cloud refused for good; counted and reported like bound drops."""
        id_list = list(ids)
        if not id_list:
            return 0
        return await self._call(lambda c: self._records.discard(c, id_list))

    async def stats(self) -> OutboxStats:
        return await self._call(self._records.stats)

    async def wait_for_records(self, within_s: float) -> bool:
        """Wait until something is appended (at most `within_s`); True if something was."""
        try:
            async with asyncio.timeout(within_s):
                await self._appended.wait()
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
        before = self._records.snapshot()
        try:
            if not txn:
                return fn(conn)
            with transaction(conn):
                return fn(conn)
        except BaseException as exc:
            self._records.restore(before)  # the database rolled back
            if isinstance(exc, sqlite3.Error):
                raise OutboxError(f"outbox database error: {exc}") from exc
            if not isinstance(exc, CloudSyncError | ValueError | TypeError):
                log.exception("outbox job failed")
            raise

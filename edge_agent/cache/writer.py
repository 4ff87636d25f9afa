"""The result cache's writer thread: it owns the write connection and every change to the file.

It drains its queue into one transaction at a time (`BEGIN IMMEDIATE ... COMMIT`, via
`runtimes.sqlitedb.transaction`): the queued rows, pending purges and invalidations, the LRU
touches the loop collected, and LRU eviction down to `LOW_WATER` of the byte bound whenever the
bound is passed, so a committed state never exceeds it. Between batches it checks the file is
still the one it opened (by inode), flushes touches and sweeps dead rows.

Failure handling lives here too. Any SQLite error other than "busy", a file that was deleted or
replaced under us, or a file that fails `PRAGMA quick_check` at open puts the cache in the
"degraded" state; the writer then closes its connections, sets a bad file aside
(`edge_agent.cache.files`), creates a fresh one and goes back to "ok"; if that fails it retries
with exponential backoff.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.cache.files import FileKeeper
from edge_agent.cache.shared import INSERT_ROW, Control, Put, Shared, resolve
from runtimes.sqlitedb import is_transient, transaction

log = logging.getLogger("edge_agent.cache")

# Eviction frees down to this fraction of the bound, so a full cache does not evict on every put.
LOW_WATER = 0.9
EVICT_BATCH = 256  # rows fetched per LRU eviction query
# One writer transaction takes at most this much, so a burst cannot hold the write lock long.
# BATCH_MAX_OPS also stays under SQLite's oldest limit of 999 variables per statement.
BATCH_MAX_OPS = 512
BATCH_MAX_BYTES = 8 * 1024 * 1024
CHECK_INTERVAL_S = 2.0  # how often the writer checks the file is still there (inode)
TOUCH_FLUSH_S = 1.0  # how stale the LRU column may get while the cache is idle
SWEEP_INTERVAL_S = 60.0  # how often entries past their stale window are deleted anyway
RETRY_INITIAL_S = 1.0  # first retry of a failed (re)creation; doubles up to RETRY_MAX_S
RETRY_MAX_S = 60.0

# Controls that change the file and so must not be lost while it is unusable: replayed at the
# next successful transaction (a file that comes back must not resurrect what they deleted).
_DEFERRABLE = ("purge", "invalidate", "resize")


class Writer(FileKeeper):
    """The writer thread: owns the write connection and every change to the file.

    Opening, checking and rebuilding the file are inherited (`FileKeeper`); this class is the
    queue, the batches and the transactions.
    """

    def __init__(
        self,
        path: Path,
        shared: Shared,
        max_bytes: int,
        clock: Callable[[], float],
        check_interval_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        super().__init__(path, shared, retry_initial_s, retry_max_s)
        self.max_bytes = max_bytes
        self.clock = clock
        self.check_interval_s = check_interval_s
        self.q: queue.SimpleQueue[Put | Control] = queue.SimpleQueue()
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, name="edgefn-cache-writer", daemon=True)
        # Counters only this thread writes; the loop reads them for stats().
        self.writes = 0
        self.evictions = 0
        self.expired = 0
        self.dropped = 0
        self.errors = 0
        self.busy_s = 0.0  # time spent in write transactions (cost per row = busy_s / writes)
        # Purges and invalidations that could not be applied yet (degraded, busy): applied at the
        # next successful transaction, so a file that comes back does not resurrect them.
        self.replay: list[tuple[str, tuple[Any, ...]]] = []
        # function -> scopes still wanted after the last invalidation: late puts of an old
        # version (a request that started before the switch) are dropped instead of stored.
        self.scopes: dict[str, frozenset[str]] = {}
        # Set by any delete in the running transaction: after its COMMIT the hot layer is
        # emptied (deletes are rare: purges, invalidations, sweeps, evictions).
        self.deleted = False
        now = time.monotonic()
        self.last_touch_flush = now
        self.last_sweep = now

    # -- thread main ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._open()
        finally:
            resolve(self.opened, None)
        stop: Control | None = None
        while stop is None:
            batch = self._next_batch()
            try:
                stop = self._apply(batch)
                self._periodic()
            except Exception as exc:  # a bug must not kill the thread and hang every caller
                log.exception("result cache writer failed")
                self.errors += 1
                for op in batch:
                    if isinstance(op, Control) and op.done is not None and not op.done.done():
                        op.done.set_exception(exc)
                    if isinstance(op, Control) and op.kind == "stop":
                        stop = op
        try:
            self._apply([])  # last touches
        except Exception:
            log.exception("result cache writer failed while closing")
        finally:
            self._close_conns()
            resolve(stop.done, None)

    def _next_batch(self) -> list[Put | Control]:
        try:
            first = self.q.get(timeout=self._timeout())
        except queue.Empty:
            return []
        batch = [first]
        size = first.size if isinstance(first, Put) else 0
        while len(batch) < BATCH_MAX_OPS and size < BATCH_MAX_BYTES:
            if isinstance(batch[-1], Control) and batch[-1].kind == "stop":
                break
            try:
                op = self.q.get_nowait()
            except queue.Empty:
                break
            batch.append(op)
            size += op.size if isinstance(op, Put) else 0
        return batch

    def _timeout(self) -> float:
        now = time.monotonic()
        if self.conn is None:
            due = self.next_retry
        else:
            due = min(
                self.last_check + self.check_interval_s,
                self.last_touch_flush + TOUCH_FLUSH_S,
                self.last_sweep + SWEEP_INTERVAL_S,
            )
        return min(max(due - now, 0.001), self.check_interval_s)

    def _periodic(self) -> None:
        now = time.monotonic()
        if self.conn is None:
            if now >= self.next_retry:
                self._open()
            return
        if now - self.last_check >= self.check_interval_s:
            self._check_file()
        if self.conn is not None and now - self.last_touch_flush >= TOUCH_FLUSH_S:
            self._apply([])
        if self.conn is not None and now - self.last_sweep >= SWEEP_INTERVAL_S:
            self.last_sweep = now
            self._apply([], sweep=True)

    # -- one transaction -----------------------------------------------------------------------

    def _apply(self, batch: list[Put | Control], sweep: bool = False) -> Control | None:
        """Write one batch in one transaction, in queue order; answer its controls.

        Returns the stop op if the batch holds one.
        """
        puts = [op for op in batch if isinstance(op, Put)]
        controls = [op for op in batch if isinstance(op, Control)]
        if puts:
            with self.shared.lock:
                self.shared.pending_bytes -= sum(p.size for p in puts)
        results: dict[int, int] = {}
        if self.conn is not None:
            with self.shared.lock:
                touches, self.shared.touches = self.shared.touches, {}
            self.last_touch_flush = time.monotonic()
            if batch or touches or self.replay or sweep:
                started = time.perf_counter()
                self._transaction(batch, touches, sweep, results)
                self.busy_s += time.perf_counter() - started
        else:
            self.dropped += len(puts)
            self.replay += [(c.kind, c.args) for c in controls if c.kind in _DEFERRABLE]
        stop = None
        for c in controls:
            if c.kind == "recover" and self.conn is not None:
                self._recover(str(c.args[0]))
            elif c.kind == "flush" and self.conn is not None:
                self._check_file()  # lets a test (or a health probe) see a deletion at once
            elif c.kind == "stop":
                stop = c
            if c.kind != "stop":
                resolve(c.done, results.get(id(c), 0))
        return stop

    def _transaction(
        self,
        batch: list[Put | Control],
        touches: dict[str, float],
        sweep: bool,
        results: dict[int, int],
    ) -> None:
        conn = self.conn
        assert conn is not None
        before = (self.entries, self.bytes, self.evictions, self.expired)
        replay, self.replay = self.replay, []
        self.deleted = False
        try:
            with transaction(conn):
                stored = self._write(batch, touches, sweep, results, replay)
            self._forget_hot(batch)
        except BaseException as exc:
            self.entries, self.bytes, self.evictions, self.expired = before
            results.clear()
            if not isinstance(exc, sqlite3.Error):
                self.replay = replay + self.replay
                raise  # a bug: _run logs it; the transaction is not left open
            mine = [(op.kind, op.args) for op in batch if isinstance(op, Control)]
            self.replay = replay + [m for m in mine if m[0] in _DEFERRABLE] + self.replay
            puts = sum(1 for op in batch if isinstance(op, Put))
            self.errors += 1
            self.dropped += puts
            if is_transient(exc):
                log.warning("result cache write skipped, database busy: %s", exc)
            else:
                self._recover(f"write failed: {exc}")
            return
        self.writes += stored
        self.dropped += sum(1 for op in batch if isinstance(op, Put)) - stored

    def _write(
        self,
        batch: list[Put | Control],
        touches: dict[str, float],
        sweep: bool,
        results: dict[int, int],
        replay: list[tuple[str, tuple[Any, ...]]],
    ) -> int:
        """The statements of one transaction, in queue order (replayed controls first);
        returns how many rows were stored."""
        conn = self.conn
        assert conn is not None
        stored = 0
        for kind, args in replay:  # queued before everything in this batch
            self._apply_control(kind, args)
        run: list[Put] = []  # consecutive puts go in as one executemany
        for op in batch:
            if isinstance(op, Put):
                run.append(op)
                continue
            stored += self._put_rows(run)
            run = []
            if op.kind in _DEFERRABLE:
                results[id(op)] = self._apply_control(op.kind, op.args)
        stored += self._put_rows(run)
        if touches:
            conn.executemany(
                "UPDATE entries SET last_access = ? WHERE key = ?",
                [(t, k) for k, t in touches.items()],
            )
        now = self.clock()
        if sweep:
            self.expired += self._delete("stale_until <= ?", (now,))[0]
        self._evict(now)
        return stored

    def _forget_hot(self, batch: list[Put | Control]) -> None:
        """After a COMMIT: the hot layer must not answer a row this transaction replaced or
        deleted. Under the lock, so a lookup's SELECT-then-remember cannot interleave."""
        with self.shared.lock:
            hot = self.shared.hot
            if not hot.rows:
                return
            if self.deleted:
                hot.clear()
                return
            for op in batch:
                if isinstance(op, Put):
                    hot.drop(op.row.key)

    def _put_rows(self, puts: list[Put]) -> int:
        """Insert or replace rows; returns how many were stored."""
        rows = [
            p.row for p in puts if p.row.scope in self.scopes.get(p.row.function, (p.row.scope,))
        ]
        if not rows:  # (an old version's result that arrived after the switch is dropped)
            return 0
        conn = self.conn
        assert conn is not None
        keys = list({r.key for r in rows})  # <= BATCH_MAX_OPS, under SQLite's 999 variables
        marks = ",".join("?" * len(keys))
        sizes: dict[str, int] = dict(
            conn.execute(f"SELECT key, size FROM entries WHERE key IN ({marks})", keys).fetchall()
        )
        conn.executemany(INSERT_ROW, rows)
        for r in rows:
            old = sizes.get(r.key)
            self.entries += old is None
            self.bytes += r.size - (old or 0)
            sizes[r.key] = r.size
        return len(rows)

    def _apply_control(self, kind: str, args: tuple[Any, ...]) -> int:
        if kind == "resize":  # the transaction's eviction then honours the new bound
            (self.max_bytes,) = args
            return 0
        if kind == "purge":
            (function,) = args
            return self._delete("function = ?", (function,))[0]
        function, keep = args
        self.scopes[function] = keep
        marks = ", ".join("?" * len(keep))
        return self._delete(f"function = ? AND scope NOT IN ({marks})", (function, *keep))[0]

    def _delete(self, where: str, params: tuple[Any, ...]) -> tuple[int, int]:
        conn = self.conn
        assert conn is not None
        n, size = conn.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM entries WHERE {where}", params
        ).fetchone()
        if n:
            conn.execute(f"DELETE FROM entries WHERE {where}", params)
            self.deleted = True
            self.entries -= n
            self.bytes -= size
        return int(n), int(size)

    def _evict(self, now: float) -> None:
        """Keep the committed total under the bound: dead entries first, then least recent."""
        if self.bytes <= self.max_bytes:
            return
        conn = self.conn
        assert conn is not None
        self.expired += self._delete("stale_until <= ?", (now,))[0]
        target = int(self.max_bytes * LOW_WATER)
        while self.bytes > target:
            rows = conn.execute(
                "SELECT key, size FROM entries ORDER BY last_access LIMIT ?", (EVICT_BATCH,)
            ).fetchall()
            if not rows:
                break
            victims = []
            for key, size in rows:
                victims.append((key,))
                self.bytes -= size
                self.entries -= 1
                if self.bytes <= target:
                    break
            conn.executemany("DELETE FROM entries WHERE key = ?", victims)
            self.deleted = True
            self.evictions += len(victims)

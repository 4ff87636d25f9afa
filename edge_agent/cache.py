"""The result cache: successful function results in a local SQLite file, behind an async API.

Flow of one invocation (the router drives it; `run_cached` is that flow in one call):

1. `policy.key_for(...)` (edge_agent.cache_policy) derives the `CacheKey` from the request.
2. `await cache.get(key)` looks in a small in-memory hot layer of rows read before (`_Hot`),
   else does one primary-key SELECT on a read connection, run directly on the event loop thread
   (see `_find` for the measurement that justifies it). A hit records the key in an in-memory
   "touched" map; the LRU column is updated later, in batches, by the writer.
3. On a miss the function runs. Only a successful `Result` is offered to `cache.put(...)`, which
   checks the arguments, puts a row on a queue and returns at once. Errors are exceptions in this
   code base, so they never reach `put`; `put` refuses anything that is not bytes.
4. One writer thread owns the write connection. It drains the queue into one transaction
   (`BEGIN IMMEDIATE ... COMMIT`): the rows, pending purges, the touched map, and LRU eviction
   down to 90 % of the byte bound whenever the bound is passed, so a committed state never
   exceeds it.

Failure handling lives in the writer too. Any SQLite error other than "busy", a file that was
deleted or replaced under us (checked by inode every `check_interval_s`), or a file that fails
`PRAGMA quick_check` at open puts the cache in the "degraded" state: `get` answers None, `put`
drops, `stats()` says why. The writer then closes its connections, renames a bad file aside
(`<name>.corrupt-<UTC timestamp>` plus its -wal/-shm), creates a fresh file, and goes back to
"ok"; if that fails it retries with exponential backoff. Callers never see an exception from a
broken cache: a cache is an optimisation, the function can always run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from edge_agent.cache_policy import CacheKey, CachePolicy
from runtimes.errors import RuntimeErrorBase
from runtimes.invocation import Result

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# One entry may use at most this share of the bound (and 1 MiB): a single large result must not
# flush the whole cache, and reading one value on the loop thread stays a short copy.
MAX_ENTRY_SHARE = 8
MAX_ENTRY_BYTES = 1024 * 1024
# Accounted per row on top of value and key: SQLite's record header, cell pointer and the index
# entries (the key is stored twice: table row and primary-key index). An estimate, not exact.
ROW_OVERHEAD = 64
# Eviction frees down to this fraction of the bound, so a full cache does not evict on every put.
LOW_WATER = 0.9
EVICT_BATCH = 256  # rows fetched per LRU eviction query
# One writer transaction takes at most this much, so a burst cannot hold the write lock long.
# BATCH_MAX_OPS also stays under SQLite's oldest limit of 999 variables per statement.
BATCH_MAX_OPS = 512
BATCH_MAX_BYTES = 8 * 1024 * 1024
# Results queued for the writer but not yet written; past it `put` drops (counted). Bounds the
# memory a slow or stuck disk can pin.
MAX_PENDING_BYTES = 16 * 1024 * 1024
CHECK_INTERVAL_S = 2.0  # how often the writer checks the file is still there (inode)
TOUCH_FLUSH_S = 1.0  # how stale the LRU column may get while the cache is idle
SWEEP_INTERVAL_S = 60.0  # how often entries past their stale window are deleted anyway
RETRY_INITIAL_S = 1.0  # first retry of a failed (re)creation; doubles up to RETRY_MAX_S
RETRY_MAX_S = 60.0
KEEP_SET_ASIDE = 2  # newest set-aside corrupt files kept; older ones deleted (a failing disk
# would otherwise fill itself with copies)
CLOSE_TIMEOUT_S = 10.0  # how long close() waits for the writer to flush
WRITER_BUSY_TIMEOUT_S = 5.0  # only another process (an operator's sqlite3 shell) can hold the lock
WAL_SIZE_LIMIT = 16 * 1024 * 1024  # the WAL file is truncated back to this after a checkpoint
# The in-memory hot layer in front of the SQLite read (see `_Hot`): at most this many bytes of
# values (and this share of the cache bound), entries above HOT_MAX_ENTRY_BYTES never enter it.
# 2 MiB holds ~10 k typical small results and keeps the agent within its idle-RSS target.
HOT_MAX_BYTES = 2 * 1024 * 1024
HOT_SHARE = 8
HOT_MAX_ENTRY_BYTES = 64 * 1024
HOT_OVERHEAD = 200  # per entry: the tuple, the key string, the OrderedDict node (an estimate)

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6

_SELECT = "SELECT value, content_type, created, expires, stale_until FROM entries WHERE key = ?"
_INSERT = (
    "INSERT OR REPLACE INTO entries (key, function, scope, value, content_type, created, "
    "expires, stale_until, size, last_access) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

EntryStatus = Literal["fresh", "stale"]
CacheStatus = Literal["hit", "miss", "stale", "bypass"]
State = Literal["ok", "degraded"]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    value: bytes
    content_type: str
    created: float  # clock() seconds when the result was put
    expires: float  # fresh until then
    stale_until: float  # servable as "stale" (only when the function fails) until then
    status: EntryStatus
    age_s: float  # at lookup; the HTTP API can send it as the Age header


@dataclass(frozen=True, slots=True)
class CachedResult:
    """What `run_cached` answers: the result and where it came from."""

    result: Result
    status: CacheStatus
    age_s: float = 0.0


# --- schema ------------------------------------------------------------------------------------
# Each step brings the schema from version i to i + 1. Append, never edit a released step.


def _m1_entries(db: sqlite_utils.Database) -> None:
    entries = db.table("entries")
    entries.create(
        {
            "key": str,
            "function": str,
            "scope": str,
            "value": bytes,
            "content_type": str,
            "created": float,
            "expires": float,
            "stale_until": float,
            "size": int,
            "last_access": float,
        },
        pk="key",
        not_null=[
            *("function", "scope", "value", "content_type"),
            *("created", "expires", "stale_until", "size", "last_access"),
        ],
    )
    entries.create_index(["last_access"])  # LRU eviction
    entries.create_index(["function", "scope"])  # purge, version invalidation
    entries.create_index(["stale_until"])  # sweeping dead entries


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_m1_entries,)


class _Unusable(Exception):
    """The file cannot be opened or created now; retried with backoff."""


class _Incompatible(Exception):
    """The file is a SQLite database, but not one we can use (newer schema, missing table)."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date in one transaction; return the version it now has."""
    import sqlite_utils  # only here: importing it costs the agent ~4 MB of RSS at start

    db = sqlite_utils.Database(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not db.table("schema_version").exists():
            db.table("schema_version").create({"id": int, "version": int}, pk="id")
            conn.execute("INSERT INTO schema_version (id, version) VALUES (1, 0)")
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise _Incompatible(
                f"schema version {current} is newer than this agent knows ({len(MIGRATIONS)})"
            )
        for step in MIGRATIONS[current:]:
            step(db)
        conn.execute(
            "INSERT OR REPLACE INTO schema_version (id, version) VALUES (1, ?)", (len(MIGRATIONS),)
        )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    columns = {c.name for c in db.table("entries").columns}
    if not {"key", "value", "size", "last_access", "stale_until"} <= columns:
        raise _Incompatible(f"table 'entries' lacks columns (has {sorted(columns)})")
    return len(MIGRATIONS)


# --- what the loop and the writer share -------------------------------------------------------

# A committed row as the hot layer keeps it: value, content_type, created, expires, stale_until,
# and the `Result` a hit answers with (immutable, so every hit can share the one object).
_Row = tuple[bytes, str, float, float, float, Result]


class _Hot:
    """Rows read from SQLite recently, kept in memory so a repeated hit costs no SELECT.

    Why: a hit through SQLite costs ~20 us on the loop (lock, statement, row tuple); from this
    dict it is ~1-2 us, and at the agent's request rates that is most of what a hit costs on
    top of aiohttp itself (bench/cache.py). Semantics stay those of the file:
      * only rows that were read from SQLite (committed) enter, never a queued `put`;
      * expiry and the stale window are checked against the row's own times on every lookup;
      * the writer drops a key after it committed a new row for it, and empties the layer after
        any committed delete (purge, invalidation, sweep, eviction) and whenever the read
        connection is dropped or replaced (degraded, recovery);
      * LRU bookkeeping still goes through `_Shared.touches` to the writer, in batches.
    One gap, accepted: rows changed by another process (an operator's sqlite3 shell) are not
    seen until one of the events above. Guarded by `_Shared.lock`, like everything shared.
    """

    __slots__ = ("max_bytes", "rows", "size")

    def __init__(self, max_bytes: int) -> None:
        self.rows: OrderedDict[str, _Row] = OrderedDict()
        self.size = 0
        self.max_bytes = max_bytes

    def add(self, kid: str, row: _Row) -> None:
        cost = len(row[0]) + len(kid) + HOT_OVERHEAD
        if cost > HOT_MAX_ENTRY_BYTES or cost > self.max_bytes:
            return
        self.drop(kid)
        self.rows[kid] = row
        self.size += cost
        while self.size > self.max_bytes:
            old, dropped = self.rows.popitem(last=False)
            self.size -= len(dropped[0]) + len(old) + HOT_OVERHEAD

    def drop(self, kid: str) -> None:
        row = self.rows.pop(kid, None)
        if row is not None:
            self.size -= len(row[0]) + len(kid) + HOT_OVERHEAD

    def clear(self) -> None:
        self.rows.clear()
        self.size = 0


@dataclass
class _Shared:
    """State touched by both threads. Every field is read and written under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: sqlite3.Connection | None = None  # created/closed by the writer, used by the loop
    retired: list[sqlite3.Connection] = field(default_factory=list)  # readers that failed
    state: State = "degraded"
    reason: str = "not opened yet"
    touches: dict[str, float] = field(default_factory=dict)  # key id -> last access
    pending_bytes: int = 0
    hot: _Hot = field(default_factory=lambda: _Hot(HOT_MAX_BYTES))


@dataclass
class _Put:
    row: tuple[Any, ...]
    size: int


@dataclass
class _Control:
    kind: Literal["purge", "invalidate", "flush", "resize", "recover", "stop"]
    args: tuple[Any, ...] = ()
    done: concurrent.futures.Future[Any] | None = None


def _is_transient(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


_DEFERRABLE = ("purge", "invalidate", "resize")


def _resolve(fut: concurrent.futures.Future[Any] | None, value: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)


class _Writer:
    """The writer thread: owns the write connection and every change to the file."""

    def __init__(
        self,
        path: Path,
        shared: _Shared,
        max_bytes: int,
        clock: Callable[[], float],
        check_interval_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self.path = path
        self.shared = shared
        self.max_bytes = max_bytes
        self.clock = clock
        self.check_interval_s = check_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.q: queue.SimpleQueue[_Put | _Control] = queue.SimpleQueue()
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, name="edgefn-cache-writer", daemon=True)
        self.conn: sqlite3.Connection | None = None
        self.identity: tuple[int, int] | None = None
        # Counters only this thread writes; the loop reads them for stats().
        self.entries = 0
        self.bytes = 0
        self.writes = 0
        self.evictions = 0
        self.expired = 0
        self.dropped = 0
        self.errors = 0
        self.recoveries = 0
        self.last_recovery = ""
        self.busy_s = 0.0  # time spent in write transactions (cost per row = busy_s / writes)
        self.cause = ""  # why the running cache had to be reopened, until that succeeds
        # Purges and invalidations that could not be applied yet (degraded, busy): applied at the
        # next successful transaction, so a file that comes back does not resurrect them.
        self.replay: list[tuple[str, tuple[Any, ...]]] = []
        # function -> scopes still wanted after the last invalidation: late puts of an old
        # version (a request that started before the switch) are dropped instead of stored.
        self.scopes: dict[str, frozenset[str]] = {}
        self.retry_delay = retry_initial_s
        self.next_retry = 0.0
        # Set by any delete in the running transaction: after its COMMIT the hot layer is
        # emptied (deletes are rare: purges, invalidations, sweeps, evictions).
        self.deleted = False
        now = time.monotonic()
        self.last_check = now
        self.last_touch_flush = now
        self.last_sweep = now

    # -- thread main ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._open()
        finally:
            _resolve(self.opened, None)
        stop: _Control | None = None
        while stop is None:
            batch = self._next_batch()
            try:
                stop = self._apply(batch)
                self._periodic()
            except Exception as exc:  # a bug must not kill the thread and hang every caller
                log.exception("result cache writer failed")
                self.errors += 1
                for op in batch:
                    if isinstance(op, _Control) and op.done is not None and not op.done.done():
                        op.done.set_exception(exc)
                    if isinstance(op, _Control) and op.kind == "stop":
                        stop = op
        try:
            self._apply([])  # last touches
        except Exception:
            log.exception("result cache writer failed while closing")
        finally:
            self._close_conns()
            _resolve(stop.done, None)

    def _next_batch(self) -> list[_Put | _Control]:
        try:
            first = self.q.get(timeout=self._timeout())
        except queue.Empty:
            return []
        batch = [first]
        size = first.size if isinstance(first, _Put) else 0
        while len(batch) < BATCH_MAX_OPS and size < BATCH_MAX_BYTES:
            if isinstance(batch[-1], _Control) and batch[-1].kind == "stop":
                break
            try:
                op = self.q.get_nowait()
            except queue.Empty:
                break
            batch.append(op)
            size += op.size if isinstance(op, _Put) else 0
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

    def _apply(self, batch: list[_Put | _Control], sweep: bool = False) -> _Control | None:
        """Write one batch in one transaction, in queue order; answer its controls.

        Returns the stop op if the batch holds one.
        """
        puts = [op for op in batch if isinstance(op, _Put)]
        controls = [op for op in batch if isinstance(op, _Control)]
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
                _resolve(c.done, results.get(id(c), 0))
        return stop

    def _transaction(
        self,
        batch: list[_Put | _Control],
        touches: dict[str, float],
        sweep: bool,
        results: dict[int, int],
    ) -> None:
        conn = self.conn
        assert conn is not None
        before = (self.entries, self.bytes, self.evictions, self.expired)
        stored = 0
        replay, self.replay = self.replay, []
        self.deleted = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            for kind, args in replay:  # queued before everything in this batch
                self._apply_control(kind, args)
            run: list[_Put] = []  # consecutive puts go in as one executemany
            for op in batch:
                if isinstance(op, _Put):
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
            conn.execute("COMMIT")
            self._forget_hot(batch)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.entries, self.bytes, self.evictions, self.expired = before
            results.clear()
            if not isinstance(exc, sqlite3.Error):
                self.replay = replay + self.replay
                raise  # a bug: _run logs it; the transaction is not left open
            mine = [(op.kind, op.args) for op in batch if isinstance(op, _Control)]
            self.replay = replay + [m for m in mine if m[0] in _DEFERRABLE] + self.replay
            puts = sum(1 for op in batch if isinstance(op, _Put))
            self.errors += 1
            self.dropped += puts
            if _is_transient(exc):
                log.warning("result cache write skipped, database busy: %s", exc)
            else:
                self._recover(f"write failed: {exc}")
            return
        self.writes += stored
        self.dropped += sum(1 for op in batch if isinstance(op, _Put)) - stored

    def _forget_hot(self, batch: list[_Put | _Control]) -> None:
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
                if isinstance(op, _Put):
                    hot.drop(op.row[0])

    def _put_rows(self, puts: list[_Put]) -> int:
        """Insert or replace rows; returns how many were stored."""
        rows = [p.row for p in puts if p.row[2] in self.scopes.get(p.row[1], (p.row[2],))]
        if not rows:  # (an old version's result that arrived after the switch is dropped)
            return 0
        conn = self.conn
        assert conn is not None
        keys = list({r[0] for r in rows})  # <= BATCH_MAX_OPS, under SQLite's 999 variables
        marks = ",".join("?" * len(keys))
        sizes: dict[str, int] = dict(
            conn.execute(f"SELECT key, size FROM entries WHERE key IN ({marks})", keys).fetchall()
        )
        conn.executemany(_INSERT, rows)
        for r in rows:
            old = sizes.get(r[0])
            self.entries += old is None
            self.bytes += r[8] - (old or 0)
            sizes[r[0]] = r[8]
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

    # -- opening, checking, recovering ---------------------------------------------------------

    def _set_state(self, state: State, reason: str) -> None:
        with self.shared.lock:
            changed = self.shared.state != state
            self.shared.state = state
            self.shared.reason = reason
        if changed and state == "degraded":
            log.warning("result cache degraded (%s): %s", self.path, reason)
        elif changed:
            log.info("result cache ready: %s", self.path)

    def _open(self) -> None:
        """Open or create the file; on failure stay degraded and schedule a retry."""
        try:
            note = self._open_or_rebuild()
        except Exception as exc:
            if not isinstance(exc, _Unusable | OSError | sqlite3.Error | _Incompatible):
                log.exception("result cache: unexpected error opening %s", self.path)
            self._close_conns()
            self._set_state("degraded", str(exc))
            self.next_retry = time.monotonic() + self.retry_delay
            self.retry_delay = min(self.retry_delay * 2, self.retry_max_s)
            return
        if note or self.cause:
            self.recoveries += 1
            self.last_recovery = "; ".join(filter(None, (self.cause, note)))
            self.cause = ""
            log.warning("result cache rebuilt (%s): %s", self.path, self.last_recovery)
        self.retry_delay = self.retry_initial_s
        self.last_check = time.monotonic()
        self._set_state("ok", "")

    def _open_or_rebuild(self) -> str:
        """Returns what had to be done to the old file ("" if it was fine)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _Unusable(f"cannot create directory {self.path.parent}: {exc}") from exc
        if not self.path.exists():
            self._remove_orphans()
        try:
            self._connect()
            return ""
        except (sqlite3.Error, _Incompatible) as exc:
            self._close_conns()
            # Busy: another process holds the file; it is not ours to move. Missing: the
            # directory refused to create it. Not a regular file: an operator's mistake.
            if _is_transient(exc) or not self.path.is_file():
                raise _Unusable(f"cannot open {self.path}: {exc}") from exc
            problem = f"{type(exc).__name__}: {exc}"
        try:
            aside = self._set_aside()
        except OSError as exc:
            raise _Unusable(
                f"{self.path} is unusable ({problem}) and cannot be set aside: {exc}"
            ) from exc
        self._connect()
        return f"{problem}; set aside as {aside}"

    def _connect(self) -> None:
        uri = self.path.absolute().as_uri()
        conn = sqlite3.connect(
            f"{uri}?mode=rwc", uri=True, isolation_level=None, timeout=WRITER_BUSY_TIMEOUT_S
        )
        self.conn = conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _Incompatible(f"cannot switch to WAL mode (journal_mode is {mode})")
        # NORMAL in WAL mode: a commit is durable against a process crash, a power cut may lose
        # the last commits but never corrupts the file. Right for a cache (17 us vs 196 us/row).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # Reads every page once: catches garbage and truncated files at open, off the loop
        # thread (a 64 MiB file takes ~0.1 s), instead of on some later request.
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"quick_check: {'; '.join(map(str, problems))}")
        migrate(conn)
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)
        n, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM entries").fetchone()
        self.entries, self.bytes = int(n), int(size)
        reader = sqlite3.connect(
            f"{uri}?mode=rw", uri=True, isolation_level=None, timeout=0, check_same_thread=False
        )
        try:
            reader.execute("PRAGMA query_only=1")
            reader.execute(_SELECT, ("",)).fetchone()  # compiles and caches the statement
        except sqlite3.Error:
            reader.close()
            raise
        with self.shared.lock:
            self.shared.reader = reader
            self.shared.hot.clear()  # rows remembered from another file must not answer

    def _close_conns(self) -> None:
        # Readers first: the writer's connection must be the last one to close. The last close
        # checkpoints and deletes "<name>-wal" by path, which must still be this file's WAL.
        with self.shared.lock:
            readers = [*self.shared.retired, *([self.shared.reader] if self.shared.reader else [])]
            self.shared.reader = None
            self.shared.retired = []
            self.shared.hot.clear()
        for c in [*readers, *([self.conn] if self.conn else [])]:
            with contextlib.suppress(sqlite3.Error):
                c.close()
        self.conn = None

    def _check_file(self) -> None:
        self.last_check = time.monotonic()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._recover("database file was deleted", orphaned=True)
            return
        except OSError as exc:
            self._recover(f"cannot stat database file: {exc}")
            return
        if (st.st_dev, st.st_ino) != self.identity:
            self._recover("database file was replaced", orphaned=True)

    def _recover(self, reason: str, orphaned: bool = False) -> None:
        self._set_state("degraded", reason)
        self._close_conns()
        if orphaned:
            # SQLite does not checkpoint or delete the WAL of a file that was moved or unlinked
            # while open, so "<name>-wal" still holds the old file's pages. Opened beside the
            # new file it would be replayed into it.
            self._remove_orphans()
        self.cause = reason
        self.retry_delay = self.retry_initial_s
        self._open()

    def _remove_orphans(self) -> None:
        # A -wal without its database belongs to a file that is gone. Left in place, SQLite would
        # replay it into the new, empty database.
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    def _set_aside(self) -> str:
        # UTC with microseconds: names sort in the order the copies were made (pruning relies
        # on it) and two rebuilds in one second do not collide.
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        base = f"{self.path}.corrupt-{stamp}"
        n = 0
        while any(os.path.lexists(base + s) for s in ("", "-wal", "-shm")):
            n += 1
            base = f"{self.path}.corrupt-{stamp}-{n}"
        os.replace(self.path, base)  # first: if this fails, nothing moved
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", base + suffix)
        self._prune_set_aside()
        return os.path.basename(base)

    def _prune_set_aside(self) -> None:
        prefix = f"{self.path.name}.corrupt-"
        try:
            names = [p.name for p in self.path.parent.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return
        bases = sorted({n.removesuffix("-wal").removesuffix("-shm") for n in names})
        for old in bases[:-KEEP_SET_ASIDE]:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    (self.path.parent / (old + suffix)).unlink()


class ResultCache:
    """Successful function results, keyed by `CacheKey`, bounded in bytes, LRU-evicted.

    Use from one event loop. `open` never fails because of the file: a cache that cannot be
    used starts (and stays, while it retries) "degraded", answering every `get` with None.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        clock: Callable[[], float],
        max_entry_bytes: int | None,
        check_interval_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.max_entry_bytes = (
            max_entry_bytes
            if max_entry_bytes is not None
            else min(MAX_ENTRY_BYTES, max_bytes // MAX_ENTRY_SHARE)
        )
        self._clock = clock
        self._shared = _Shared()
        self._shared.hot.max_bytes = min(HOT_MAX_BYTES, max_bytes // HOT_SHARE)
        self._writer = _Writer(
            path, self._shared, max_bytes, clock, check_interval_s, retry_initial_s, retry_max_s
        )
        self._closed = False
        # Counters written only on the loop thread.
        self._hits = 0
        self._misses = 0
        self._stale_hits = 0
        self._read_errors = 0
        self._dropped = 0

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        clock: Callable[[], float] = time.time,
        max_entry_bytes: int | None = None,
        check_interval_s: float = CHECK_INTERVAL_S,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> ResultCache:
        """Start the writer thread and wait for its first open attempt (ok or degraded).

        `clock` is wall-clock seconds (entries outlive the process, so not monotonic); tests
        pass their own to move time without sleeping.
        """
        self = cls(
            Path(path),
            max_bytes,
            clock=clock,
            max_entry_bytes=max_entry_bytes,
            check_interval_s=check_interval_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )
        self._writer.thread.start()
        try:
            await asyncio.wrap_future(self._writer.opened)
        except BaseException:
            self._closed = True
            self._writer.q.put(_Control("stop"))
            raise
        return self

    async def __aenter__(self) -> ResultCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Write everything queued, then stop the writer and close the file."""
        if self._closed:
            return
        self._closed = True
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._writer.q.put(_Control("stop", (), done))
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("result cache writer did not finish within %.0f s", CLOSE_TIMEOUT_S)
        await asyncio.to_thread(self._writer.thread.join, CLOSE_TIMEOUT_S)

    # -- reads (loop thread) -------------------------------------------------------------------

    def _find(self, kid: str) -> tuple[_Row, float] | None:
        """The live row of key id `kid` and the clock reading it was judged by, or None.

        First the hot layer (`_Hot`, a dict lookup), else one primary-key SELECT, directly on
        the calling (loop) thread; a row found by the SELECT enters the hot layer.

        Why the SELECT is not in a thread: the read is a B-tree lookup in pages that are in
        SQLite's or the OS's page cache. Measured on the 2-core dev VM (tests/test_cache_perf.py,
        `-s`): a whole `get` hit through SQLite takes a median of 16-24 us on the loop, while the
        same lookup through `asyncio.to_thread` takes 130-230 us (p99 in milliseconds): the hop
        would cost ten times the read. The worst case on the loop is a page not in memory (one
        cold read from flash, ~0.1-1 ms) or copying one value of at most `max_entry_bytes`. The
        reader never waits on a lock: WAL readers do not block on the writer, and its busy
        timeout is 0 (busy = miss). No mmap: a file truncated under an mmap kills the process
        with SIGBUS.
        """
        shared = self._shared
        with shared.lock:
            conn = shared.reader
            if conn is None:
                return None
            hot = shared.hot
            row: _Row | None = hot.rows.get(kid)
            if row is not None:
                now = self._clock()
                if now >= row[4]:
                    hot.drop(kid)  # past its stale window: dead, the writer sweeps the row
                    return None
                hot.rows.move_to_end(kid)
                shared.touches[kid] = now
                return row, now
            try:
                found = conn.execute(_SELECT, (kid,)).fetchone()
            except sqlite3.Error as exc:
                self._read_errors += 1
                if not _is_transient(exc):
                    # Stop using this connection now; the writer closes it and rebuilds.
                    shared.reader = None
                    shared.retired.append(conn)
                    shared.state = "degraded"
                    shared.reason = f"read failed: {exc}"
                    hot.clear()
                    self._writer.q.put(_Control("recover", (f"read failed: {exc}",)))
                return None
            if found is None:
                return None
            now = self._clock()
            if now >= found[4]:
                return None
            row = (*found, Result(found[0], found[1]))
            hot.add(kid, row)
            shared.touches[kid] = now
        return row, now

    def _lookup(self, key: CacheKey) -> CacheEntry | None:
        found = self._find(key.id)
        if found is None:
            return None
        (value, content_type, created, expires, stale_until, _), now = found
        return CacheEntry(
            value=value,
            content_type=content_type,
            created=created,
            expires=expires,
            stale_until=stale_until,
            status="fresh" if now < expires else "stale",
            age_s=max(0.0, now - created),
        )

    async def get(self, key: CacheKey, *, allow_stale: bool = False) -> CacheEntry | None:
        """The entry for `key`, or None. A stale entry (past `expires`, within `stale_until`) is
        returned only with `allow_stale=True`: the caller does that after the function failed.

        Async although it does not await today, so the read can move to a thread without
        changing callers.
        """
        entry = self._lookup(key)
        if entry is None or (entry.status == "stale" and not allow_stale):
            self._misses += 1
            return None
        if entry.status == "fresh":
            self._hits += 1
        else:
            self._stale_hits += 1
        return entry

    # -- writes (queued to the writer) ---------------------------------------------------------

    def put(
        self,
        key: CacheKey,
        value: bytes | bytearray | memoryview,
        content_type: str,
        ttl_s: float,
        stale_if_error_s: float = 0.0,
    ) -> bool:
        """Queue a *successful* result; returns at once. True if queued, False if dropped.

        Only bytes are accepted: an error (an exception, an error body) must never be cached, and
        the router only calls this after the function succeeded. The entry becomes visible to
        `get` once the writer commits it (normally within a millisecond; `flush()` waits).
        """
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(
                f"only a successful result's payload (bytes) can be cached, got {type(value)!r}"
            )
        if not isinstance(content_type, str):
            raise TypeError("content_type must be a string")
        for name, v in (("ttl_s", ttl_s), ("stale_if_error_s", stale_if_error_s)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if ttl_s <= 0 or stale_if_error_s < 0:
            raise ValueError(
                f"need ttl_s > 0 and stale_if_error_s >= 0, got {ttl_s}, {stale_if_error_s}"
            )
        kid = key.id
        data = bytes(value)
        size = len(data) + len(content_type) + 2 * len(kid) + ROW_OVERHEAD
        shared = self._shared
        with shared.lock:
            if (
                self._closed
                or shared.state != "ok"
                or size > self.max_entry_bytes
                or shared.pending_bytes + size > MAX_PENDING_BYTES
            ):
                self._dropped += 1
                return False
            shared.pending_bytes += size
        now = self._clock()
        expires = now + ttl_s
        stale_until = expires + stale_if_error_s
        row = (
            kid,
            key.function,
            key.scope,
            data,
            content_type,
            now,
            expires,
            stale_until,
            size,
            now,
        )
        self._writer.q.put(_Put(row, size))
        return True

    async def _control(
        self, kind: Literal["purge", "invalidate", "flush", "resize"], *args: Any
    ) -> Any:
        if self._closed:
            raise RuntimeError("the result cache is closed")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._writer.q.put(_Control(kind, args, done))
        return await asyncio.wrap_future(done)

    async def purge(self, function: str) -> int:
        """Delete every entry of `function` (all versions and epochs); return how many.

        Writes queued before the call are applied first. While degraded it answers 0 and the
        purge is applied once the file is usable again.
        """
        return int(await self._control("purge", function))

    async def invalidate_function(
        self, function: str, keep_version: str, keep_epoch: str | None = None
    ) -> int:
        """The active version of `function` changed: delete entries of every other version.

        Entries keyed by an epoch survive only if it is `keep_epoch` (the epoch the new version
        declares). Later puts for other versions/epochs are dropped. Returns rows deleted.
        """
        keep = {f"v={keep_version}"}
        if keep_epoch is not None:
            keep.add(f"e={keep_epoch}")
        return int(await self._control("invalidate", function, frozenset(keep)))

    async def set_max_bytes(self, max_bytes: int) -> None:
        """Change the byte bound live (device config); a lower bound evicts at once."""
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(MAX_ENTRY_BYTES, max_bytes // MAX_ENTRY_SHARE)
        with self._shared.lock:
            self._shared.hot.max_bytes = min(HOT_MAX_BYTES, max_bytes // HOT_SHARE)
        await self._control("resize", max_bytes)

    async def flush(self) -> None:
        """Wait until everything queued so far (and the LRU touches) is committed, and check the
        file is still in place. For tests and orderly hand-offs; never needed for correctness."""
        await self._control("flush")

    # -- the router's flow in one call ---------------------------------------------------------

    async def run_cached(
        self,
        key: CacheKey | None,
        policy: CachePolicy,
        run: Callable[[], Awaitable[Result]],
        *,
        stale_on: tuple[type[BaseException], ...] = (RuntimeErrorBase,),
    ) -> CachedResult:
        """Answer from the cache, or run the function and cache its result if it succeeded.

        If `run` raises one of `stale_on` and an entry within its stale-if-error window exists,
        that entry is answered with status "stale"; otherwise the error propagates unchanged.
        Errors are never cached. `key=None` or a disabled policy bypasses the cache.
        """
        if key is None or not policy.enabled:
            return CachedResult(await run(), "bypass")
        # The row tuple, not a CacheEntry: a hit builds only the Result it answers with.
        found = self._find(key.id)
        if found is not None:
            row, now = found
            if now < row[3]:
                self._hits += 1
                return CachedResult(row[5], "hit", max(0.0, now - row[2]))
        self._misses += 1
        try:
            result = await run()
        except stale_on:
            if found is not None and policy.stale_if_error_s > 0:
                row = found[0]
                now = self._clock()
                if now < row[4]:
                    self._stale_hits += 1
                    return CachedResult(row[5], "stale", max(0.0, now - row[2]))
            raise
        self.put(key, result.payload, result.content_type, policy.ttl_s, policy.stale_if_error_s)
        return CachedResult(result, "miss")

    # -- observability -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot for /status and /metrics. Sizes are as of the last commit."""
        w = self._writer
        with self._shared.lock:
            state, reason = self._shared.state, self._shared.reason
            pending = self._shared.pending_bytes
        return {
            "state": state,
            "reason": reason,
            "path": str(self.path),
            "entries": w.entries,
            "bytes": w.bytes,
            "max_bytes": self.max_bytes,
            "pending_bytes": pending,
            "hits": self._hits,
            "misses": self._misses,
            "stale_hits": self._stale_hits,
            "writes": w.writes,
            "writer_busy_s": round(w.busy_s, 6),
            "evictions": w.evictions,
            "expired": w.expired,
            "dropped": self._dropped + w.dropped,
            "errors": self._read_errors + w.errors,
            "recoveries": w.recoveries,
            "last_recovery": w.last_recovery,
        }

"""Shared SQLite plumbing: the one access pattern of every edgefn store.

Used by the agent's result cache (`edge_agent.cache`), the outbox (`cloud_sync.outbox`) and the
platform stores (`cloud_sync.platform.store`, `cloud_sync.platform.fleet_store`). It lives in
`runtimes` because that is the lowest layer all of them may import (like `runtimes.fsio`); nothing
here knows about functions.

The pattern (after datasette's `database.py`):

* **One writer thread owns the write connection.** Every change is a job on its queue, run in
  its own `BEGIN IMMEDIATE ... COMMIT`: IMMEDIATE takes the write lock up front, so a
  transaction never fails half-way on a lock upgrade, and one writer means no two writes of this
  process ever contend. Callers get a `concurrent.futures.Future` (`submit`), block on it
  (`write`, from worker threads) or await it (`awrite`, from the event loop).
* **Reads run on their own connections** (`read`: one per calling thread, `query_only`), so a
  long read never waits for the writer and never holds the write lock. WAL mode lets readers
  and the writer run at once; each `read` sees one consistent snapshot.
* **WAL, with the durability named per store** (`synchronous`): FULL fsyncs every commit and
  survives a power cut; NORMAL survives a process crash and may lose the last commits on power
  loss, never the file. Each store says which it needs and why where it opens its database.

A store with its own writer loop (the result cache batches puts and rebuilds broken files) uses
the same pieces: `connect_writer`, `connect_reader`, `transaction`, `is_transient`.

Plain sqlite3 only: the agent imports this module and must not pay for sqlite-utils (~3 MB of
RSS); the platform wraps the write connection with sqlite-utils in its own setup step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from runtimes.errors import RuntimeErrorBase

log = logging.getLogger(__name__)

T = TypeVar("T")

Synchronous = Literal["NORMAL", "FULL"]

# How long the writer waits for a lock held by *another process* (an operator's sqlite3 shell,
# a backup): our own process has one writer, so it never waits on itself.
BUSY_TIMEOUT_S = 5.0
# After a checkpoint the WAL file is truncated back to this size, so one burst of writes does not
# leave a large -wal file on a small flash disk for good.
WAL_SIZE_LIMIT = 16 * 1024 * 1024
# How long `close()` waits for the writer to finish queued jobs before giving up on the thread
# (it is a daemon: a stuck disk must not keep the process from exiting).
CLOSE_TIMEOUT_S = 10.0

# Primary result codes (the low byte of `sqlite_errorcode`) that mean "try again later".
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6


class WalUnavailable(sqlite3.DatabaseError, RuntimeErrorBase):
    """The file cannot be switched to WAL (a read-only directory, a network file system).

    A `sqlite3.DatabaseError`, so the stores' `except sqlite3.Error` conversions catch it; also
    in the one error tree, with its own code, for whoever sees it unconverted.
    """

    code = "wal_unavailable"
    category = "storage"


def is_transient(exc: BaseException) -> bool:
    """True for "busy" and "locked": another connection holds a lock; the file is fine."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _connect(
    path: str | os.PathLike[str],
    mode: str,
    *,
    busy_timeout_s: float,
    check_same_thread: bool,
    pragmas: Callable[[sqlite3.Connection], None],
) -> sqlite3.Connection:
    """Open `path` in URI `mode` (rwc, rw) and run `pragmas`; closed again if they fail.

    `isolation_level=None`: transactions are ours (`transaction`), nothing implicit.
    """
    conn = sqlite3.connect(
        f"{Path(path).absolute().as_uri()}?mode={mode}",
        uri=True,
        isolation_level=None,
        timeout=busy_timeout_s,
        check_same_thread=check_same_thread,
    )
    try:
        pragmas(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_writer(
    path: str | os.PathLike[str],
    *,
    synchronous: Synchronous,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """Open (creating if needed) the write connection: WAL, `synchronous`, a bounded WAL file.

    Raises sqlite3.Error (WalUnavailable when WAL cannot be had); the caller converts it.
    """

    def pragmas(conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise WalUnavailable(f"cannot switch {path} to WAL mode (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")

    return _connect(
        path,
        "rwc",
        busy_timeout_s=busy_timeout_s,
        check_same_thread=check_same_thread,
        pragmas=pragmas,
    )


def connect_reader(
    path: str | os.PathLike[str], *, busy_timeout_s: float = 0.0, check_same_thread: bool = False
) -> sqlite3.Connection:
    """A read-only connection to an existing database (`query_only`: a bug cannot write).

    Busy timeout 0 by default: WAL readers never wait on the writer, so "busy" only happens
    while the file is being recovered, and then an answer now beats an answer later.
    """
    return _connect(
        path,
        "rw",
        busy_timeout_s=busy_timeout_s,
        check_same_thread=check_same_thread,
        pragmas=_query_only,
    )


def _query_only(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA query_only=1")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[None]:
    """`BEGIN IMMEDIATE` (the write lock now, see the module docstring) ... `COMMIT`; any
    exception rolls back and propagates. `immediate=False` is for reads: a snapshot."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")  # inside: a COMMIT that fails (busy) leaves the transaction open
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


_Job = tuple[Callable[[sqlite3.Connection], Any], "concurrent.futures.Future[Any]", bool]


class Database:
    """A writer thread owning the write connection, plus per-thread read connections.

    `setup(conn)` runs first on the writer thread (schema, migrations, loading totals); if
    opening or setup fails, `opened` holds the error and every job fails with it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous,
        setup: Callable[[sqlite3.Connection], None] | None = None,
        name: str = "edgefn-sqlite-writer",
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._setup = setup
        self._busy_timeout_s = busy_timeout_s
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- writes ----------------------------------------------------------------------------

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], *, txn: bool = True
    ) -> concurrent.futures.Future[T]:
        """Queue `fn(write_connection)`; with `txn` it runs inside `transaction()`. Without,
        `fn` manages its own transaction (it must not leave one open)."""
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, fut, txn))
        return fut

    def write(self, fn: Callable[[sqlite3.Connection], T], *, txn: bool = True) -> T:
        """`submit` and wait (from any thread but the writer's own, which would deadlock)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("write() called from the writer thread itself")
        return self.submit(fn, txn=txn).result()

    async def awrite(self, fn: Callable[[sqlite3.Connection], T], *, txn: bool = True) -> T:
        """`submit` and await, for the event loop (it never blocks on the disk)."""
        return await asyncio.wrap_future(self.submit(fn, txn=txn))

    # -- reads -----------------------------------------------------------------------------

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(read_connection)` on this thread's own connection, in one read snapshot."""
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        self.opened.result()  # the schema exists before anyone reads it
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_reader(self.path, busy_timeout_s=self._busy_timeout_s)
            with self._readers_lock:
                self._readers.append(conn)
            self._local.conn = conn
        with transaction(conn, immediate=False):
            return fn(conn)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued jobs, close the writer, then every reader. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(CLOSE_TIMEOUT_S)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        failure: BaseException | None = None
        try:
            conn = connect_writer(
                self.path, synchronous=self._synchronous, busy_timeout_s=self._busy_timeout_s
            )
            if self._setup is not None:
                self._setup(conn)
        except BaseException as exc:  # reported through `opened` and every job
            failure = exc
            self.opened.set_exception(exc)
        else:
            self.opened.set_result(None)
        while True:
            item = self._jobs.get()
            if item is None:
                break
            fn, fut, txn = item
            if not fut.set_running_or_notify_cancel():
                continue
            if failure is not None or conn is None:
                fut.set_exception(failure or RuntimeError("database is not open"))
                continue
            try:
                if txn:
                    with transaction(conn):
                        result = fn(conn)
                else:
                    result = fn(conn)
            except BaseException as exc:
                if conn.in_transaction:  # a job that managed its own and left it open
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

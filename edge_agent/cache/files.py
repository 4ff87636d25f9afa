"""The result cache's file: opening it checked, noticing it vanish, rebuilding a broken one.

`FileKeeper` is the part of the writer thread (`edge_agent.cache.writer.Writer` extends it)
that owns the file's life: open or create it (`PRAGMA quick_check`, migrations), check it is
still the file it opened (by inode), and on any failure go "degraded", close the connections,
set a bad file aside (`runtimes.setaside`: `<name>.corrupt-<UTC timestamp>`, the newest
few kept), create a fresh one and go back to "ok", retrying with exponential
backoff while that fails. Runs only on the writer thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.cache.schema import Incompatible, migrate
from edge_agent.cache.shared import SELECT_ROW, Shared, State
from edge_agent.errors import AgentError
from runtimes.setaside import remove_orphans, set_aside
from runtimes.sqlitedb import connect_reader, connect_writer, is_transient

log = logging.getLogger("edge_agent.cache")

# Only another process (an operator's sqlite3 shell) can hold the lock: wait this long for it.
WRITER_BUSY_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Opened:
    """A checked, migrated cache file and what the writer needs to run it."""

    conn: sqlite3.Connection  # the write connection (the writer thread's)
    reader: sqlite3.Connection  # the loop's read connection
    identity: tuple[int, int]  # (st_dev, st_ino): a file replaced under us is noticed
    entries: int
    bytes: int


def open_checked(path: Path) -> Opened:
    """Open or create `path` as a cache file; raises sqlite3.Error or `Incompatible`.

    Synchronous NORMAL in WAL mode: a commit is durable against a process crash, a power cut
    may lose the last commits but never corrupts the file. Right for a cache (17 us vs 196 us a
    row with FULL).
    """
    conn = connect_writer(path, synchronous="NORMAL", busy_timeout_s=WRITER_BUSY_TIMEOUT_S)
    try:
        # Reads every page once: catches garbage and truncated files at open, off the loop
        # thread (a 64 MiB file takes ~0.1 s), instead of on some later request.
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"quick_check: {'; '.join(map(str, problems))}")
        migrate(conn)
        st = os.stat(path)
        n, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM entries").fetchone()
        # No mmap for the reader: a file truncated under an mmap kills the process with SIGBUS.
        reader = connect_reader(path)
        try:
            reader.execute(SELECT_ROW, ("",)).fetchone()  # compiles and caches the statement
        except sqlite3.Error:
            reader.close()
            raise
    except BaseException:
        conn.close()
        raise
    return Opened(conn, reader, (st.st_dev, st.st_ino), int(n), int(size))


class Unusable(AgentError):
    """The file cannot be opened or created now; retried with backoff (the cache is degraded)."""

    code = "cache_unusable"
    category = "storage"


class FileKeeper:
    """Opening, checking and rebuilding the cache file (the writer thread's, see above)."""

    def __init__(
        self, path: Path, shared: Shared, retry_initial_s: float, retry_max_s: float
    ) -> None:
        self.path = path
        self.shared = shared
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.conn: sqlite3.Connection | None = None
        self.identity: tuple[int, int] | None = None
        # Rows and bytes committed (the writer keeps them current); loaded at each open.
        self.entries = 0
        self.bytes = 0
        self.recoveries = 0
        self.last_recovery = ""
        self.cause = ""  # why the running cache had to be reopened, until that succeeds
        self.retry_delay = retry_initial_s
        self.next_retry = 0.0
        self.last_check = time.monotonic()

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
            if not isinstance(exc, Unusable | OSError | sqlite3.Error | Incompatible):
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
            raise Unusable(f"cannot create directory {self.path.parent}: {exc}") from exc
        if not self.path.exists():
            remove_orphans(self.path)
        try:
            self._connect()
            return ""
        except (sqlite3.Error, Incompatible) as exc:
            self._close_conns()
            # Busy: another process holds the file; it is not ours to move. Missing: the
            # directory refused to create it. Not a regular file: an operator's mistake.
            if is_transient(exc) or not self.path.is_file():
                raise Unusable(f"cannot open {self.path}: {exc}") from exc
            problem = f"{type(exc).__name__}: {exc}"
        try:
            aside = set_aside(self.path)
        except OSError as exc:
            raise Unusable(
                f"{self.path} is unusable ({problem}) and cannot be set aside: {exc}"
            ) from exc
        self._connect()
        return f"{problem}; set aside as {aside}"

    def _connect(self) -> None:
        opened = open_checked(self.path)
        self.conn = opened.conn
        self.identity = opened.identity
        self.entries, self.bytes = opened.entries, opened.bytes
        with self.shared.lock:
            self.shared.reader = opened.reader
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
            remove_orphans(self.path)
        self.cause = reason
        self.retry_delay = self.retry_initial_s
        self._open()

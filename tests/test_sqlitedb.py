"""The shared SQLite plumbing (runtimes.sqlitedb) on real files: WAL, the writer thread's
transactions, reads on their own connections, and failures that reach the caller."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimes.sqlitedb import (
    Database,
    connect_reader,
    connect_writer,
    is_transient,
    transaction,
)


def _schema(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(tmp_path / "t.db", synchronous="FULL", setup=_schema, name="test-sqlitedb")
    d.opened.result(10)
    yield d
    d.close()


def test_writer_connection_is_wal_with_the_durability_asked_for(tmp_path: Path) -> None:
    conn = connect_writer(tmp_path / "w.db", synchronous="FULL")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        conn.close()
    conn = connect_writer(tmp_path / "w.db", synchronous="NORMAL")
    try:
        assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    finally:
        conn.close()


def test_reader_cannot_write_and_cannot_create(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        connect_reader(tmp_path / "absent.db")  # mode=rw: a reader never makes a file
    assert not (tmp_path / "absent.db").exists()
    w = connect_writer(tmp_path / "r.db", synchronous="NORMAL")
    _schema(w)
    r = connect_reader(tmp_path / "r.db")
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            r.execute("INSERT INTO t VALUES ('a', 1)")
    finally:
        r.close()
        w.close()


def test_a_failed_job_rolls_back_and_the_error_reaches_the_caller(db: Database) -> None:
    db.write(lambda c: c.execute("INSERT INTO t VALUES ('a', 1)"))

    def half_then_fail(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES ('b', 2)")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        db.write(half_then_fail)
    assert db.read(lambda c: c.execute("SELECT k FROM t ORDER BY k").fetchall()) == [("a",)]
    # The writer is still usable, with no transaction left open.
    db.write(lambda c: c.execute("INSERT INTO t VALUES ('c', 3)"))
    assert db.read(lambda c: c.execute("SELECT count(*) FROM t").fetchone()) == (2,)


def test_reads_use_their_own_connection_and_see_commits(db: Database) -> None:
    writer_ids: list[int] = []
    db.write(lambda c: writer_ids.append(id(c)))
    reader_ids: list[int] = []

    def probe(c: sqlite3.Connection) -> int:
        reader_ids.append(id(c))
        return int(c.execute("SELECT count(*) FROM t").fetchone()[0])

    assert db.read(probe) == 0
    db.write(lambda c: c.execute("INSERT INTO t VALUES ('a', 1)"))
    assert db.read(probe) == 1  # a committed write is visible to the next read
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(db.read(probe)))
    t.start()
    t.join(10)
    assert other == [1]
    assert len(set(reader_ids)) == 2  # one per thread, reused within a thread
    assert writer_ids[0] not in reader_ids


def test_a_read_does_not_wait_for_a_writer_holding_the_lock(db: Database) -> None:
    db.write(lambda c: c.execute("INSERT INTO t VALUES ('a', 1)"))
    inside, release = threading.Event(), threading.Event()

    def slow_write(c: sqlite3.Connection) -> None:
        c.execute("UPDATE t SET v = 2")
        inside.set()
        release.wait(10)

    fut = db.submit(slow_write)
    assert inside.wait(10)
    try:
        # The write transaction is open; WAL readers see the last commit, at once.
        assert db.read(lambda c: c.execute("SELECT v FROM t").fetchone()) == (1,)
    finally:
        release.set()
    fut.result(10)
    assert db.read(lambda c: c.execute("SELECT v FROM t").fetchone()) == (2,)


def test_an_unopenable_file_fails_open_and_every_job(tmp_path: Path) -> None:
    d = Database(tmp_path / "missing-dir" / "x.db", synchronous="NORMAL")
    try:
        with pytest.raises(sqlite3.OperationalError):
            d.opened.result(10)
        with pytest.raises(sqlite3.OperationalError):
            d.write(lambda c: None)
    finally:
        d.close()


def test_a_failing_setup_fails_open(tmp_path: Path) -> None:
    def setup(c: sqlite3.Connection) -> None:
        raise RuntimeError("schema from the future")

    d = Database(tmp_path / "s.db", synchronous="NORMAL", setup=setup)
    try:
        with pytest.raises(RuntimeError, match="future"):
            d.opened.result(10)
    finally:
        d.close()


def test_busy_from_another_process_lock_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    other = connect_writer(path, synchronous="NORMAL")
    _schema(other)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock, like an operator's shell
    mine = connect_writer(path, synchronous="NORMAL", busy_timeout_s=0)
    try:
        with pytest.raises(sqlite3.OperationalError) as info, transaction(mine):
            mine.execute("INSERT INTO t VALUES ('a', 1)")
        assert is_transient(info.value)
        assert not mine.in_transaction
        assert not is_transient(sqlite3.DatabaseError("file is not a database"))
    finally:
        other.execute("ROLLBACK")
        other.close()
        mine.close()


async def test_async_writes_and_closing(db: Database) -> None:
    await asyncio.gather(
        *(
            db.awrite(lambda c, i=i: c.execute("INSERT INTO t VALUES (?, ?)", (f"k{i}", i)))
            for i in range(20)
        )
    )
    assert await asyncio.to_thread(
        db.read, lambda c: c.execute("SELECT sum(v) FROM t").fetchone()
    ) == (190,)
    await db.aclose()
    assert db.closed
    with pytest.raises(RuntimeError, match="closed"):
        db.submit(lambda c: None)

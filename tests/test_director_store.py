"""The director's counters on both backends (`backend`: its own SQLite file, or the shared
PostgreSQL database), and two directors (two replicas) issuing for one device at once: every
counter handed out once, each caller's counters increasing. A data dir from before the SQL seam
opens with its counters."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from cloud_sync.platform.director import DB_FILE, MIGRATIONS, Director
from tests.platform_backends import Backend
from tests.test_director import DIGESTS, DOC, Clock
from tests.threads import in_threads

ROUNDS = 12  # per thread: bounded, and enough to interleave two writers many times
THREADS = 4  # two per director


def _director(backend: Backend, data_dir: Path, clock: Clock) -> Director:
    engine = None if backend.database_url is None else backend.engine()
    # SQLite: the director opens `<data_dir>/director.db` itself, as `edge-cloud serve` does.
    return Director(data_dir, lambda n, v: DIGESTS.get((n, v)), clock=clock, engine=engine)


def test_counters_grow_per_scope_and_survive_a_restart(backend: Backend, tmp_path: Path) -> None:
    clock, plat = Clock(), tmp_path / "plat"
    first = _director(backend, plat, clock)
    try:
        env = first.for_device("dev-a", DOC)
        assert env["signed"]["counter"] == 1
        assert first.for_device("dev-a", DOC) == env  # still fits: the same envelope
        assert first.for_device("dev-a", {"version": 4, "config": {}})["signed"]["counter"] == 2
        assert first.for_group("west", DOC)["signed"]["counter"] == 1
        clock.now += 5 * 86_400  # past half the default week
        assert first.due() == [("device", "dev-a"), ("group", "west")]
    finally:
        first.close()
    again = _director(backend, plat, clock)
    try:
        assert again.issued("device", "dev-a") is not None
        assert again.for_device("dev-a", {"version": 5, "config": {}})["signed"]["counter"] == 3
        assert again.due() == [("group", "west")]
    finally:
        again.close()
    # The counters are where the backend says: the data dir's file only on SQLite.
    assert (plat / DB_FILE).exists() == (backend.database_url is None)


def _issue_from_threads(directors: list[Director], docs: Any) -> list[list[int]]:
    """Each thread issues `docs(thread, round)` for dev-a ROUNDS times, all threads released at
    once; returns each thread's counters in the order it got them."""

    def issue(i: int, r: int) -> int:
        env = directors[i % len(directors)].for_device("dev-a", docs(i, r))
        return int(env["signed"]["counter"])

    return in_threads(THREADS, ROUNDS, issue)


def test_two_directors_on_one_database_never_hand_out_one_counter_twice(
    backend: Backend, tmp_path: Path
) -> None:
    clock, plat = Clock(), tmp_path / "plat"
    directors = [_director(backend, plat, clock), _director(backend, plat, clock)]
    try:
        assert directors[0].key_id == directors[1].key_id  # one data dir: one key
        # Every call a new document: every call must take a counter of its own.
        got = _issue_from_threads(
            directors, lambda i, r: {"version": 1000 * i + r, "config": {"n": f"{i}-{r}"}}
        )
        for mine in got:
            assert mine == sorted(mine) and len(set(mine)) == ROUNDS  # increasing per caller
        every = [c for mine in got for c in mine]
        assert sorted(every) == list(range(1, THREADS * ROUNDS + 1))  # distinct, no gap
        issued = directors[1].issued("device", "dev-a")
        assert issued is not None and issued.counter == THREADS * ROUNDS
    finally:
        for d in directors:
            d.close()


def test_the_same_document_issued_at_once_by_two_directors_is_one_envelope(
    backend: Backend, tmp_path: Path
) -> None:
    clock, plat = Clock(), tmp_path / "plat"
    directors = [_director(backend, plat, clock), _director(backend, plat, clock)]
    try:
        got = _issue_from_threads(directors, lambda i, r: DOC)
        # A writer that waited for the row found the envelope just issued and handed that out,
        # its own increment undone: one counter, whoever came first.
        assert got == [[1] * ROUNDS] * THREADS
        issued = directors[0].issued("device", "dev-a")
        assert issued is not None and issued.counter == 1
    finally:
        for d in directors:
            d.close()


def test_a_director_db_from_before_migrations_keeps_its_counters(tmp_path: Path) -> None:
    plat = tmp_path / "plat"
    plat.mkdir()
    with sqlite3.connect(plat / DB_FILE) as conn:  # what Director used to create itself
        conn.executescript(MIGRATIONS[0].sqlite)
        conn.execute(
            "INSERT INTO director_instructions VALUES (?, ?, ?, ?, ?)",
            ("device:dev-a", 41, 1, 2, "{}"),
        )
    conn.close()
    director = Director(plat, lambda n, v: None, clock=Clock())
    try:
        assert director.for_device("dev-a", DOC)["signed"]["counter"] == 42
    finally:
        director.close()

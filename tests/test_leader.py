"""The leader lease on a real PostgreSQL: one leader, takeover when it dies, none while down."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from cloud_sync.platform.leader import (
    LeaderDuties,
    LocalLease,
    PgAdvisoryLease,
    replica_settings_problem,
)
from tests.mosquitto import eventually
from tests.postgres import PostgresDatabase

POLL_S = 0.1
ROOT = Path(__file__).resolve().parent.parent


def _lease(db: PostgresDatabase, name: str) -> PgAdvisoryLease:
    return PgAdvisoryLease(db.url, name=name, poll_s=POLL_S, lost_after_s=1.0)


@pytest.fixture
async def two(postgres_db: PostgresDatabase) -> AsyncIterator[list[PgAdvisoryLease]]:
    leases = [_lease(postgres_db, "a"), _lease(postgres_db, "b")]
    for lease in leases:
        await lease.start()
    yield leases
    for lease in leases:
        await lease.close()


def _leaders(leases: list[PgAdvisoryLease]) -> list[str]:
    return [x.name for x in leases if x.is_leader]


async def _exactly_one(leases: list[PgAdvisoryLease]) -> PgAdvisoryLease:
    await eventually(lambda: len(_leaders(leases)) == 1, 20, "one leader")
    # And it stays that way over many polls of both (no flapping, never two).
    for _ in range(10):
        assert len(_leaders(leases)) == 1
        await asyncio.sleep(POLL_S)
    return next(x for x in leases if x.is_leader)


async def test_local_lease_is_always_the_leader() -> None:
    lease = LocalLease()
    await lease.start()
    assert lease.is_leader
    async with lease.exclusive():
        pass
    await lease.close()
    assert not lease.is_leader


async def test_two_leases_one_leader_and_takeover_when_its_session_is_killed(
    two: list[PgAdvisoryLease], postgres_db: PostgresDatabase
) -> None:
    leader = await _exactly_one(two)
    other = next(x for x in two if x is not leader)
    assert not other.is_leader
    lost = asyncio.ensure_future(leader.changed())
    # PostgreSQL ends the leader's session (as when its connection breaks): it steps down and
    # the other takes over.
    postgres_db.server.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE application_name = 'edgefn lease {leader.name}'",
        postgres_db.name,
    )
    assert await asyncio.wait_for(lost, 20) is False
    await eventually(lambda: other.is_leader, 20, "takeover")
    assert leader.last_error
    # The old leader comes back as a follower, never a second leader.
    assert await _exactly_one(two) is other


async def test_closing_the_leader_hands_over(two: list[PgAdvisoryLease]) -> None:
    leader = await _exactly_one(two)
    other = next(x for x in two if x is not leader)
    await leader.close()
    await eventually(lambda: other.is_leader, 20, "takeover after a clean close")
    assert other.terms == 1


async def test_takeover_when_the_leader_process_is_killed(postgres_db: PostgresDatabase) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from cloud_sync.platform.leader import PgAdvisoryLease

        async def main():
            lease = PgAdvisoryLease({postgres_db.url!r}, name="child", poll_s={POLL_S})
            await lease.start()
            while not lease.is_leader:
                await asyncio.sleep(0.05)
            print("leader", flush=True)
            await asyncio.sleep(120)

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, env=env
    )
    mine = _lease(postgres_db, "parent")
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line.strip() == b"leader"
        await mine.start()
        for _ in range(10):  # the child holds it: we stay a follower
            await asyncio.sleep(POLL_S)
            assert not mine.is_leader
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 10)
        await eventually(lambda: mine.is_leader, 20, "takeover after kill -9")
    finally:
        if child.returncode is None:
            child.kill()
            await asyncio.wait_for(child.wait(), 10)
        await mine.close()


async def test_nobody_leads_while_postgres_is_down_and_one_after(
    two: list[PgAdvisoryLease], postgres_db: PostgresDatabase
) -> None:
    await _exactly_one(two)
    await asyncio.to_thread(postgres_db.server.stop, "immediate")
    try:
        await eventually(lambda: not _leaders(two), 20, "everyone stepped down")
        for _ in range(5):
            await asyncio.sleep(POLL_S)
            assert not _leaders(two)
    finally:
        await asyncio.to_thread(postgres_db.server.start)
    await _exactly_one(two)


async def test_exclusive_serialises_across_leases(two: list[PgAdvisoryLease]) -> None:
    inside: list[str] = []
    overlaps = 0

    async def hold(lease: PgAdvisoryLease) -> None:
        nonlocal overlaps
        for _ in range(5):
            async with lease.exclusive():
                inside.append(lease.name)
                if len(inside) > 1:
                    overlaps += 1
                await asyncio.sleep(0.02)
                inside.remove(lease.name)

    await asyncio.gather(hold(two[0]), hold(two[1]), hold(two[0]))
    assert overlaps == 0


async def test_exclusive_is_held_in_postgres(
    two: list[PgAdvisoryLease], postgres_db: PostgresDatabase
) -> None:
    """While one replica holds it, a plain session cannot take the same key."""
    async with two[0].exclusive():
        with psycopg.connect(postgres_db.url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (two[0].exclusive_key,))
            assert row.fetchone() == (False,)
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (two[0].exclusive_key,))
        assert row.fetchone() == (True,)


async def test_duties_start_on_lead_and_stop_on_step_down(
    postgres_db: PostgresDatabase,
) -> None:
    events: list[str] = []

    async def start() -> None:
        events.append("start")

    async def stop() -> None:
        events.append("stop")

    a, b = _lease(postgres_db, "a"), _lease(postgres_db, "b")
    duties_a = LeaderDuties(a, [("work", start, stop)])
    await duties_a.start()
    await eventually(lambda: events == ["start"], 20, "duty started on the leader")
    duties_b = LeaderDuties(b)
    await duties_b.start()
    try:
        postgres_db.server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'edgefn lease a'",
            postgres_db.name,
        )
        await eventually(lambda: events[:2] == ["start", "stop"], 20, "duty stopped")
        await eventually(lambda: b.is_leader, 20, "b took over")
        assert not a.is_leader
        assert events == ["start", "stop"]
    finally:
        await duties_b.close()
        await duties_a.close()
    # Closing a replica that is not leading stops nothing twice.
    assert events.count("stop") == 1


@pytest.mark.parametrize(
    ("lease", "replica", "problem"),
    [
        ("", "", ""),
        ("", "a", ""),
        ("postgresql://edgefn@db/edgefn", "a", ""),
        ("postgresql://edgefn:secret@db/edgefn", "a", "must not carry a password"),
        ("mysql://db/x", "a", "must be a postgresql:// URL"),
        ("postgresql://edgefn@db/edgefn", "", "needs --replica-id"),
        ("", "a/b", "bad --replica-id"),
    ],
)
def test_replica_settings_are_checked_before_start(lease: str, replica: str, problem: str) -> None:
    found = replica_settings_problem(lease, replica)
    assert (problem in found) if problem else found == ""
    assert "secret" not in found


async def test_close_returns_whenever_it_is_called(postgres_db: PostgresDatabase) -> None:
    """Closing never hangs, even when it lands just as a query of the loop completes.

    Python 3.11's `asyncio.wait_for` swallows a cancellation that arrives in the same loop
    iteration as the awaited result (CPython gh-86296): a lease closed at that moment kept
    running and `close()` waited for it forever (a CI teardown hang). With no pause between
    polls the loop is almost always inside a query, so many closes hit that moment.
    """
    for i in range(40):
        lease = PgAdvisoryLease(postgres_db.url, name=f"c{i}", poll_s=0.0, lost_after_s=1.0)
        await lease.start()
        await asyncio.sleep(0.005 * (i % 8))
        async with asyncio.timeout(5):
            await lease.close()
        assert not lease.is_leader

"""The SQLite outbox: leases and acks, durability across kill -9, the byte bound (merge, then
drop, counted). The pure metrics record merge it relies on: tests/test_metrics_record.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync.errors import OutboxError, RecordTooLarge
from cloud_sync.outbox import (
    DROP_EVENT_RESERVE,
    RECORD_OVERHEAD,
    Outbox,
)
from tests.metrics_samples import metrics

METRICS = "edgefn/v1/devices/d1/metrics"
EVENTS = "edgefn/v1/devices/d1/events"
ROLLOUT = "edgefn/v1/devices/d1/rollout"


async def test_records_leave_only_on_ack(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        recs = [await ob.append("events", EVENTS, f"e{i}".encode()) for i in range(5)]
        assert len({r.key for r in recs}) == 5
        first = await ob.lease(3)
        assert [r.payload for r in first] == [b"e0", b"e1", b"e2"]
        assert all(r.attempts == 1 for r in first)
        second = await ob.lease(10)  # leased records are hidden from other senders
        assert [r.payload for r in second] == [b"e3", b"e4"]
        assert await ob.lease(10) == []
        assert await ob.ack([first[0].id, first[1].id]) == 2
        await ob.release([first[2].id, *(r.id for r in second)])
        again = await ob.lease(10)
        assert [r.payload for r in again] == [b"e2", b"e3", b"e4"]
        assert [r.attempts for r in again] == [2, 2, 2]
        assert await ob.ack([first[0].id]) == 0  # already gone: acking twice is harmless
        stats = await ob.stats()
        assert (stats.records, stats.leased, stats.dropped) == (3, 3, 0)


async def test_append_with_a_key_is_idempotent_and_coalesce_keeps_the_latest(
    tmp_path: Path,
) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        a = await ob.append("rollout", ROLLOUT, b"1", key="rollout-7-done")
        b = await ob.append("rollout", ROLLOUT, b"2", key="rollout-7-done")
        assert (a.id, b.payload) == (b.id, b"1")
        rep = "edgefn/v1/devices/d1/reported"
        await ob.append("reported", rep, b"v1", coalesce=True)
        leased = await ob.lease(10)
        await ob.append("reported", rep, b"v2", coalesce=True)
        await ob.append("reported", rep, b"v3", coalesce=True)
        pending = [r.payload for r in await ob.peek(10) if r.kind == "reported"]
        # v1 is on the wire (leased) and stays; v2 was superseded by v3 before it was sent.
        assert pending == [b"v1", b"v3"]
        await ob.ack(r.id for r in leased)


async def test_wait_for_records_wakes_on_append(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db") as ob:
        ob.clear_appended()
        assert await ob.wait_for_records(0.01) is False
        waiter = asyncio.create_task(ob.wait_for_records(30))
        await ob.append("events", EVENTS, b"x")
        assert await waiter is True


async def test_closed_outbox_refuses_work(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "o.db")
    await ob.close()
    await ob.close()
    with pytest.raises(OutboxError) as info:
        await ob.append("events", EVENTS, b"x")
    assert info.value.code == "outbox_closed"


async def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError):
        await Outbox.open(tmp_path / "missing-dir" / "o.db")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_damaged_file_is_set_aside_reported_and_recreated(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "outbox.db"
    async with await Outbox.open(path) as ob:
        for i in range(300):
            await ob.append("events", EVENTS, os.urandom(200) + b"%d" % i)
    if damage == "garbage":
        path.write_bytes(os.urandom(64 * 1024))
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    for side in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{side}")
    async with await Outbox.open(path, events_topic=EVENTS) as ob:
        assert "set aside as outbox.db.corrupt-" in ob.recovered and ob.recoveries == 1
        [aside] = [n for n in os.listdir(tmp_path) if n.startswith("outbox.db.corrupt-")]
        assert aside in ob.recovered
        # The only record: the report of what was set aside, waiting for the link.
        [rec] = await ob.lease(10)
        event = json.loads(rec.payload)
        assert (rec.kind, rec.topic, event["type"]) == ("events", EVENTS, "outbox_recovered")
        assert event["set_aside"] == aside and event["problem"]
        await ob.append("events", EVENTS, b"after")  # and it works
    async with await Outbox.open(path, events_topic=EVENTS) as ob:  # a good file: no recovery
        assert ob.recovered == "" and (await ob.stats()).records == 2


async def test_a_directory_in_the_way_is_not_set_aside(tmp_path: Path) -> None:
    (tmp_path / "o.db").mkdir()
    with pytest.raises(OutboxError):
        await Outbox.open(tmp_path / "o.db")
    assert os.listdir(tmp_path) == ["o.db"]


CHILD = r"""
import asyncio, sys
from cloud_sync.outbox import Outbox

async def main():
    ob = await Outbox.open(sys.argv[1])
    recs = [await ob.append("events", "edgefn/v1/devices/d1/events", b"r%d" % i) for i in range(6)]
    leased = await ob.lease(4)          # r0..r3 on the wire
    await ob.ack([leased[0].id, leased[1].id])  # r0, r1 acknowledged
    print("READY", flush=True)
    await asyncio.sleep(600)            # killed here, with r2, r3 leased and r4, r5 unsent

asyncio.run(main())
"""


async def test_unacked_records_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(db), stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"READY"
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    async with await Outbox.open(db) as ob:
        left = await ob.lease(100)  # leases died with the process
        assert [r.payload for r in left] == [b"r2", b"r3", b"r4", b"r5"]
        assert [r.attempts for r in left] == [2, 2, 1, 1]


# ---- the bound -------------------------------------------------------------------------------


async def test_bound_merges_metrics_before_dropping_anything(tmp_path: Path) -> None:
    bound = 8_000
    async with await Outbox.open(tmp_path / "o.db", max_bytes=bound, events_topic=EVENTS) as ob:
        for i in range(60):
            await ob.append_metrics(METRICS, metrics(i * 10, i * 10 + 10, invocations=i + 1))
            assert (await ob.stats()).bytes <= bound
        stats = await ob.stats()
        assert stats.dropped == 0 and stats.merged > 0
        assert stats.records < 60
        kept = [json.loads(r.payload) for r in await ob.peek(1000)]
        # Nothing lost: every invocation is still counted, every second still covered.
        assert sum(k["functions"]["resize"]["invocations"] for k in kept) == sum(range(1, 61))
        assert sum(k["samples"] for k in kept) == 60
        spans = sorted((k["interval_start"], k["interval_end"]) for k in kept)
        assert spans[0][0] == 0 and spans[-1][1] == 600
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        hist_total = sum(sum(k["functions"]["resize"]["latency_ms"]["counts"]) for k in kept)
        assert hist_total == sum(range(1, 61))


async def test_bound_drops_oldest_lowest_priority_and_counts_it(tmp_path: Path) -> None:
    bound = 4_000
    db = tmp_path / "o.db"
    async with await Outbox.open(db, max_bytes=bound, events_topic=EVENTS) as ob:
        await ob.append("rollout", ROLLOUT, b"R" * 300)
        for i in range(30):
            await ob.append("events", EVENTS, b"%03d" % i + b"E" * 300)
            assert (await ob.stats()).bytes <= bound
        stats = await ob.stats()
        assert stats.dropped > 0
        recs = await ob.peek(1000)
        assert recs[0].kind == "rollout"  # higher priority than events: never dropped here
        events = [r.payload[:3] for r in recs if r.kind == "events" and r.payload[:1] != b"{"]
        assert events == [b"%03d" % i for i in range(30 - len(events), 30)]  # newest kept
        reports = [json.loads(r.payload) for r in recs if r.payload.startswith(b"{")]
        assert len(reports) == 1  # one coalesced synthetic event, with the running totals
        assert reports[0]["type"] == "outbox_dropped"
        assert reports[0]["dropped_total"] == stats.dropped
        dropped = stats.dropped
    async with await Outbox.open(db, max_bytes=bound, events_topic=EVENTS) as ob:
        assert (await ob.stats()).dropped == dropped  # the count is persisted


async def test_metrics_go_before_events_when_nothing_can_merge(tmp_path: Path) -> None:
    bound = 3_000
    async with await Outbox.open(tmp_path / "o.db", max_bytes=bound) as ob:
        ev = await ob.append("events", EVENTS, b"first-event")
        me = await ob.append_metrics(METRICS, metrics(0, 10))
        # One byte more than fits beside both: exactly one of them has to go.
        filler = b"F" * (bound - ev.size - me.size - len(ROLLOUT) - RECORD_OVERHEAD + 1)
        await ob.append("rollout", ROLLOUT, filler)
        kinds = [r.kind for r in await ob.peek(10)]
        assert kinds == ["events", "rollout"]
        assert (await ob.stats()).dropped == 1


async def test_leased_metrics_are_not_merged(tmp_path: Path) -> None:
    # A leased record may already be at the platform: merging it into a new record would count
    # its invocations twice. Only unleased neighbours merge.
    bound = 5_000
    async with await Outbox.open(tmp_path / "o.db", max_bytes=bound) as ob:
        for i in range(3):
            await ob.append_metrics(METRICS, metrics(i * 10, i * 10 + 10))
        on_wire = await ob.lease(3)
        for i in range(3, 20):
            await ob.append_metrics(METRICS, metrics(i * 10, i * 10 + 10))
        stats = await ob.stats()
        assert stats.merged > 0 and stats.dropped == 0
        by_id = {r.id: r for r in await ob.peek(100)}
        for rec in on_wire:
            assert by_id[rec.id].payload == rec.payload


async def test_a_record_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db", max_bytes=2_000, events_topic=EVENTS) as ob:
        with pytest.raises(RecordTooLarge):
            await ob.append("events", EVENTS, b"x" * (2_000 - DROP_EVENT_RESERVE))
        assert (await ob.stats()).records == 0


async def test_discard_counts_as_a_drop(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "o.db", events_topic=EVENTS) as ob:
        rec = await ob.append("metrics", "edgefn/v1/devices/other/metrics", b"{}")
        assert await ob.discard([rec.id]) == 1
        stats = await ob.stats()
        assert stats.dropped == 1 and stats.records == 1  # the drop report
        (report,) = await ob.peek(10)
        assert json.loads(report.payload)["dropped_total"] == 1


async def test_a_cancelled_lease_gives_its_records_back(tmp_path: Path) -> None:
    """The sender is cancelled after the writer leased records but before it got them: those
    records must be sendable again now, not only after a restart."""
    async with await Outbox.open(tmp_path / "o.db") as ob:
        for i in range(3):
            await ob.append("events", EVENTS, b"r%d" % i)
        lease = asyncio.create_task(ob.lease(10))
        await asyncio.sleep(0)  # the lease job is queued on the writer
        # Block the loop until the writer has run the lease (and one job after it): the
        # answer is on its way to the loop, and the caller is cancelled before it arrives.
        assert ob._db is not None
        ob._db.submit(lambda c: None, txn=False).result(10)
        lease.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lease
        stats = await ob.stats()
        assert stats.leased == 0
        again = await ob.lease(10)
        assert [r.payload for r in again] == [b"r0", b"r1", b"r2"]
        assert [r.attempts for r in again] == [2, 2, 2]  # the lost lease counted as an attempt


def test_the_metrics_record_names_are_still_importable_from_the_outbox() -> None:
    from cloud_sync import metrics_record, outbox

    for name in ("METRICS_SCHEMA", "gauge", "merge_metrics", "new_histogram", "validate_metrics"):
        assert getattr(outbox, name) is getattr(metrics_record, name)

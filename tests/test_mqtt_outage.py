"""Outages end to end: broker crashes and restarts, devices killed with -9, last will.

The platform side is a plain session with the platform identity that counts what arrives and
dedupes by the `edgefn-key` user property, exactly as the platform's intake must. The device
side sends with the production sender (`SyncClient.run_sender`, see tests/sender.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloud_sync import credentials, mqtt, sync, topics
from cloud_sync.mqtt import MqttSession
from cloud_sync.outbox import Outbox
from tests.mosquitto import Collector, eventually, platform_session
from tests.sender import device_sender

if TYPE_CHECKING:
    from tests.mosquitto import Broker


pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def platform_filters(kind: str) -> list[str]:
    """What the platform subscribes for a test: `kind` and the sender's own reported document.

    The real platform subscribes every kind a device sends; a record nobody subscribes to stays
    in the outbox (PUBACK 0x10 is no delivery), so a test's platform must take these two."""
    return [topics.platform_filter(kind), topics.platform_filter("reported")]


@pytest.fixture(autouse=True)
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(mqtt, "RECONNECT_MAX_S", 0.5)
    monkeypatch.setattr(sync, "RETRY_S", 0.1)


async def test_broker_crash_mid_stream_loses_nothing(
    mosquitto_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    # A production broker persists sessions; autosave on every change makes that survive the
    # SIGKILL below, so the platform's queued messages are still there after the restart.
    broker = mosquitto_factory(persistence=True, autosave_on_changes=True)
    dev = broker.device_credentials("dev-stream")
    metrics_t = topics.device_topic("dev-stream", "metrics")
    total = 300
    appended: list[str] = []
    async with (
        platform_session(broker, *platform_filters("metrics")) as plat,
        await Outbox.open(tmp_path / "outbox.db") as outbox,
        device_sender(dev, tmp_path) as client,
    ):
        device = client.session
        await plat.wait_ready(10)
        collector = Collector(plat)
        drain = asyncio.create_task(client.run_sender(outbox))

        async def produce() -> None:
            for i in range(total):
                rec = await outbox.append("metrics", metrics_t, b'{"i": %d}' % i)
                appended.append(rec.key)
                await asyncio.sleep(0.002)

        producer = asyncio.create_task(produce())
        try:
            await eventually(lambda: len(set(collector.keys("metrics"))) >= 50, what="50 records")
            await asyncio.to_thread(broker.kill)  # mid-stream: records are on the wire
            await eventually(lambda: not device.connected, what="the device to notice")
            down_at = len(appended)
            await eventually(lambda: len(appended) >= min(total, down_at + 50), what="backlog")
            await asyncio.to_thread(broker.start)
            await producer
            await eventually(
                lambda: set(collector.keys("metrics")) >= set(appended), 60, "all at the platform"
            )
            await eventually(lambda: device.state.connected, what="reconnect")

            async def outbox_empty() -> bool:
                return (await outbox.stats()).records == 0

            await eventually(outbox_empty, 60, "every record acknowledged")
        finally:
            producer.cancel()
            drain.cancel()
            await asyncio.gather(producer, drain, return_exceptions=True)
            await collector.close()
        assert device.state.connects >= 2
        assert (await outbox.stats()).records == 0  # every record acknowledged, then deleted
        received = collector.keys("metrics")
        assert set(received) == set(appended)  # nothing lost, nothing invented
        # Duplicates are allowed (at-least-once) and removable by key: same key, same payload.
        by_key: dict[str, set[bytes]] = {}
        for m in collector.messages:
            if m.kind == "metrics":
                by_key.setdefault(m.key or "", set()).add(m.payload)
        assert all(len(payloads) == 1 for payloads in by_key.values())
        dupes = sum(n - 1 for n in Counter(received).values())
        assert len(received) == total + dupes


async def test_resubscribes_when_the_broker_lost_the_session(mosquitto: Broker) -> None:
    """A broker without persistence forgets subscriptions on restart; the device re-makes them."""
    dev = mosquitto.device_credentials("dev-resub")
    desired = topics.device_topic("dev-resub", "desired")
    async with MqttSession.for_device(dev) as device:
        await device.wait_ready(10)
        await asyncio.to_thread(mosquitto.kill)
        await eventually(lambda: not device.connected, what="the device to notice")
        await asyncio.to_thread(mosquitto.start)
        await device.wait_ready(30)
        assert device.state.connects == 2 and not device.state.session_present
        async with platform_session(mosquitto) as plat:
            await plat.wait_ready(10)
            await plat.publish(desired, b'{"version": 5, "config": {}}', retain=True)
        msg = await asyncio.wait_for(device.messages.get(), 10)
        assert msg.value == {"version": 5, "config": {}}
        await msg.ack()


async def test_a_record_nobody_subscribed_to_stays_in_the_outbox_until_the_platform_is_back(
    mosquitto: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that lost the platform's session (restarted without persistence) answers a
    device's publish with PUBACK 0x10 "no matching subscribers": nobody got it. The sender keeps
    the record and sends it again once the platform has subscribed: a finished device's last
    status report is never acknowledged away (issue 13)."""
    monkeypatch.setattr(sync, "UNHEARD_MAX_S", 0.3)
    dev = mosquitto.device_credentials("dev-unheard")
    report_t = topics.rollout_report_topic("dev-unheard")
    async with (
        await Outbox.open(tmp_path / "outbox.db") as outbox,
        device_sender(dev, tmp_path) as client,
    ):
        await client.session.wait_ready(10)
        drain = asyncio.create_task(client.run_sender(outbox))
        try:
            rec = await outbox.append("rollout", report_t, b'{"state": "failed"}', key="r-1/9")
            # Sent and answered 0x10 at least twice (the probe is repeated), yet still stored.
            await eventually(
                lambda: client.status()["mqtt"]["no_subscriber_rounds"] >= 2, what="unheard"
            )
            assert (await outbox.stats()).by_kind.get("rollout") == 1
            # The platform subscribes every kind a device sends (the sender's own reported
            # document is waiting too).
            kinds = [topics.platform_filter(k) for k in ("rollout", "reported")]
            async with platform_session(mosquitto, *kinds) as plat:
                await plat.wait_ready(10)
                collector = Collector(plat)
                await eventually(lambda: rec.key in collector.keys("rollout"), 30, "the report")

                async def empty() -> bool:
                    return (await outbox.stats()).records == 0

                await eventually(empty, 30, "the outbox to drain")
                assert collector.keys("rollout") == [rec.key]  # sent once it was heard
                assert client.status()["mqtt"]["no_subscriber_rounds"] == 0
                await collector.close()
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


DEVICE_CHILD = r"""
import asyncio, sys
from cloud_sync import credentials
from cloud_sync.mqtt import MqttSession

async def main():
    creds = credentials.load(sys.argv[1])
    async with MqttSession.for_device(creds) as session:
        await session.wait_ready(30)
        print("READY", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


async def spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )


async def expect_line(proc: asyncio.subprocess.Process, want: bytes) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.strip() == want, f"child said {line!r}"


async def kill9(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


async def test_last_will_says_offline_when_the_device_is_killed(
    mosquitto: Broker, tmp_path: Path
) -> None:
    dev = mosquitto.device_credentials("dev-will")
    path = tmp_path / "credentials.json"
    credentials.save(path, dev)
    presence = topics.device_topic("dev-will", "presence")
    async with platform_session(mosquitto, topics.platform_filter("presence")) as plat:
        await plat.wait_ready(10)
        collector = Collector(plat)
        child = await spawn(DEVICE_CHILD, str(path))
        try:
            await expect_line(child, b"READY")
            await eventually(lambda: bool(collector.on(presence)), what="online")
            await kill9(child)  # no DISCONNECT: only the will can tell
            await eventually(lambda: len(collector.on(presence)) >= 2, what="the will")
        finally:
            await kill9(child)
            await collector.close()
        assert [m.value for m in collector.on(presence)] == ["online", "offline"]
        assert child.returncode == -signal.SIGKILL


OUTBOX_CHILD = r"""
import asyncio, pathlib, sys
from cloud_sync import credentials
from cloud_sync.outbox import Outbox
from tests.sender import device_sender

async def main():
    creds = credentials.load(sys.argv[1])
    topic = "edgefn/v1/devices/%s/events" % creds.device_id
    here = pathlib.Path(sys.argv[2]).parent
    async with await Outbox.open(sys.argv[2]) as outbox, device_sender(creds, here) as s:
        drain = asyncio.create_task(s.run_sender(outbox))
        for i in range(5):
            await outbox.append("events", topic, b"early-%d" % i)
        for _ in range(3000):
            if (await outbox.stats()).records == 0:
                break
            await asyncio.sleep(0.01)
        print("DRAINED", flush=True)
        drain.cancel()
        await asyncio.to_thread(sys.stdin.readline)  # the broker is frozen now
        for i in range(20):
            await outbox.append("events", topic, b"late-%d" % i)
        # All 20 go out in one batch, after the reported document the sender appends when it
        # starts (it tells the platform which transport it uses): 21 leased.
        drain = asyncio.create_task(s.run_sender(outbox))
        for _ in range(3000):
            if (await outbox.stats()).leased == 21:
                break
            await asyncio.sleep(0.01)
        print("LEASED", flush=True)   # published, no PUBACK: killed here
        await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_unacked_outbox_records_are_resent_after_kill_9(
    mosquitto: Broker, tmp_path: Path
) -> None:
    dev = mosquitto.device_credentials("dev-k9")
    creds_path, db = tmp_path / "credentials.json", tmp_path / "outbox.db"
    credentials.save(creds_path, dev)
    assert mosquitto.proc is not None
    async with platform_session(mosquitto, *platform_filters("events")) as plat:
        await plat.wait_ready(10)
        collector = Collector(plat)
        child = await spawn(OUTBOX_CHILD, str(creds_path), str(db))
        try:
            await expect_line(child, b"DRAINED")
            await eventually(lambda: len(collector.keys("events")) == 5, what="early records")
            os.kill(mosquitto.proc.pid, signal.SIGSTOP)  # no more PUBACKs
            try:
                assert child.stdin is not None
                child.stdin.write(b"go\n")
                await child.stdin.drain()
                await expect_line(child, b"LEASED")
                await kill9(child)
            finally:
                os.kill(mosquitto.proc.pid, signal.SIGCONT)
            async with await Outbox.open(db) as outbox:
                left = await outbox.peek(100)
                # Exactly the unacknowledged records survived the kill: the 20 events and the
                # sender's own reported document.
                assert sorted(r.kind for r in left) == ["events"] * 20 + ["reported"]
                left = [r for r in left if r.kind == "events"]
                assert sorted(r.payload for r in left) == sorted(b"late-%d" % i for i in range(20))
                async with device_sender(dev, tmp_path) as client:
                    drain = asyncio.create_task(client.run_sender(outbox))
                    try:
                        await eventually(
                            lambda: len(set(collector.keys("events"))) == 25, 60, "all 25"
                        )

                        async def outbox_empty() -> bool:  # PUBACKs reached the new process
                            return (await outbox.stats()).records == 0

                        await eventually(outbox_empty, 60, "the outbox to drain")
                    finally:
                        drain.cancel()
                        await asyncio.gather(drain, return_exceptions=True)
                assert (await outbox.stats()).records == 0
        finally:
            await kill9(child)
            await collector.close()
    early = [m.payload for m in collector.messages if m.payload.startswith(b"early")]
    assert sorted(early) == sorted(b"early-%d" % i for i in range(5))  # acked: never resent
    late_keys = {m.key for m in collector.messages if m.payload.startswith(b"late")}
    assert late_keys == {r.key for r in left}

"""A burst far beyond the platform's inbound queue: nothing is dropped, everything is stored once.

Real Mosquitto (edgefn's generated config), the real MQTT intake and fleet store (SQLite). The
broker overshoots the session's Receive Maximum under a burst (Mosquitto 2.0.11 was measured at
346 unacknowledged deliveries for a maximum of 32), so before the fix the session's queue
overflowed and it dropped messages ("inbound queue full, dropping message"), which the broker
then never sent again before a reconnect. Now paho's thread waits for room (backpressure) and
the broker holds the rest; a consumer stuck longer than `INBOUND_WAIT_S` gets its backlog
redelivered through a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from cloud_sync import mqtt, topics
from cloud_sync.mqtt import MqttSession
from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.intake import MqttIntake
from tests.mosquitto import Broker, eventually, platform_session

CLIENTS = 4
PER_CLIENT = 1250  # 5,000 QoS 1 messages in all
QUEUE = 64  # the session's queue, far below the burst


@pytest.fixture(autouse=True)
def small_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt, "MESSAGE_QUEUE_MAX", QUEUE)
    monkeypatch.setattr(mqtt, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(mqtt, "RECONNECT_MAX_S", 0.5)


async def _burst(broker: Broker, ids: list[str], count: int, kind: topics.DeviceKind) -> None:
    """`count` QoS 1 messages from each device, all at once, each with its own key."""
    sessions = [MqttSession.for_device(broker.device_credentials(d)) for d in ids]
    try:
        for s in sessions:
            await s.start()
        for s in sessions:
            await s.wait_connected(10)

        async def send(s: MqttSession) -> None:
            topic = topics.device_topic(s.client_id, kind)
            for n in range(count):
                props = [(mqtt.USER_PROPERTY_KEY, f"{s.client_id}-{n}")]
                await s.publish(topic, json.dumps({"n": n}).encode(), user_properties=props)

        await asyncio.gather(*(send(s) for s in sessions))
    finally:
        for s in sessions:
            await s.close()


@pytest.mark.slow
async def test_a_burst_of_5000_is_stored_exactly_once_and_nothing_is_dropped(
    mosquitto: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fleet = FleetStore(tmp_path / "fleet.db")
    intake = MqttIntake(fleet, mosquitto.ca, mosquitto.url, mqtt311=False)
    ids = [f"dev-{i}" for i in range(CLIENTS)]
    try:
        for d in ids:
            fleet.enroll(d, {}, f"token-{d}", 1)
        await intake.start()
        await eventually(lambda: intake.subscribed, 10, "intake subscribed")
        await _burst(mosquitto, ids, PER_CLIENT, "events")
        total = CLIENTS * PER_CLIENT
        await eventually(lambda: intake.stored + intake.duplicates >= total, 120, "all stored")
        for d in ids:
            got = sorted(r["value"]["n"] for r in fleet.records(d, "events", limit=2 * PER_CLIENT))
            assert got == list(range(PER_CLIENT)), d  # each once, none missing
        assert intake.stored == total
        # The burst did exceed the queue: paho's thread waited for room, and nothing was lost.
        assert intake.session.messages.waits > 0
        assert intake.session.messages.qsize() == 0
    finally:
        await intake.close()
        fleet.close()
    assert not [r for r in caplog.records if "dropping" in r.getMessage()]
    assert not [line for line in mosquitto.log if "dropped" in line], mosquitto.log[-5:]


async def test_a_stuck_consumer_hands_the_backlog_back_and_gets_it_again(
    mosquitto: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mqtt, "INBOUND_WAIT_S", 0.5)
    # Below the Receive Maximum: with nothing acknowledged the broker stops at 32 in flight.
    monkeypatch.setattr(mqtt, "MESSAGE_QUEUE_MAX", 8)
    caplog.set_level(logging.WARNING)
    count = 100
    async with platform_session(mosquitto, topics.platform_filter("events")) as plat:
        await plat.wait_ready(10)
        await _burst(mosquitto, ["dev-s"], count, "events")  # nobody consumes meanwhile
        # paho's thread waited in vain: the connection was dropped for a redelivery.
        await eventually(lambda: plat.state.connects >= 2, 20, "reconnected")
        seen: set[int] = set()
        for _ in range(20 * count):  # bounded: duplicates are allowed, losses are not
            if len(seen) == count:
                break
            msg = await asyncio.wait_for(plat.messages.get(), 20)
            seen.add(json.loads(msg.payload)["n"])
            await msg.ack()
        assert seen == set(range(count))
    assert any("reconnecting" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "dropping" in r.getMessage()]

"""The simulator's own MQTT client (`sim_mqtt.SimSession`) against a real Mosquitto (TLS, client
certificates, the edgefn ACL): the parts of the agent session's contract the simulator relies on.
"""

from __future__ import annotations

import asyncio
import resource

import pytest

from cloud_sync import topics
from cloud_sync.errors import NoSubscriber, NotConnected, PublishRefused
from cloud_sync.mqtt import USER_PROPERTY_KEY
from cloud_sync.platform.sim_mqtt import SimSession, _skip_props, _varint, raise_fd_limit
from tests.mosquitto import Broker, Collector, eventually, platform_session


def test_wire_encoding() -> None:
    assert [_varint(n) for n in (0, 127, 128, 321, 16_383)] == [
        b"\x00", b"\x7f", b"\x80\x01", b"\xc1\x02", b"\xff\x7f",
    ]  # fmt: skip
    assert _skip_props(b"\x03abcREST", 0) == 4
    assert _skip_props(b"xx\x80\x01" + bytes(128) + b"R", 2) == 4 + 128


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    got = raise_fd_limit(100)
    assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft
    assert hard == resource.RLIM_INFINITY or got == hard


async def test_a_session_publishes_receives_acks_and_says_goodbye(mosquitto: Broker) -> None:
    creds = mosquitto.device_credentials("sim-mq-1")
    presence = topics.device_topic("sim-mq-1", "presence")
    watcher = platform_session(mosquitto, topics.platform_filter("metrics"), presence)
    await watcher.start()
    seen = Collector(watcher)
    session = SimSession.for_device(creds, [], ssl_context=creds.ssl_context())
    try:
        await watcher.wait_ready(10)
        with pytest.raises(NotConnected):  # not yet: it never waits for the broker
            await session.publish(topics.device_topic("sim-mq-1", "metrics"), b"{}")
        await session.start()
        await eventually(lambda: session.connected, 10, "connected")
        await eventually(lambda: [m.value for m in seen.on(presence)][-1:] == ["online"], 10)
        # Own topic: PUBACK, the user property reaches the subscriber.
        mine = topics.device_topic("sim-mq-1", "metrics")
        await session.publish(mine, b'{"n": 1}', user_properties=[(USER_PROPERTY_KEY, "k-1")])
        await eventually(lambda: seen.keys() == ["k-1"], 10, "the record at the platform")
        # A topic of its own nobody subscribes to: PUBACK 0x10. Taken as sent unless the caller
        # asks for a subscriber, as the simulated device's records do (and the agent's).
        unheard = topics.device_topic("sim-mq-1", "reported")
        await session.publish(unheard, b"{}")
        with pytest.raises(NoSubscriber):
            await session.publish(unheard, b"{}", require_subscriber=True)
        await session.publish(mine, b'{"n": 2}', require_subscriber=True)  # heard: no error
        # Another device's topic: the ACL refuses it, and the PUBACK says so.
        with pytest.raises(PublishRefused) as refused:
            await session.publish(topics.device_topic("sim-mq-2", "metrics"), b"{}")
        assert refused.value.reason_code == 0x87
        # Inbound: the retained desired document, acknowledged only by ack().
        desired = topics.device_topic("sim-mq-1", "desired")
        await watcher.publish(desired, b'{"version": 1}', retain=True)
        msg = await asyncio.wait_for(session.messages.get(), 10)
        assert (msg.scope, msg.target, msg.kind, msg.value) == (
            "device", "sim-mq-1", "desired", {"version": 1},
        )  # fmt: skip
        await msg.ack()
    finally:
        await session.close()
        await eventually(lambda: [m.value for m in seen.on(presence)][-1:] == ["offline"], 10)
        await seen.close()
        await watcher.close()
    assert not session.connected

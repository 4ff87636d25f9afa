"""The MQTT session against a real Mosquitto with TLS client certificates and the edgefn ACL."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloud_sync import mqtt, topics
from cloud_sync.errors import NotConnected, PublishRefused, PublishTimeout, SessionClosed
from cloud_sync.mqtt import MqttSession, _guarded, classify_error
from cloud_sync.outbox import Outbox
from cloud_sync.platform.pki import PlatformCA
from tests.mosquitto import Collector, eventually, platform_session
from tests.sender import device_sender

if TYPE_CHECKING:
    from tests.mosquitto import Broker


@pytest.fixture(autouse=True)
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    # Outage tests must not wait out the production backoff cap (60 s).
    monkeypatch.setattr(mqtt, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(mqtt, "RECONNECT_MAX_S", 0.5)


async def test_device_and_platform_exchange_messages(mosquitto: Broker) -> None:
    dev = mosquitto.device_credentials("dev-a")
    metrics_t = topics.device_topic("dev-a", "metrics")
    desired_t = topics.device_topic("dev-a", "desired")
    async with platform_session(mosquitto, topics.platform_filter("metrics")) as plat:
        await plat.wait_ready(10)
        async with MqttSession.for_device(dev) as device:
            await device.wait_ready(10)
            assert device.state.connected and device.state.connects == 1
            assert device.state.since_disconnected is None
            await device.publish(metrics_t, b'{"n": 1}', user_properties=[("edgefn-key", "k1")])
            got = await asyncio.wait_for(plat.messages.get(), 10)
            assert (got.topic, got.value, got.key, got.qos) == (metrics_t, {"n": 1}, "k1", 1)
            assert (got.scope, got.target, got.kind) == ("device", "dev-a", "metrics")
            await got.ack()
            await plat.publish(desired_t, b'{"version": 1, "config": {}}', retain=True)
            desired = await asyncio.wait_for(device.messages.get(), 10)
            assert desired.kind == "desired" and desired.value == {"version": 1, "config": {}}
            assert desired.retain is False  # live delivery, not the retained copy
            await desired.ack()
            await plat.publish(desired_t, b"{not json", retain=True)
            broken = await asyncio.wait_for(device.messages.get(), 10)
            assert broken.value is None and broken.error and "not JSON" in broken.error
            await broken.ack()


async def test_qos1_publish_resolves_only_on_puback(mosquitto: Broker) -> None:
    dev = mosquitto.device_credentials("dev-p")
    topic = topics.device_topic("dev-p", "events")
    async with MqttSession.for_device(dev) as device:
        await device.wait_ready(10)
        assert mosquitto.proc is not None
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)  # the broker cannot answer any more
        try:
            pending = asyncio.create_task(device.publish(topic, b"x", ack_timeout_s=60))
            for _ in range(20):  # give a wrong implementation every chance to resolve early
                await asyncio.sleep(0.01)
            assert not pending.done()
            with pytest.raises(PublishTimeout):
                await device.publish(topic, b"y", ack_timeout_s=0.2)
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        await asyncio.wait_for(pending, 30)  # the PUBACK arrives: resolved, no exception


async def test_boots_without_broker_then_connects_when_it_appears(
    mosquitto_factory: Callable[..., Broker],
) -> None:
    broker = mosquitto_factory()
    broker.kill()
    dev = broker.device_credentials("dev-late")
    async with MqttSession.for_device(dev) as device:  # must not block or raise
        await eventually(lambda: device.state.last_error_code is not None, what="an error")
        state = device.state
        assert not state.connected and state.last_connected is None
        assert state.last_error_code == "broker_unreachable"
        assert state.since_disconnected is not None and state.since_disconnected >= 0
        with pytest.raises(NotConnected):
            await device.publish(topics.device_topic("dev-late", "events"), b"x")
        with pytest.raises(NotConnected) as info:
            await device.wait_connected(0.05)
        assert info.value.code == "broker_unreachable", device.state
        await asyncio.to_thread(broker.start)
        await device.wait_ready(30)
        assert device.state.connected and device.state.last_connected is not None
        # Connected: the outage is over, so the state must stop naming its cause.
        assert device.state.last_error_code is None and device.state.last_error is None


async def test_revoked_certificate_is_refused_and_state_says_why(mosquitto: Broker) -> None:
    dev = mosquitto.device_credentials("dev-revoked")
    await asyncio.to_thread(mosquitto.revoke, dev)
    async with MqttSession.for_device(dev) as device:
        await eventually(lambda: device.state.last_error_code is not None, what="an error")
        with pytest.raises(NotConnected):
            await device.wait_connected(1.0)
        assert device.state.connects == 0
        assert device.state.last_error_code == "certificate_revoked"
        assert device.state.last_error is not None and "revoked" in device.state.last_error
    assert any("certificate verify failed" in line for line in mosquitto.log)


async def test_certificate_from_another_ca_is_refused(mosquitto: Broker) -> None:
    foreign = PlatformCA.load_or_create(mosquitto.workdir / "foreign")
    dev = mosquitto.device_credentials("dev-foreign", ca=foreign)
    async with MqttSession.for_device(dev) as device:
        await eventually(lambda: device.state.last_error_code is not None, what="an error")
        with pytest.raises(NotConnected):
            await device.wait_connected(1.0)
        assert device.state.connects == 0
        assert device.state.last_error_code == "certificate_rejected"


async def test_device_cannot_reach_into_another_devices_subtree(mosquitto: Broker) -> None:
    a, b = mosquitto.device_credentials("dev-a"), mosquitto.device_credentials("dev-b")
    b_desired = topics.device_topic("dev-b", "desired")
    b_metrics = topics.device_topic("dev-b", "metrics")
    async with (
        MqttSession.for_device(a) as dev_a,
        MqttSession.for_device(b) as dev_b,
        platform_session(mosquitto, topics.platform_filter("metrics")) as plat,
        MqttSession(  # A also tries to listen to B's desired documents
            "dev-a-spy",
            mosquitto.host,
            mosquitto.port,
            ssl_context=a.ssl_context(),
            subscriptions=[b_desired],
        ) as spy,
    ):
        for s in (dev_a, dev_b, plat):
            await s.wait_ready(10)
        with pytest.raises(PublishRefused) as info:
            await dev_a.publish(b_desired, b'{"version": 99, "config": {}}')
        assert info.value.reason_code == 0x87 and info.value.permanent
        with pytest.raises(PublishRefused):
            await dev_a.publish(b_metrics, b'{"forged": true}')
        with pytest.raises(PublishRefused):  # group documents are read-only for devices
            await dev_a.publish(topics.group_topic("all"), b"{}")
        # Everything A sent was refused before these were published: if any of A's messages
        # had been delivered, it would arrive first.
        await plat.publish(b_desired, b'{"version": 1, "config": {}}')
        await dev_b.publish(b_metrics, b'{"real": true}')
        first_b = await asyncio.wait_for(dev_b.messages.get(), 10)
        assert first_b.value == {"version": 1, "config": {}}
        first_plat = await asyncio.wait_for(plat.messages.get(), 10)
        assert first_plat.value == {"real": True}
        assert spy.messages.empty()  # the spy's subscription never delivers
        assert dev_b.messages.empty()


async def test_inbound_is_acknowledged_only_after_the_consumer_acks(mosquitto: Broker) -> None:
    """Unacked messages come back after a reconnect; acked ones do not."""
    dev = mosquitto.device_credentials("dev-ack")
    desired = topics.device_topic("dev-ack", "desired")
    plat = platform_session(mosquitto)
    await plat.start()
    try:
        await plat.wait_ready(10)
        device = MqttSession.for_device(dev)
        await device.start()
        await device.wait_ready(10)
        await plat.publish(desired, b'{"version": 1, "config": {}}')
        first = await asyncio.wait_for(device.messages.get(), 10)
        assert not first.dup
        await device.close()  # not acked: the broker keeps it in our persistent session

        device = MqttSession.for_device(dev)
        await device.start()
        await device.wait_connected(10)
        assert device.state.session_present
        again = await asyncio.wait_for(device.messages.get(), 10)
        assert (again.value, again.dup) == (first.value, True)
        await again.ack()
        await again.ack()  # idempotent
        await device.close()

        device = MqttSession.for_device(dev)
        await device.start()
        await device.wait_connected(10)
        await plat.publish(desired, b'{"version": 2, "config": {}}')
        nxt = await asyncio.wait_for(device.messages.get(), 10)
        assert nxt.value == {"version": 2, "config": {}}  # version 1 was not redelivered
        await nxt.ack()
        await device.close()
    finally:
        await plat.close()


async def test_close_says_offline_and_refuses_further_use(mosquitto: Broker) -> None:
    dev = mosquitto.device_credentials("dev-bye")
    presence = topics.device_topic("dev-bye", "presence")
    async with platform_session(mosquitto, topics.platform_filter("presence")) as plat:
        await plat.wait_ready(10)
        collector = Collector(plat)
        device = MqttSession.for_device(dev)
        await device.start()
        await device.wait_ready(10)
        await device.close()
        await device.close()  # idempotent
        with pytest.raises(SessionClosed):
            await device.publish(presence, b"online")
        await eventually(lambda: len(collector.on(presence)) >= 2, what="online + offline")
        assert [m.value for m in collector.on(presence)] == ["online", "offline"]
        await collector.close()


def test_callback_exceptions_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    @_guarded
    def boom() -> None:
        raise RuntimeError("bad callback")

    with caplog.at_level(logging.ERROR, logger="cloud_sync.mqtt"):
        boom()  # would have ended paho's network thread
    assert "bad callback" in caplog.text


def test_error_classification() -> None:
    assert classify_error("[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] alert") == "certificate_revoked"
    assert classify_error("tlsv1 alert unknown ca") == "certificate_rejected"
    assert classify_error("ConnectionRefusedError: [Errno 111]") == "broker_unreachable"
    assert classify_error("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed") == (
        "server_certificate_rejected"
    )
    assert classify_error("something else") == "connection_failed"


async def test_bad_subscriptions_and_garbage_do_not_break_the_session(mosquitto: Broker) -> None:
    dev = mosquitto.device_credentials("dev-g")
    topic = topics.device_topic("dev-g", "events")
    async with MqttSession.for_device(dev) as device:
        await device.wait_ready(10)
        await device.publish(topic, json.dumps({"ok": 1}).encode(), qos=0)
        await device.publish(topic, b"\xff\xfe", qos=1)  # binary payloads are fine on the wire
        assert device.state.connected


async def test_drain_acks_delivered_discards_refused_and_releases_on_cancel(
    mosquitto: Broker, tmp_path: Path
) -> None:
    dev = mosquitto.device_credentials("dev-d")
    own = topics.device_topic("dev-d", "events")
    other = topics.device_topic("dev-x", "events")  # forbidden by the ACL
    async with (
        # The sender's own reported document too: a record nobody subscribes to stays (0x10).
        platform_session(
            mosquitto, topics.platform_filter("events"), topics.platform_filter("reported")
        ) as plat,
        await Outbox.open(tmp_path / "o.db") as outbox,
        device_sender(dev, tmp_path) as client,
    ):
        device = client.session
        await plat.wait_ready(10)
        await device.wait_ready(10)
        collector = Collector(plat)
        good = await outbox.append("events", own, b"mine")
        await outbox.append("events", other, b"not mine")
        drain = asyncio.create_task(client.run_sender(outbox))  # the production sender

        async def drained() -> bool:
            return (await outbox.stats()).records == 0

        await eventually(drained, what="the outbox to drain")
        await eventually(lambda: len(collector.keys("events")) == 1, what="the good record")
        assert collector.keys("events") == [good.key]
        stats = await outbox.stats()
        assert stats.dropped == 1  # the refused record is counted, not retried forever

        assert mosquitto.proc is not None
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)  # publishes now wait for PUBACK forever
        try:
            await outbox.append("events", own, b"stuck")

            async def leased() -> bool:
                return (await outbox.stats()).leased == 1

            await eventually(leased, what="the record to go on the wire")
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
            stats = await outbox.stats()
            assert (stats.records, stats.leased) == (1, 0)  # back in the outbox, sendable
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
            await collector.close()

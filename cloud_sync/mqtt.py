"""An asyncio MQTT 5 session on paho-mqtt 2.x: persistent, TLS, never blocking the loop.

How it runs:

* `start()` configures paho (TLS context, will, persistent session) and calls `connect_async` +
  `loop_start`: paho's own thread does the blocking work (DNS, TCP, TLS handshake, select) and
  reconnects forever. `start()` returns at once, whether or not a broker is reachable.
* paho callbacks run on paho's thread, `_guarded` (an exception would kill reconnection), and
  hop to the loop (`call_soon_threadsafe`), which owns all session state.
* Reconnects wait a jittered exponential delay (`RECONNECT_MIN_S` to `RECONNECT_MAX_S`, below).
* Persistent session (`clean_start=False`, `SESSION_EXPIRY_S`): QoS 1 messages to an offline
  device wait on the broker; resubscribing after a CONNACK: `mqtt_thread.needs_subscribe`.
* Presence (retained): the will is `offline`; after each CONNACK `online`; `close()`: `offline`.

Inbound: messages become `InboundMessage` values on `session.messages` (an `InboundQueue`, an
asyncio.Queue). paho runs with `manual_ack=True`: a QoS 1 message is acknowledged to the broker
only when the consumer calls `await msg.ack()` after storing/applying it; a crash before that
makes the broker redeliver. Nothing delivered is dropped: when the queue is full, paho's thread
waits for room (up to `INBOUND_WAIT_S`) and reads nothing meanwhile, so the broker holds the
rest; a consumer stuck longer than that gets its backlog handed back (the connection is closed,
the persistent session redelivers every unacknowledged message on reconnect). `RECEIVE_MAXIMUM`
asks the broker for at most that many unacknowledged deliveries, but brokers overshoot it.

Outbound: `await publish(...)` resolves on PUBACK, or raises `PublishTimeout` (after
`PUBLISH_TIMEOUT_S`), `PublishRefused` (a failure reason code, e.g. 0x87 by the ACL),
`NotConnected`, `PublishBackpressure` (paho's bounded queue is full) or, with
`require_subscriber=True`, `NoSubscriber` (0x10: nobody subscribes). The sync client's sender
(`cloud_sync.sync`) acknowledges outbox records only after PUBACK; `state` feeds its
MQTT-or-HTTP decision.

Companions, one concern each: `mqtt_paho.py` (paho's configuration, PUBACK reason codes),
`mqtt_inbound.py` (the delivered message), `mqtt_link.py` (link state, why it is down) and
`mqtt_thread.py` (what runs on paho's thread). This module is the loop/thread choreography.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync import mqtt_paho, mqtt_thread, topics
from cloud_sync.credentials import DeviceCredentials
from cloud_sync.errors import (
    MqttError,
    NoSubscriber,
    NotConnected,
    PublishBackpressure,
    PublishTimeout,
    SessionClosed,
    TopicError,
)
from cloud_sync.mqtt_inbound import USER_PROPERTY_KEY as USER_PROPERTY_KEY
from cloud_sync.mqtt_inbound import USER_PROPERTY_KIND as USER_PROPERTY_KIND
from cloud_sync.mqtt_inbound import InboundMessage as InboundMessage
from cloud_sync.mqtt_inbound import InboundQueue as InboundQueue
from cloud_sync.mqtt_inbound import inbound_message
from cloud_sync.mqtt_link import LinkStatus
from cloud_sync.mqtt_link import SessionState as SessionState
from cloud_sync.mqtt_link import classify_error as classify_error
from cloud_sync.mqtt_paho import CONNECT_TIMEOUT_S
from cloud_sync.mqtt_thread import guarded as _guarded

log = logging.getLogger(__name__)

# ---- tuning (module level so tests and the agent's settings can change them) ------------------

# Reconnect backoff: first retry after ~RECONNECT_MIN_S, doubling to RECONNECT_MAX_S; each wait is
# uniform in [d/2, d] ("equal jitter") so a fleet spreads out after a broker restart while one
# device still retries quickly after a blip.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 60.0
# A PUBACK normally takes well under a millisecond on a LAN; 10 s tolerates a slow cellular link.
# A timed-out record stays in the outbox and is sent again (the platform dedupes by key).
PUBLISH_TIMEOUT_S = 10.0
# Inbound messages waiting for the consumer, enforced by backpressure (`mqtt_inbound`): the
# broker's Receive Maximum cannot be relied on (Mosquitto 2.0.11 was measured sending 346
# unacknowledged deliveries under a burst from four clients, against a maximum of 32).
MESSAGE_QUEUE_MAX = 1024
# How long paho's thread waits for room before it hands the backlog back to the broker: it closes
# the connection, so every unacknowledged message is redelivered on the (persistent) session's
# reconnect. Below the keepalive: a thread that waits that long sends no PINGREQ either.
INBOUND_WAIT_S = 20.0
# close(): how long to wait for the goodbye publish and for paho's thread to stop.
CLOSE_TIMEOUT_S = 5.0


class MqttSession:
    """One MQTT connection with a persistent session. Use as `async with MqttSession(...)`."""

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        subscriptions: Sequence[str] = (),
        will: tuple[str, bytes] | None = None,
        online: tuple[str, bytes] | None = None,
        mqtt311: bool = False,
    ) -> None:
        topics.validate_id(client_id, "client id")
        # MQTT 3.1.1 only for brokers without MQTT 5 (the embedded amqtt broker): no session
        # expiry, receive maximum, user properties or retain handling; the platform then
        # dedupes on the payload digest instead of the `edgefn-key` property.
        self.mqtt311 = mqtt311
        self.client_id = client_id
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._subscriptions = list(subscriptions)
        self._will = will
        self._online = online
        self.messages = InboundQueue(MESSAGE_QUEUE_MAX)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._closing = False  # set once the goodbye is sent: no more publishes
        self._close_started = False
        # Loop-owned state.
        self._link = LinkStatus()
        self._pending: dict[int, asyncio.Future[int]] = {}  # mid -> PUBACK reason code
        # paho-thread-owned state.
        self._attempt = 0
        self._generation = 0  # increments per successful CONNACK; stale acks are skipped
        self._subscribed_once = False
        self._sub_mid: int | None = None
        self._handed_back = 0  # the generation whose backlog went back to the broker

    @classmethod
    def for_device(
        cls, creds: DeviceCredentials, groups: Sequence[str] = (), *, mqtt311: bool = False
    ) -> MqttSession:
        """The device's session: its desired + its groups' desired, presence will and online."""
        broker = creds.broker
        presence = topics.device_topic(creds.device_id, "presence")
        return cls(
            creds.device_id,
            broker.host,
            broker.port,
            ssl_context=creds.ssl_context() if broker.tls else None,
            subscriptions=topics.device_subscriptions(creds.device_id, list(groups)),
            will=(presence, topics.PRESENCE_OFFLINE),
            online=(presence, topics.PRESENCE_ONLINE),
            mqtt311=mqtt311,
        )

    # ---- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> MqttSession:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Begin connecting in the background; never waits for the broker."""
        if self._client is not None:
            raise MqttError("session already started")
        self._loop = asyncio.get_running_loop()
        client = mqtt_paho.new_client(
            self.client_id, mqtt311=self.mqtt311, ssl_context=self._ssl, will=self._will
        )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_log = self._on_log
        mqtt_paho.connect_async(client, self.host, self.port, mqtt311=self.mqtt311)
        self._client = client
        client.loop_start()

    async def close(self) -> None:
        """Say `offline`, disconnect cleanly (no will), stop paho's thread. Idempotent."""
        if self._close_started:
            return
        self._close_started = True
        client = self._client
        if client is not None and self._link.connected and self._will is not None:
            with contextlib.suppress(MqttError):
                await self.publish(
                    self._will[0], self._will[1], retain=True, ack_timeout_s=CLOSE_TIMEOUT_S / 2
                )
        self._closing = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SessionClosed("session closed"))
        if client is None:
            return
        client.disconnect()
        stopped = asyncio.Event()
        # loop_stop() joins paho's thread, which may sit in a blocking connect for up to
        # CONNECT_TIMEOUT_S: join on a daemon thread of our own, never on the loop.
        done = functools.partial(self._hop, stopped.set)
        threading.Thread(target=mqtt_thread.stop, args=(client, done), daemon=True).start()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S + 2):
                await stopped.wait()
        except TimeoutError:
            log.warning("paho network thread of %s did not stop in time", self.client_id)
        else:
            mqtt_thread.release_sockets(client)
        self._link.set_connected(False)
        self._client = None

    # ---- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def state(self) -> SessionState:
        return self._link.snapshot()

    async def wait_connected(self, within_s: float | None = None) -> None:
        """Wait for a connection; raises NotConnected (with the last error) after `within_s`."""
        await self._wait(self._link.connected_evt, within_s)

    async def wait_ready(self, within_s: float | None = None) -> None:
        """Wait until connected *and* subscribed (SUBACK seen or session kept by the broker)."""
        await self._wait(self._link.ready_evt, within_s)

    async def _wait(self, evt: asyncio.Event, within_s: float | None) -> None:
        if self._closing:
            raise SessionClosed("session closed")
        try:
            async with asyncio.timeout(within_s):
                await evt.wait()
        except TimeoutError:
            s = self.state
            raise NotConnected(
                f"not connected to {self.host}:{self.port} after {within_s} s"
                + (f": {s.last_error}" if s.last_error else ""),
                code=s.last_error_code or NotConnected.code,
            ) from None

    # ---- outbound --------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = topics.QOS,
        retain: bool = False,
        *,
        user_properties: Iterable[tuple[str, str]] = (),
        ack_timeout_s: float | None = None,
        require_subscriber: bool = False,
    ) -> None:
        """Publish; for QoS 1 return once the broker's PUBACK says it took the message.

        `require_subscriber`: raise `NoSubscriber` when the PUBACK says nobody subscribes
        (MQTT 5 reason 0x10; MQTT 3.1.1 has no reason codes): the message reached no one.
        """
        client = self._client
        if client is None or self._closing:
            raise SessionClosed("session is not running")
        if not self._link.connected:
            last_error = self._link.last_error
            raise NotConnected(
                "not connected" + (f": {last_error}" if last_error else ""),
                code=NotConnected.code,
            )
        props = None
        user_props = list(user_properties)
        if user_props and not self.mqtt311:
            props = mqtt_paho.properties(PacketTypes.PUBLISH)
            props.UserProperty = user_props
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:  # bad topic / qos / payload size
            raise TopicError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise PublishBackpressure(f"paho queue full ({mqtt_paho.MAX_QUEUED} messages)")
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        # Registered before any await: the PUBACK hop can only run after this line.
        fut = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = fut
        timeout = PUBLISH_TIMEOUT_S if ack_timeout_s is None else ack_timeout_s
        try:
            async with asyncio.timeout(timeout):
                code = await fut
        except TimeoutError:
            raise PublishTimeout(f"no PUBACK for {topic!r} within {timeout} s") from None
        finally:
            self._pending.pop(info.mid, None)
        if require_subscriber and code == mqtt_paho.NO_MATCHING_SUBSCRIBERS:
            raise NoSubscriber(f"the broker has no subscriber for {topic!r}: nobody got it")

    # ---- paho thread -----------------------------------------------------------------------

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        mqtt_thread.hop(self._loop, fn, *args)

    def _set_backoff(self, client: mqtt.Client) -> None:
        mqtt_thread.set_backoff(client, self._attempt, RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._attempt += 1

    @_guarded
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._hop(self._record_error, "connack_refused", f"broker refused: {reason}", True)
            return  # paho disconnects; _on_disconnect schedules the retry
        self._attempt = 0
        self._generation += 1
        ready_now = True
        if mqtt_thread.needs_subscribe(
            self._subscriptions, bool(flags.session_present), self._subscribed_once
        ):
            self._sub_mid = mqtt_thread.subscribe(
                client,
                self._subscriptions,
                mqtt311=self.mqtt311,
                session_present=bool(flags.session_present),
            )
            self._subscribed_once = True
            ready_now = False
        if self._online is not None:
            client.publish(self._online[0], self._online[1], qos=topics.QOS, retain=True)
        self._hop(self._on_connected_loop, bool(flags.session_present), ready_now)

    @_guarded
    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:` block, so the exception is still current.
        exc = sys.exc_info()[1]
        text = f"{type(exc).__name__}: {exc}" if exc is not None else "connect failed"
        self._set_backoff(client)
        self._hop(self._record_error, classify_error(text), text, True)

    @_guarded
    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._set_backoff(client)
        self._hop(self._on_disconnected_loop, str(reason))

    @_guarded
    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._hop(self._on_puback_loop, mid, reason.value, str(reason))

    @_guarded
    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid != self._sub_mid:
            return
        bad = [
            f"{t}: {r}" for t, r in zip(self._subscriptions, reasons, strict=False) if r.is_failure
        ]
        self._hop(self._on_suback_loop, bad)

    @_guarded
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        generation = self._generation
        if generation == self._handed_back:
            return  # not acknowledged: the broker redelivers it after the reconnect
        # Backpressure: wait here, on paho's thread, for room in the queue. paho reads nothing
        # while it waits, so the broker keeps the rest (it never gets more than we can hold).
        if not self.messages.reserve(INBOUND_WAIT_S, lambda: self._closing):
            if self._closing:
                return
            self._handed_back = generation
            log.warning(
                "MQTT %s: inbound queue full for %.0f s: reconnecting, the broker keeps and "
                "redelivers the unacknowledged messages",
                self.client_id,
                INBOUND_WAIT_S,
            )
            mqtt_thread.drop_connection(client)
            return
        self._hop(self._on_message_loop, *mqtt_thread.message_fields(msg), generation)

    @_guarded
    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            # paho also logs noise at ERR ("Client is not connected...") while it retries; only
            # a recognised cause (a TLS alert, a refused connection) may replace a known one.
            code = classify_error(buf)
            self._hop(self._record_error, code, buf, code != "connection_failed")
        elif level == mqtt.MQTT_LOG_WARNING:
            log.debug("paho (%s): %s", self.client_id, buf)

    # ---- loop side -------------------------------------------------------------------------

    def _record_error(self, code: str, text: str, specific: bool) -> None:
        if not self._closing and self._link.record_error(code, text, specific) and specific:
            log.info("MQTT %s: %s (%s)", self.client_id, text, code)

    def _on_connected_loop(self, session_present: bool, ready_now: bool) -> None:
        if self._closing:
            return
        self._link.came_up(session_present)
        if ready_now:
            self._link.ready_evt.set()
        log.info(
            "MQTT %s connected to %s:%s (session present: %s)",
            self.client_id,
            self.host,
            self.port,
            session_present,
        )

    def _on_disconnected_loop(self, reason: str) -> None:
        was_up = self._link.connected
        self._link.set_connected(False)
        if was_up:
            self._record_error("connection_lost", f"connection lost: {reason}", False)
            log.info("MQTT %s disconnected: %s", self.client_id, reason)
        else:
            self._record_error("connection_failed", f"connection failed: {reason}", False)

    def _on_puback_loop(self, mid: int, code: int, text: str) -> None:
        fut = self._pending.get(mid)
        if fut is None or fut.done():
            return
        err = mqtt_paho.puback_error(code, text)
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(code)

    def _on_suback_loop(self, bad: list[str]) -> None:
        if bad:
            self._record_error(
                "subscription_refused", "subscription refused: " + "; ".join(bad), True
            )
        if self._link.connected:
            self._link.ready_evt.set()

    def _on_message_loop(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        dup: bool,
        mid: int,
        user_props: tuple[tuple[str, str], ...],
        generation: int,
    ) -> None:
        acker = None
        if qos > 0:
            acker = functools.partial(self._ack, mid, qos, generation)
        msg = inbound_message(
            topic, payload, qos=qos, retain=retain, dup=dup, user_properties=user_props, acker=acker
        )
        self.messages.put_reserved(msg)  # the room was taken on paho's thread: never full

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        client = self._client
        if client is None or self._closing:
            return
        if generation != self._generation:
            # The connection that delivered it is gone; the broker redelivers it (same session)
            # and that copy carries its own ack.
            return
        client.ack(mid, qos)

"""An asyncio MQTT 5 session on paho-mqtt 2.x: persistent, TLS, never blocking the loop.

How it runs:

* `start()` configures paho (TLS context, will, persistent session) and calls `connect_async` +
  `loop_start`: paho's own thread does the blocking work (DNS, TCP, TLS handshake, select) and
  reconnects forever. `start()` returns at once, whether or not a broker is reachable.
* Every paho callback runs on paho's thread, is wrapped by `_guarded` (an exception is logged;
  it would otherwise kill the network thread and with it reconnection) and hops to the event
  loop with `call_soon_threadsafe`. All session state is owned by the loop.
* Reconnects wait a jittered exponential delay (`RECONNECT_MIN_S` doubling to `RECONNECT_MAX_S`,
  each wait uniform in [d/2, d]) so a fleet does not reconnect in lockstep after a broker restart.
* Persistent session: `clean_start=False` with `SESSION_EXPIRY_S`, so QoS 1 messages published
  to the device while it is offline wait on the broker. When the broker says the session is gone
  (`session_present=False`) the subscriptions are made again; on the first connection of a
  process they are always made (retain-handling 1: no duplicate retained copies if the broker
  still had them).
* Presence: the will is `offline` (retained) on the presence topic; after every CONNACK the
  session publishes `online` (retained); a clean `close()` publishes `offline` itself.

Inbound: messages become `InboundMessage` values on `session.messages` (an asyncio.Queue). paho
runs with `manual_ack=True`: a QoS 1 message is acknowledged to the broker only when the consumer
calls `await msg.ack()` after storing/applying it; a crash before that makes the broker
redeliver. `RECEIVE_MAXIMUM` caps how many unacknowledged messages the broker sends us.

Outbound: `await publish(...)` resolves on PUBACK, raises `PublishTimeout` after
`PUBLISH_TIMEOUT_S`, `PublishRefused` on a failure reason code (e.g. 0x87 by the ACL),
`NotConnected` when offline and `PublishBackpressure` when paho's bounded queue is full. Moving
outbox records to the broker is the sync client's sender (`cloud_sync.sync`), which acknowledges
them in the outbox only after PUBACK. `state` exposes connected / last_connected /
since_disconnected / last_error for that MQTT-or-HTTP decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from cloud_sync import topics
from cloud_sync.credentials import DeviceCredentials
from cloud_sync.errors import (
    MqttError,
    NotConnected,
    PublishBackpressure,
    PublishRefused,
    PublishTimeout,
    SessionClosed,
    TopicError,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# ---- tuning (module level so tests and the agent's settings can change them) ------------------

# Keepalive: the broker declares us dead (and publishes the will) after 1.5x this without traffic.
# 30 s keeps NAT/firewall state alive on cellular links without costing much battery or data.
KEEPALIVE_S = 30
# How long the broker keeps our session (subscriptions + queued QoS 1 messages) while we are away.
# A week covers a long weekend outage; the broker's own cap may be lower.
SESSION_EXPIRY_S = 7 * 24 * 3600
# Reconnect backoff: first retry after ~RECONNECT_MIN_S, doubling to RECONNECT_MAX_S; each wait is
# uniform in [d/2, d] ("equal jitter") so a fleet spreads out after a broker restart while one
# device still retries quickly after a blip.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 60.0
# TCP connect + TLS handshake timeout on paho's thread; also bounds how long close() can wait for
# that thread to notice it should stop.
CONNECT_TIMEOUT_S = 10.0
# A PUBACK normally takes well under a millisecond on a LAN; 10 s tolerates a slow cellular link.
# A timed-out record stays in the outbox and is sent again (the platform dedupes by key).
PUBLISH_TIMEOUT_S = 10.0
# QoS 1 messages on the wire at once, and paho's whole outgoing queue (wire + waiting). paho's
# queue is unbounded by default; ours is bounded because the outbox, not paho, holds the backlog.
MAX_INFLIGHT = 32
MAX_QUEUED = 256
# Unacknowledged QoS 1 deliveries the broker may send us (MQTT 5 Receive Maximum). With manual
# acks this is what bounds `messages`; QoS 0 traffic is bounded by MESSAGE_QUEUE_MAX instead.
RECEIVE_MAXIMUM = 32
MESSAGE_QUEUE_MAX = 1024
# close(): how long to wait for the goodbye publish and for paho's thread to stop.
CLOSE_TIMEOUT_S = 5.0

# PUBACK reason codes that will not change on retry: the record is discarded (and counted).
PERMANENT_REFUSALS = {
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x99: "payload format invalid",
}
USER_PROPERTY_KEY = "edgefn-key"
USER_PROPERTY_KIND = "edgefn-kind"


def _guarded(fn: Callable[P, None]) -> Callable[P, None]:
    """paho callbacks must never raise: an exception would end paho's network thread."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback %s failed", fn.__name__)

    return wrapper


def classify_error(text: str) -> str:
    """A stable code for why a connection failed, from an exception or paho log text."""
    t = text.lower()
    if "revoked" in t:
        return "certificate_revoked"
    if "certificate verify failed" in t or "hostname" in t:
        return "server_certificate_rejected"
    if any(
        s in t
        for s in (
            "unknown ca",
            "bad certificate",
            "certificate unknown",
            "certificate required",
            "certificate expired",
            "handshake failure",
            "access denied",
        )
    ):
        return "certificate_rejected"
    if "refused" in t or "unreachable" in t or "timed out" in t or "name or service" in t:
        return "broker_unreachable"
    return "connection_failed"


@dataclass(frozen=True, slots=True)
class SessionState:
    connected: bool
    last_connected: float | None  # wall clock (time.time()) of the last successful CONNACK
    since_disconnected: float | None  # seconds offline (since start if never up); None if up
    connects: int  # successful CONNACKs since start
    session_present: bool  # the broker still had our session at the last connect
    last_error: str | None  # the latest reason we were not connected, human readable
    last_error_code: str | None  # stable code: certificate_revoked, broker_unreachable, ...


@dataclass(slots=True)
class InboundMessage:
    """A message delivered to us, decoded. Call `await msg.ack()` once it is safely handled."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    scope: str | None  # "device" / "group" when the topic is in our tree
    target: str | None  # the device id or group name in the topic
    kind: str | None  # desired, reported, ...
    value: Any  # JSON value (presence: str); None for an empty payload or a decode error
    error: str | None
    user_properties: tuple[tuple[str, str], ...] = ()
    _acker: Callable[[], None] | None = field(default=None, repr=False)

    async def ack(self) -> None:
        """Acknowledge to the broker (QoS 1 PUBACK). Idempotent; a no-op for QoS 0."""
        acker, self._acker = self._acker, None
        if acker is not None:
            acker()

    @property
    def key(self) -> str | None:
        """The sender's idempotency key (user property `edgefn-key`), if any."""
        for k, v in self.user_properties:
            if k == USER_PROPERTY_KEY:
                return v
        return None


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _decode(kind: str | None, payload: bytes) -> tuple[Any, str | None]:
    if not payload:
        return None, None
    if kind == "presence":
        return payload.decode("utf-8", "replace"), None
    try:
        return json.loads(payload), None
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"payload is not JSON: {exc}"


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
        self.messages: asyncio.Queue[InboundMessage] = asyncio.Queue(MESSAGE_QUEUE_MAX)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._closing = False  # set once the goodbye is sent: no more publishes
        self._close_started = False
        # Loop-owned state.
        self._connected = False
        self._connected_evt = asyncio.Event()
        self._ready_evt = asyncio.Event()
        self._last_connected: float | None = None
        self._down_since: float | None = time.monotonic()
        self._connects = 0
        self._session_present = False
        self._last_error: str | None = None
        self._last_error_code: str | None = None
        self._error_is_specific = False
        self._pending: dict[int, asyncio.Future[None]] = {}
        # paho-thread-owned state.
        self._attempt = 0
        self._generation = 0  # increments per successful CONNACK; stale acks are skipped
        self._subscribed_once = False
        self._sub_mid: int | None = None

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
        if self.mqtt311:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=False,
                manual_ack=True,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv5,
                manual_ack=True,
            )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(MAX_QUEUED)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=topics.QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_log = self._on_log
        if self.mqtt311:
            client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S)
        else:
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            client.connect_async(
                self.host, self.port, keepalive=KEEPALIVE_S, clean_start=False, properties=props
            )
        self._client = client
        client.loop_start()

    async def close(self) -> None:
        """Say `offline`, disconnect cleanly (no will), stop paho's thread. Idempotent."""
        if self._close_started:
            return
        self._close_started = True
        client = self._client
        if client is not None and self._connected and self._will is not None:
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
        threading.Thread(target=self._stop_thread, args=(client, stopped), daemon=True).start()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S + 2):
                await stopped.wait()
        except TimeoutError:
            log.warning("paho network thread of %s did not stop in time", self.client_id)
        else:
            # paho closes its wake-up socketpair only in Client.__del__, which may run much later
            # (a traceback can keep the client alive) and then warns about unclosed sockets.
            # Its network thread is gone, so closing them here races with nothing.
            reset = getattr(client, "_reset_sockets", None)
            if reset is not None:
                reset(sockpair_only=True)
        self._set_connected(False)
        self._client = None

    def _stop_thread(self, client: mqtt.Client, stopped: asyncio.Event) -> None:
        # paho reads `_thread` twice in loop_stop and its thread clears it on exit after
        # disconnect(): the race surfaces as AttributeError and means "already stopped".
        with contextlib.suppress(AttributeError):
            client.loop_stop()
        self._hop(stopped.set)

    # ---- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def state(self) -> SessionState:
        down = self._down_since
        return SessionState(
            connected=self._connected,
            last_connected=self._last_connected,
            since_disconnected=None if down is None else time.monotonic() - down,
            connects=self._connects,
            session_present=self._session_present,
            last_error=self._last_error,
            last_error_code=self._last_error_code,
        )

    async def wait_connected(self, within_s: float | None = None) -> None:
        """Wait for a connection; raises NotConnected (with the last error) after `within_s`."""
        await self._wait(self._connected_evt, within_s)

    async def wait_ready(self, within_s: float | None = None) -> None:
        """Wait until connected *and* subscribed (SUBACK seen or session kept by the broker)."""
        await self._wait(self._ready_evt, within_s)

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
    ) -> None:
        """Publish; for QoS 1 return once the broker's PUBACK says it took the message."""
        client = self._client
        if client is None or self._closing:
            raise SessionClosed("session is not running")
        if not self._connected:
            raise NotConnected(
                "not connected" + (f": {self._last_error}" if self._last_error else ""),
                code=NotConnected.code,
            )
        props = None
        user_props = list(user_properties)
        if user_props and not self.mqtt311:
            props = _properties(PacketTypes.PUBLISH)
            props.UserProperty = user_props
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:  # bad topic / qos / payload size
            raise TopicError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise PublishBackpressure(f"paho queue full ({MAX_QUEUED} messages)")
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
                await fut
        except TimeoutError:
            raise PublishTimeout(f"no PUBACK for {topic!r} within {timeout} s") from None
        finally:
            self._pending.pop(info.mid, None)

    # ---- paho thread -----------------------------------------------------------------------

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between check and call
            loop.call_soon_threadsafe(fn, *args)

    def _set_backoff(self, client: mqtt.Client) -> None:
        base = min(RECONNECT_MAX_S, RECONNECT_MIN_S * (2 ** min(self._attempt, 30)))
        delay = random.uniform(base / 2, base)
        self._attempt += 1
        # paho annotates int but only does arithmetic with it; a float gives sub-second jitter.
        client.reconnect_delay_set(cast(int, delay), cast(int, delay))

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
        if self._subscriptions and (not flags.session_present or not self._subscribed_once):
            # First connect of this process: subscribe even if the session exists (the list may
            # have changed); retain-handling 1 avoids duplicate retained copies in that case.
            if self.mqtt311:
                _, mid = client.subscribe([(t, topics.QOS) for t in self._subscriptions])
            else:
                rh = 1 if flags.session_present else 0
                opts = SubscribeOptions(qos=topics.QOS, retainHandling=rh)
                _, mid = client.subscribe([(t, opts) for t in self._subscriptions])
            self._sub_mid = mid
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
        props = getattr(msg, "properties", None)
        user_props = tuple(getattr(props, "UserProperty", None) or ())
        self._hop(
            self._on_message_loop,
            msg.topic,
            bytes(msg.payload),
            msg.qos,
            bool(msg.retain),
            bool(msg.dup),
            msg.mid,
            user_props,
            self._generation,
        )

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

    def _set_connected(self, up: bool) -> None:
        self._connected = up
        if up:
            self._connected_evt.set()
            self._down_since = None
        else:
            self._connected_evt.clear()
            self._ready_evt.clear()
            if self._down_since is None:
                self._down_since = time.monotonic()

    def _record_error(self, code: str, text: str, specific: bool) -> None:
        # A specific reason (certificate revoked) is not overwritten by the generic "connection
        # lost" that paho reports right after it, until a connection succeeds again.
        if self._closing or (not specific and self._error_is_specific):
            return
        self._last_error, self._last_error_code = text, code
        self._error_is_specific = specific
        if specific:
            log.info("MQTT %s: %s (%s)", self.client_id, text, code)

    def _on_connected_loop(self, session_present: bool, ready_now: bool) -> None:
        if self._closing:
            return
        self._connects += 1
        self._last_connected = time.time()
        self._session_present = session_present
        self._error_is_specific = False  # connected: the last failure is history (issue 11)
        self._last_error = self._last_error_code = None
        self._set_connected(True)
        if ready_now:
            self._ready_evt.set()
        log.info(
            "MQTT %s connected to %s:%s (session present: %s)",
            self.client_id,
            self.host,
            self.port,
            session_present,
        )

    def _on_disconnected_loop(self, reason: str) -> None:
        was_up = self._connected
        self._set_connected(False)
        if was_up:
            self._record_error("connection_lost", f"connection lost: {reason}", False)
            log.info("MQTT %s disconnected: %s", self.client_id, reason)
        else:
            self._record_error("connection_failed", f"connection failed: {reason}", False)

    def _on_puback_loop(self, mid: int, code: int, text: str) -> None:
        fut = self._pending.get(mid)
        if fut is None or fut.done():
            return
        if code >= 0x80:
            fut.set_exception(
                PublishRefused(
                    f"broker refused the publish: {text} (0x{code:02x})",
                    reason_code=code,
                    permanent=code in PERMANENT_REFUSALS,
                )
            )
        else:
            fut.set_result(None)

    def _on_suback_loop(self, bad: list[str]) -> None:
        if bad:
            self._record_error(
                "subscription_refused", "subscription refused: " + "; ".join(bad), True
            )
        if self._connected:
            self._ready_evt.set()

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
        try:
            parsed: topics.Topic | None = topics.parse(topic)
        except TopicError:
            parsed = None
        kind = parsed.kind if parsed else None
        value, error = _decode(kind, payload)
        acker = None
        if qos > 0:
            acker = functools.partial(self._ack, mid, qos, generation)
        msg = InboundMessage(
            topic=topic,
            payload=payload,
            qos=qos,
            retain=retain,
            dup=dup,
            scope=parsed.scope if parsed else None,
            target=parsed.id if parsed else None,
            kind=kind,
            value=value,
            error=error,
            user_properties=user_props,
            _acker=acker,
        )
        try:
            self.messages.put_nowait(msg)
        except asyncio.QueueFull:
            # Not acknowledged: a QoS 1 message comes back after the next reconnect.
            log.warning(
                "MQTT %s: inbound queue full, dropping message on %s", self.client_id, topic
            )

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        client = self._client
        if client is None or self._closing:
            return
        if generation != self._generation:
            # The connection that delivered it is gone; the broker redelivers it (same session)
            # and that copy carries its own ack.
            return
        client.ack(mid, qos)

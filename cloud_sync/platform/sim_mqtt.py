"""The fleet simulator's MQTT client: one session per simulated device, all on one asyncio loop.

Why not the agent's `cloud_sync.mqtt.MqttSession`: it runs paho's network thread per session
(plus paho's wake-up socket pair), and a 2-core machine stalls long before 1,000 such threads.
Every simulated device still needs an MQTT session of its own — the broker knows a device by its
client certificate (`use_identity_as_username`) and its ACL lets it use only `edgefn/v1/<id>/...`
topics, so sessions cannot be shared. So this is a small MQTT client over asyncio streams (one
socket, one reader task per device; nothing else per device), speaking only what a device needs:
CONNECT (TLS client certificate, will, persistent session: MQTT 5 `clean_start=0` with a session
expiry and a receive maximum, or MQTT 3.1.1 `clean_session=0` for the embedded broker),
SUBSCRIBE, PUBLISH and PUBACK both ways at QoS 0/1, PINGREQ, DISCONNECT.

It follows `MqttSession`'s contract where the simulator relies on it: `messages` is a queue of
`InboundMessage` acknowledged (PUBACK) only by `await msg.ack()`; `publish` resolves on PUBACK
and raises `NotConnected`, `PublishTimeout` or `PublishRefused`; the will is `offline` (retained)
on the presence topic, `online` is published after each CONNACK and `offline` by a clean
`close()`; reconnects back off with jitter; subscriptions are made on the first connection and
whenever the broker lost the session. A shared `gate` semaphore bounds how many devices are in
the TCP + TLS handshake at once, so 10,000 devices do not overrun the broker's listen backlog
(the simulator gives the embedded amqtt broker a gate of one, held until the SUBACK: amqtt fails
a connect that overlaps another client's SUBSCRIBE).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import resource
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Sequence

from cloud_sync import mqtt_paho, topics
from cloud_sync.credentials import DeviceCredentials
from cloud_sync.errors import (
    MqttError,
    NoSubscriber,
    NotConnected,
    PublishTimeout,
    SessionClosed,
)
from cloud_sync.mqtt import (
    CLOSE_TIMEOUT_S,
    MESSAGE_QUEUE_MAX,
    PUBLISH_TIMEOUT_S,
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
)
from cloud_sync.mqtt_inbound import InboundMessage, inbound_message

log = logging.getLogger("edgefn.simulator.mqtt")

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
MAX_PACKET = 1 << 20  # a desired document is a few KB: anything bigger is a broken stream


class ProtocolError(MqttError):
    code = "mqtt_protocol_error"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([ptype << 4 | flags]) + _varint(len(body)) + body


def _skip_props(body: bytes, pos: int) -> int:
    """Position after an MQTT 5 property block starting at `pos`."""
    length, shift = 0, 0
    while True:
        b = body[pos]
        pos += 1
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return pos + length


async def read_packet(reader: asyncio.StreamReader, first: int) -> tuple[int, int, bytes]:
    """(type, flags, body) of the packet whose first byte was already read."""
    length, shift = 0, 0
    for _ in range(4):
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    else:
        raise ProtocolError("bad remaining length")
    if length > MAX_PACKET:
        raise ProtocolError(f"packet of {length} bytes")
    body = await reader.readexactly(length) if length else b""
    return first >> 4, first & 0x0F, body


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (one socket per device); the new
    soft limit. Logs when even the hard limit is below `wanted`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft < wanted:
        log.warning("open-file limit %d is below the %d the simulated fleet needs", soft, wanted)
    return soft


class SimSession:
    """One device's MQTT session on the running loop. `start()`, `publish()`, `close()`."""

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        subscriptions: Sequence[str],
        will: tuple[str, bytes],
        online: tuple[str, bytes],
        mqtt311: bool = False,
        gate: asyncio.Semaphore | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.client_id, self.host, self.port = client_id, host, port
        self.mqtt311 = mqtt311
        self._ssl = ssl_context
        self._subscriptions = list(subscriptions)
        self._will, self._online = will, online
        self._gate = gate
        self._gate_held = False
        self._on_connected = on_connected  # called after each CONNACK: send what waited
        self.messages: asyncio.Queue[InboundMessage] = asyncio.Queue(MESSAGE_QUEUE_MAX)
        self.connects = 0
        self.last_error: str | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._next_id = 0
        self._generation = 0
        self._subscribed_once = False
        self._last_sent = 0.0

    @classmethod
    def for_device(
        cls,
        creds: DeviceCredentials,
        groups: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None,
        mqtt311: bool = False,
        gate: asyncio.Semaphore | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> SimSession:
        """As `MqttSession.for_device`: its desired + its groups', presence will and online."""
        presence = topics.device_topic(creds.device_id, "presence")
        return cls(
            creds.device_id, creds.broker.host, creds.broker.port,
            ssl_context=ssl_context if creds.broker.tls else None,
            subscriptions=topics.device_subscriptions(creds.device_id, list(groups)),
            will=(presence, topics.PRESENCE_OFFLINE), online=(presence, topics.PRESENCE_ONLINE),
            mqtt311=mqtt311, gate=gate, on_connected=on_connected,
        )  # fmt: skip

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        """Begin connecting in the background; never waits for the broker."""
        if self._task is not None:
            raise MqttError("session already started")
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")

    async def close(self) -> None:
        """Say `offline`, disconnect cleanly (no will), stop the reader. Idempotent."""
        if self._closing:
            return
        if self._connected:
            with contextlib.suppress(MqttError):
                await self.publish(*self._will, retain=True, ack_timeout_s=CLOSE_TIMEOUT_S / 2)
        self._closing = True
        writer = self._writer
        if writer is not None and self._connected:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(_packet(DISCONNECT, 0, b""))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drop(SessionClosed("session closed"))

    # ---- outbound ---------------------------------------------------------------------------

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

        `require_subscriber`: raise `NoSubscriber` on PUBACK reason 0x10, as the agent's
        session does (cloud_sync/mqtt.py): a simulated device keeps such a record too."""
        if self._closing:
            raise SessionClosed("session is not running")
        writer = self._writer
        if not self._connected or writer is None:
            raise NotConnected(
                "not connected" + (f": {self.last_error}" if self.last_error else "")
            )
        mid = self._mid() if qos else 0
        writer.write(self._publish_packet(topic, payload, qos, retain, mid, user_properties))
        self._last_sent = time.monotonic()
        if not qos:
            return
        fut = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        timeout = PUBLISH_TIMEOUT_S if ack_timeout_s is None else ack_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await writer.drain()
                code = await fut
        except TimeoutError:
            raise PublishTimeout(f"no PUBACK for {topic!r} within {timeout} s") from None
        except (OSError, RuntimeError) as exc:
            raise NotConnected(f"connection lost: {exc}") from None
        finally:
            self._pending.pop(mid, None)
        if require_subscriber and code == mqtt_paho.NO_MATCHING_SUBSCRIBERS:
            raise NoSubscriber(f"the broker has no subscriber for {topic!r}: nobody got it")

    def _publish_packet(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        mid: int,
        user_properties: Iterable[tuple[str, str]] = (),
    ) -> bytes:
        body = _str(topic) + (struct.pack("!H", mid) if qos else b"")
        if not self.mqtt311:
            props = b"".join(b"\x26" + _str(k) + _str(v) for k, v in user_properties)
            body += _varint(len(props)) + props
        return _packet(PUBLISH, qos << 1 | int(retain), body + payload)

    def _mid(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    # ---- the connection ---------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._connect_and_serve()
                attempt = 0
            except (OSError, TimeoutError, EOFError, MqttError, IndexError, struct.error) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("MQTT %s: %s", self.client_id, self.last_error)
            finally:
                self._drop(NotConnected("connection lost"))
            base = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** min(attempt, 30))
            attempt += 1
            await asyncio.sleep(random.uniform(base / 2, base))

    def _drop(self, exc: MqttError) -> None:
        self._connected = False
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _connect_and_serve(self) -> None:
        if self._gate is not None:
            await self._gate.acquire()
            self._gate_held = True
        try:
            async with asyncio.timeout(mqtt_paho.CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None, limit=MAX_PACKET,
                )  # fmt: skip
                self._writer = writer
                writer.write(self._connect_packet())
                ptype, _, body = await read_packet(reader, (await reader.readexactly(1))[0])
            if ptype != CONNACK or len(body) < 2:
                raise ProtocolError(f"expected CONNACK, got packet type {ptype}")
            if body[1] != 0:
                raise MqttError(f"broker refused the connection (reason 0x{body[1]:02x})")
            session_present = bool(body[0] & 1)
            self._generation += 1
            if self._subscriptions and (not session_present or not self._subscribed_once):
                writer.write(self._subscribe_packet(session_present))
                self._subscribed_once = True
                if self.mqtt311:
                    # The embedded broker (amqtt) walks every subscription while a client
                    # connects and fails when another client subscribes meanwhile: hold the
                    # gate until the SUBACK (bounded), so connects there go one at a time.
                    asyncio.get_running_loop().call_later(
                        mqtt_paho.CONNECT_TIMEOUT_S, self._release_gate
                    )
                else:
                    self._release_gate()
            else:
                self._release_gate()
            writer.write(self._publish_packet(*self._online, 1, True, self._mid()))
            self._last_sent = time.monotonic()
            self._connected = True
            self.connects += 1
            self.last_error = None
            if self._on_connected is not None:
                self._on_connected()
            await self._serve(reader, writer)
        finally:
            self._release_gate()

    def _release_gate(self) -> None:
        if self._gate_held and self._gate is not None:
            self._gate_held = False
            self._gate.release()

    def _connect_packet(self) -> bytes:
        keepalive = mqtt_paho.KEEPALIVE_S
        flags = 0x04 | 0x08 | 0x20  # will, will QoS 1, will retained; clean start 0
        if self.mqtt311:
            head = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
            will = b""
        else:
            props = b"\x11" + struct.pack("!I", mqtt_paho.SESSION_EXPIRY_S)
            props += b"\x21" + struct.pack("!H", mqtt_paho.RECEIVE_MAXIMUM)
            head = _str("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive)
            head += _varint(len(props)) + props
            will = b"\x00"  # no will properties
        body = head + _str(self.client_id) + will + _str(self._will[0]) + _str(self._will[1])
        return _packet(CONNECT, 0, body)

    def _subscribe_packet(self, session_present: bool) -> bytes:
        body = struct.pack("!H", self._mid())
        if self.mqtt311:
            body += b"".join(_str(t) + bytes([topics.QOS]) for t in self._subscriptions)
        else:
            # Session still on the broker: retain-handling 1, no duplicate retained copies.
            options = topics.QOS | (1 << 4 if session_present else 0)
            body += b"\x00" + b"".join(_str(t) + bytes([options]) for t in self._subscriptions)
        return _packet(SUBSCRIBE, 0x2, body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read packets until the connection ends; PINGREQ when we have been quiet."""
        keepalive = mqtt_paho.KEEPALIVE_S
        ping_sent: float | None = None
        while True:
            now = time.monotonic()
            if ping_sent is not None and now - ping_sent > keepalive:
                raise TimeoutError("no PINGRESP from the broker")
            wait = max(0.05, self._last_sent + keepalive * 0.75 - now)
            try:
                async with asyncio.timeout(wait):
                    first = await reader.readexactly(1)
            except TimeoutError:
                if ping_sent is None and time.monotonic() - self._last_sent >= keepalive * 0.75:
                    writer.write(_packet(PINGREQ, 0, b""))
                    self._last_sent = ping_sent = time.monotonic()
                continue
            async with asyncio.timeout(mqtt_paho.CONNECT_TIMEOUT_S):
                ptype, flags, body = await read_packet(reader, first[0])
            ping_sent = None  # any packet says the broker is alive
            if ptype == PUBLISH:
                self._on_publish(flags, body)
            elif ptype == PUBACK:
                self._on_puback(body)
            elif ptype == SUBACK:
                self._on_suback(body)
            elif ptype == DISCONNECT:
                reason = body[0] if body else 0
                raise MqttError(f"broker disconnected us (reason 0x{reason:02x})")

    def _on_publish(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 3
        (n,) = struct.unpack_from("!H", body)
        topic = body[2 : 2 + n].decode()
        pos = 2 + n
        mid = 0
        if qos:
            (mid,) = struct.unpack_from("!H", body, pos)
            pos += 2
        if not self.mqtt311:
            pos = _skip_props(body, pos)
        acker = functools.partial(self._ack, mid, self._generation) if qos else None
        msg = inbound_message(
            topic, body[pos:], qos=qos, retain=bool(flags & 1), dup=bool(flags & 8), acker=acker
        )
        try:
            self.messages.put_nowait(msg)
        except asyncio.QueueFull:  # not acknowledged: the broker sends it again
            log.warning(
                "MQTT %s: inbound queue full, dropping message on %s", self.client_id, topic
            )

    def _ack(self, mid: int, generation: int) -> None:
        writer = self._writer
        # An ack for a connection that is gone is skipped: the broker redelivers that message.
        if writer is not None and self._connected and generation == self._generation:
            writer.write(_packet(PUBACK, 0, struct.pack("!H", mid)))
            self._last_sent = time.monotonic()

    def _on_puback(self, body: bytes) -> None:
        (mid,) = struct.unpack_from("!H", body)
        code = body[2] if len(body) > 2 and not self.mqtt311 else 0
        fut = self._pending.get(mid)
        if fut is None or fut.done():
            return
        err = mqtt_paho.puback_error(code, f"reason 0x{code:02x}")
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(code)

    def _on_suback(self, body: bytes) -> None:
        self._release_gate()
        pos = 2 if self.mqtt311 else _skip_props(body, 2)
        bad = [c for c in body[pos:] if c >= 0x80]
        if bad:
            self.last_error = f"subscription refused: {', '.join(f'0x{c:02x}' for c in bad)}"
            log.info("MQTT %s: %s", self.client_id, self.last_error)

"""What an MQTT session hands its consumer: a delivered message, decoded against our topic tree.

`inbound_message(...)` turns what paho delivered into an `InboundMessage`: the topic parsed
(`cloud_sync.topics`: scope, device or group id, kind), the payload decoded (JSON; presence is
plain text), and the sender's idempotency key read from the MQTT 5 user properties. Decoding
never raises: a payload that is not JSON comes through with `error` set, so the consumer can
report it and still acknowledge it. `await msg.ack()` is the QoS 1 acknowledgement
(`cloud_sync.mqtt.MqttSession` runs paho with manual acks).

`InboundQueue` is where delivered messages wait for the consumer: an asyncio.Queue whose room is
counted across threads, so paho's thread can wait for room (backpressure) instead of finding the
queue full and dropping a message the broker will not send again before a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloud_sync import topics
from cloud_sync.errors import TopicError

# MQTT 5 user properties our senders set: the idempotency key the platform dedupes on, and the
# record kind (metrics, events...).
USER_PROPERTY_KEY = "edgefn-key"
USER_PROPERTY_KIND = "edgefn-kind"


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


def decode_payload(kind: str | None, payload: bytes) -> tuple[Any, str | None]:
    """(value, error): JSON for every kind but presence (plain text); never raises."""
    if not payload:
        return None, None
    if kind == "presence":
        return payload.decode("utf-8", "replace"), None
    try:
        return json.loads(payload), None
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"payload is not JSON: {exc}"


def inbound_message(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
    dup: bool,
    user_properties: tuple[tuple[str, str], ...] = (),
    acker: Callable[[], None] | None = None,
) -> InboundMessage:
    """The decoded message; a topic outside our tree comes through with scope/target/kind None."""
    try:
        parsed: topics.Topic | None = topics.parse(topic)
    except TopicError:
        parsed = None
    kind = parsed.kind if parsed else None
    value, error = decode_payload(kind, payload)
    return InboundMessage(
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
        user_properties=user_properties,
        _acker=acker,
    )


# How often a waiting paho thread looks whether it should give up (the session is closing).
RESERVE_SLICE_S = 0.25


class InboundQueue(asyncio.Queue[InboundMessage]):
    """The session's inbound queue: at most `limit` messages, room reserved from paho's thread.

    The asyncio side is unbounded; the bound is the semaphore `_room`, taken on paho's thread by
    `reserve()` *before* the message hops to the loop, and given back when the consumer takes
    the message out (`get`/`get_nowait`). A reserved message therefore always fits.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._room = threading.Semaphore(limit)
        self.waits = 0  # how often paho's thread found no room and had to wait (status, tests)

    def reserve(self, within_s: float, give_up: Callable[[], bool]) -> bool:
        """Block (paho's thread, never the loop) until there is room; False after `within_s`
        or as soon as `give_up()` says so."""
        if self._room.acquire(blocking=False):
            return True
        self.waits += 1  # only paho's thread writes it
        deadline = time.monotonic() + within_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._room.acquire(timeout=min(RESERVE_SLICE_S, left)):
                return True
            if give_up():
                return False

    def put_reserved(self, msg: InboundMessage) -> None:
        """Enqueue a message whose room `reserve()` took (on the loop)."""
        super().put_nowait(msg)

    def put_nowait(self, item: InboundMessage) -> None:
        """Enqueue from the loop, taking room now; QueueFull when there is none."""
        if not self._room.acquire(blocking=False):
            raise asyncio.QueueFull
        super().put_nowait(item)

    def get_nowait(self) -> InboundMessage:
        msg = super().get_nowait()
        self._room.release()
        return msg

"""How edgefn configures paho-mqtt 2.x: protocol, persistent session, bounded queues, TLS, will.

`new_client(...)` builds the client (manual acks, so a QoS 1 message is acknowledged only once
it is handled) and `connect_async(...)` asks paho's thread to connect (MQTT 5: `clean_start=False`
with a session expiry and a receive maximum; MQTT 3.1.1 for brokers without 5). Nothing here
touches the event loop; `cloud_sync.mqtt.MqttSession` wires the callbacks and owns the state.
`puback_error` reads a PUBACK reason code.
"""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync import topics
from cloud_sync.errors import PublishRefused

# Keepalive: the broker declares us dead (and publishes the will) after 1.5x this without traffic.
# 30 s keeps NAT/firewall state alive on cellular links without costing much battery or data.
KEEPALIVE_S = 30
# How long the broker keeps our session (subscriptions + queued QoS 1 messages) while we are away.
# A week covers a long weekend outage; the broker's own cap may be lower.
SESSION_EXPIRY_S = 7 * 24 * 3600
# TCP connect + TLS handshake timeout on paho's thread; also bounds how long close() can wait for
# that thread to notice it should stop.
CONNECT_TIMEOUT_S = 10.0
# QoS 1 messages on the wire at once, and paho's whole outgoing queue (wire + waiting). paho's
# queue is unbounded by default; ours is bounded because the outbox, not paho, holds the backlog.
MAX_INFLIGHT = 32
MAX_QUEUED = 256
# Unacknowledged QoS 1 deliveries the broker may send us (MQTT 5 Receive Maximum). With manual
# acks this is what bounds the session's inbound queue; QoS 0 traffic is bounded by its size.
RECEIVE_MAXIMUM = 32

# PUBACK reason codes that will not change on retry: the record is discarded (and counted).
PERMANENT_REFUSALS = {
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x99: "payload format invalid",
}


# PUBACK reason 0x10 "No matching subscribers": a success to MQTT (the broker took the message),
# but nobody received it. `MqttSession.publish(require_subscriber=True)` makes it an error.
NO_MATCHING_SUBSCRIBERS = 0x10


def properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def new_client(
    client_id: str,
    *,
    mqtt311: bool,
    ssl_context: ssl.SSLContext | None,
    will: tuple[str, bytes] | None,
) -> mqtt.Client:
    """A paho client with our settings; callbacks are the caller's to set."""
    if mqtt311:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
            manual_ack=True,
        )
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(MAX_QUEUED)
    if ssl_context is not None:
        client.tls_set_context(ssl_context)
    if will is not None:
        client.will_set(will[0], will[1], qos=topics.QOS, retain=True)
    return client


def connect_async(client: mqtt.Client, host: str, port: int, *, mqtt311: bool) -> None:
    """Queue the connection for paho's thread (never blocks): a persistent session."""
    if mqtt311:
        client.connect_async(host, port, keepalive=KEEPALIVE_S)
        return
    props = properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    client.connect_async(host, port, keepalive=KEEPALIVE_S, clean_start=False, properties=props)


def puback_error(code: int, text: str) -> PublishRefused | None:
    """The refusal a PUBACK reason code means (>= 0x80), None when the broker took it."""
    if code < 0x80:
        return None
    return PublishRefused(
        f"broker refused the publish: {text} (0x{code:02x})",
        reason_code=code,
        permanent=code in PERMANENT_REFUSALS,
    )

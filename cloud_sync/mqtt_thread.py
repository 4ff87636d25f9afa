"""The paho network thread's side of an MQTT session, and the ways back to the event loop.

Why a module of its own: paho runs its callbacks and its blocking work on its own thread, and
the rules for code there are few but strict — never raise (`guarded`), touch no loop-owned state
but hop to the loop (`hop`), never join that thread from the loop (`stop`). They are kept here,
apart from `cloud_sync.mqtt.MqttSession`, which owns the state and the choreography. Also here,
because they run on paho's thread: the jittered reconnect delay (`set_backoff`), the
(re)subscription after a CONNACK (`subscribe`) and what of a delivered message crosses to the
loop (`message_fields`). paho's configuration itself is `mqtt_paho.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, cast

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from cloud_sync import topics

# The session's logger: what goes wrong on paho's thread is reported as the session's.
log = logging.getLogger("cloud_sync.mqtt")

P = ParamSpec("P")


def guarded(fn: Callable[P, None]) -> Callable[P, None]:
    """paho callbacks must never raise: an exception would end paho's network thread."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback %s failed", fn.__name__)

    return wrapper


def hop(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., None], *args: Any) -> None:
    """Run `fn(*args)` on the event loop, from any thread; dropped once the loop is gone."""
    if loop is None or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # the loop closed between check and call
        loop.call_soon_threadsafe(fn, *args)


def set_backoff(client: mqtt.Client, attempt: int, min_s: float, max_s: float) -> None:
    """Set paho's next reconnect wait: `min_s` doubling per attempt to `max_s`, in [d/2, d]."""
    base = min(max_s, min_s * (2 ** min(attempt, 30)))
    delay = random.uniform(base / 2, base)
    # paho annotates int but only does arithmetic with it; a float gives sub-second jitter.
    client.reconnect_delay_set(cast(int, delay), cast(int, delay))


def needs_subscribe(
    subscriptions: Sequence[str], session_present: bool, subscribed_once: bool
) -> bool:
    """Whether a CONNACK must be followed by SUBSCRIBE.

    Always on the first connect of this process (the list may have changed since the session
    was made; retain-handling 1 then avoids duplicate retained copies), and whenever the broker
    lost the session. Shared subscriptions every time: Mosquitto 2.0 does not restore them from
    its persistence file after a restart although it reports the session present, and the
    platform would hear nothing (subscribing again is idempotent).
    """
    if not subscriptions:
        return False
    shared = any(t.startswith("$share/") for t in subscriptions)
    return not session_present or not subscribed_once or shared


def subscribe(
    client: mqtt.Client, subscriptions: Sequence[str], *, mqtt311: bool, session_present: bool
) -> int | None:
    """Subscribe to all of `subscriptions` at QoS 1; the message id its SUBACK will carry.

    With the session still on the broker, retain-handling 1 avoids duplicate retained copies.
    """
    if mqtt311:
        _, mid = client.subscribe([(t, topics.QOS) for t in subscriptions])
    else:
        opts = SubscribeOptions(qos=topics.QOS, retainHandling=1 if session_present else 0)
        _, mid = client.subscribe([(t, opts) for t in subscriptions])
    return mid


def message_fields(msg: mqtt.MQTTMessage) -> tuple[Any, ...]:
    """What of a delivered message crosses to the loop: topic, payload, qos, retain, dup, mid,
    user properties (copied: paho's objects stay on its thread)."""
    props = getattr(msg, "properties", None)
    user_props = tuple(getattr(props, "UserProperty", None) or ())
    return (
        msg.topic,
        bytes(msg.payload),
        msg.qos,
        bool(msg.retain),
        bool(msg.dup),
        msg.mid,
        user_props,
    )


def drop_connection(client: mqtt.Client) -> None:
    """Close the connection under paho (from its own thread): it reconnects with its backoff,
    and the broker redelivers every unacknowledged QoS 1 message of the persistent session."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket too; paho's websocket wrapper is not used
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def stop(client: mqtt.Client, done: Callable[[], None]) -> None:
    """Stop paho's thread, then call `done` (on this thread). Blocks: run it on a thread."""
    # paho reads `_thread` twice in loop_stop and its thread clears it on exit after
    # disconnect(): the race surfaces as AttributeError and means "already stopped".
    with contextlib.suppress(AttributeError):
        client.loop_stop()
    done()


def release_sockets(client: mqtt.Client) -> None:
    """Close paho's wake-up socketpair; only once its network thread is gone.

    paho closes it only in Client.__del__, which may run much later (a traceback can keep the
    client alive) and then warns about unclosed sockets. With the thread gone this races nothing.
    """
    reset = getattr(client, "_reset_sockets", None)
    if reset is not None:
        reset(sockpair_only=True)

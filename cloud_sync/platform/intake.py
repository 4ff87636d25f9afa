"""Platform side of MQTT: take device traffic in, put desired documents out.

`MqttIntake` holds one `MqttSession` with the platform identity (`edgefn-platform`, a client
certificate the platform issues itself from its CA at start), subscribed to
`edgefn/v1/devices/+/{reported,metrics,events,presence,rollout}`.

Inbound, per message: topic -> (device, kind) -> `FleetStore.ingest` in a thread (deduped by the
`edgefn-key` user property and by payload digest) -> only then `ack()` (PUBACK), so a crash
before the commit makes the broker redeliver. While the store is unavailable (PostgreSQL
restarting) the same message is tried again with a growing delay rather than left
unacknowledged: the broker would resend it only after the next reconnect. Presence
(`online`/`offline`, retained, the will) updates the registry. Messages for devices that were
never enrolled, or whose certificate was revoked, are acknowledged and dropped (the broker's ACL
already stops a device writing into another's subtree; this catches leftovers of removed
devices).

Outbound: `publish_desired(device)` / `publish_group(name)` publish the stored document retained
(QoS 1). When the broker is down the document stays in the store; after every (re)connect
`_republish` sends all of them again (a broker without persistence forgot its retained
messages), which devices ignore when the version is one they have seen.

Every document leaves as a director instruction (`director.py`): signed, naming the device or
group, under a counter that only grows. `_watch` also re-issues, every `RENEW_CHECK_S`, the
instructions the director reports as past half their lifetime, so a device never holds only an
expired one while the platform is up (on the leader: renewal is once-per-fleet work).

Several replicas (docs/scale-out.md): with `shared=True` the subscriptions are MQTT 5 shared
subscriptions (`$share/edgefn-platform/<filter>`), so the broker hands each device message to
exactly one replica; each replica connects under a client id of its own (`client_id`, from the
replica id) with the one platform certificate (the broker's ACL keys on the certificate's CN).
The full republish after a (re)connect is once-per-fleet work: it runs only while
`is_leader()` says so, and `take_over()` (a leader duty) asks for one at the start of a term --
a leader that died after storing a desired document but before publishing it is covered.
`publish_desired` itself runs on whichever replica changed the document.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from cloud_sync import topics
from cloud_sync.credentials import DeviceCredentials, parse_broker_url
from cloud_sync.errors import CloudSyncError, MqttError
from cloud_sync.mqtt import InboundMessage, MqttSession
from cloud_sync.platform.director import Director
from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.pki import PLATFORM_IDENTITY, PlatformCA
from runtimes import tasks

log = logging.getLogger("edgefn.intake")

_KINDS: tuple[topics.DeviceKind, ...] = ("reported", "metrics", "events", "presence", "rollout")
# How often the intake checks whether the session reconnected (to republish desired state).
WATCH_INTERVAL_S = 0.5
# How often the intake asks the director which instructions to re-issue before they expire.
# Lifetimes are days; a minute costs one indexed query.
RENEW_CHECK_S = 60.0
# A message the store could not take (it is down) is tried again after this, doubling.
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0


class MqttIntake:
    def __init__(
        self,
        store: FleetStore,
        ca: PlatformCA,
        broker_url: str,
        *,
        mqtt311: bool,
        director: Director | None = None,
        shared: bool = False,
        client_id: str = PLATFORM_IDENTITY,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.director = director
        self.shared = shared
        self.is_leader = is_leader
        self._republished_for = 0  # the session's connect count last republished after
        self.broker_url = broker_url
        self.mqtt311 = mqtt311
        broker = parse_broker_url(broker_url)
        issued = ca.issue_client_cert(PLATFORM_IDENTITY)
        creds = DeviceCredentials(
            device_id=PLATFORM_IDENTITY,
            platform_url="http://127.0.0.1",
            broker_url=broker_url,
            ca_pem=ca.cert_pem,
            cert_pem=issued.cert_pem,
            key_pem=issued.key_pem,
        )
        pick = topics.shared_platform_filter if shared else topics.platform_filter
        self.session = MqttSession(
            client_id,
            broker.host,
            broker.port,
            ssl_context=creds.ssl_context() if broker.tls else None,
            subscriptions=[pick(k) for k in _KINDS],
            mqtt311=mqtt311,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.stored = 0
        self.duplicates = 0
        self.retries = 0  # messages tried again because the store was unavailable
        self.subscribed = False  # the first SUBACK came (what replica tests wait for)

    async def start(self) -> None:
        await self.session.start()
        self._tasks = [
            asyncio.create_task(self._consume(), name="mqtt intake"),
            asyncio.create_task(self._watch(), name="desired republisher"),
            asyncio.create_task(self._note_subscribed(), name="intake subscribed"),
        ]

    async def _note_subscribed(self) -> None:
        await self.session.wait_ready()
        self.subscribed = True

    async def close(self) -> None:
        await tasks.stop(*self._tasks)
        await self.session.close()

    def status(self) -> dict[str, object]:
        s = self.session.state
        return {
            "broker": self.broker_url,
            "client_id": self.session.client_id,
            "shared": self.shared,
            "connected": s.connected,
            "subscribed": self.subscribed,
            "last_error": s.last_error,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "retries": self.retries,
            "backpressure_waits": self.session.messages.waits,
        }

    # ---- inbound -----------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            msg = await self.session.messages.get()
            if await self._handle_retrying(msg):
                await msg.ack()

    async def _handle_retrying(self, msg: InboundMessage) -> bool:
        """Store one message; True once stored (or dropped on purpose), False to leave it
        unacknowledged. While the store is unavailable (PostgreSQL restarting, a full disk) the
        same message is tried again with a growing delay: every later message needs the same
        store, and an unacknowledged one would otherwise wait for the next MQTT reconnect
        (the broker redelivers only then). Ingest is idempotent, so a retry never doubles."""
        delay = RETRY_MIN_S
        while True:
            try:
                await self._handle(msg)
                return True
            except CloudSyncError as exc:
                if exc.category not in ("storage", "transport"):
                    log.exception("intake of %s failed", msg.topic)
                    return False
                log.warning("intake of %s failed (%s): again in %.1f s", msg.topic, exc, delay)
                self.retries += 1
            except Exception:
                # Not acknowledged: the broker redelivers after the next reconnect.
                log.exception("intake of %s failed", msg.topic)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _handle(self, msg: InboundMessage) -> None:
        if msg.scope != "device" or msg.target is None or msg.kind is None:
            return
        device = msg.target
        exists = await asyncio.to_thread(self.store.exists, device)
        if not exists:
            log.warning("message on %s from a device that is not enrolled: dropped", msg.topic)
            return
        if msg.kind == "presence":
            if msg.payload:
                text = msg.payload.decode("utf-8", "replace")
                await asyncio.to_thread(self.store.seen, device, via="mqtt", presence=text)
            return
        new = await asyncio.to_thread(
            self.store.ingest, device, msg.kind, msg.topic, msg.payload, key=msg.key, via="mqtt"
        )
        if new:
            self.stored += 1
        else:
            self.duplicates += 1

    # ---- outbound ----------------------------------------------------------------------

    async def publish_desired(self, device_id: str) -> bool:
        """Publish the device's stored desired document (retained); False if not sent now."""
        desired = await asyncio.to_thread(self.store.desired, device_id)
        doc = desired.document()
        if self.director is not None:
            doc = await asyncio.to_thread(self.director.for_device, device_id, doc)
        return await self._publish(
            topics.device_topic(device_id, "desired"), json.dumps(doc).encode()
        )

    async def publish_group(self, name: str) -> bool:
        desired = await asyncio.to_thread(self.store.group_desired, name)
        if desired is None:
            return False
        doc = desired.document()
        if self.director is not None:
            doc = await asyncio.to_thread(self.director.for_group, name, doc)
        return await self._publish(topics.group_topic(name), json.dumps(doc).encode())

    async def _publish(self, topic: str, payload: bytes) -> bool:
        try:
            await self.session.publish(topic, payload, retain=True)
        except MqttError as exc:
            log.info(
                "desired document for %s not published now (%s): sent on reconnect", topic, exc
            )
            return False
        return True

    async def take_over(self) -> None:
        """A new leader's term: republish everything at the watcher's next look."""
        self._republished_for = -1

    async def _watch(self) -> None:
        renew_at = time.monotonic() + RENEW_CHECK_S
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            state = self.session.state
            if state.connected and state.connects != self._republished_for and self.is_leader():
                self._republished_for = state.connects
                await self._republish()
            if state.connected and time.monotonic() >= renew_at and self.is_leader():
                renew_at = time.monotonic() + RENEW_CHECK_S
                await self.renew()

    async def renew(self) -> None:
        """Re-issue (and publish) the instructions past half their lifetime."""
        if self.director is None:
            return
        for kind, name in await asyncio.to_thread(self.director.due):
            try:
                if kind == "device":
                    await self.publish_desired(name)
                elif kind == "group":
                    await self.publish_group(name)
            except CloudSyncError as exc:  # a device removed since: nothing to renew
                log.warning("director: not renewing %s %s: %s", kind, name, exc.message)

    async def _republish(self) -> None:
        for device in await asyncio.to_thread(self.store.device_ids):
            desired = await asyncio.to_thread(self.store.desired, device)
            if desired.version > 0:
                await self.publish_desired(device)
        for name in await asyncio.to_thread(self.store.group_names):
            await self.publish_group(name)

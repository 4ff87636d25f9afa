"""The agent's link to the platform: desired config in, reported state and metrics out.

Flow (one `SyncClient`, built and started by the agent, which passes in callbacks so this
package never imports the agent):

    desired (MQTT retained, or HTTP poll in fallback) -> ConfigTracker.offer -> apply_config()
        -> state file saved -> PUBACK (MQTT) -> reported document into the outbox
    every metrics interval: metrics_snapshot() deltas + pool sizes + psutil -> outbox (durable)
    sender: outbox.lease -> current transport (MQTT QoS 1 | HTTP POST) -> ack / release

Transports (`MqttTransport`, `HttpTransport`, in `cloud_sync.transports`) share one small
interface (`send(records)`), and the sender picks one per round (`mode`):

* `mqtt` while the MQTT session is connected;
* `http` once the broker has been unreachable for `fallback_after_s` (default 30 s): records
  go to `POST /v1/devices/{id}/records` (deleted after 2xx) and desired state is polled from
  `GET /v1/devices/{id}/desired` every `http_poll_s`;
* `waiting` in between (records stay in the outbox).

A record counts as sent only when somebody got it: a PUBACK saying the topic has no subscriber
(MQTT 5 reason 0x10, a broker that restarted without the platform's session, before the
platform subscribed again) leaves it in the outbox, and the sender probes with one record per
round, backing off to `UNHEARD_MAX_S`, until the platform is subscribed again.

The session keeps reconnecting in the background all along, so the first successful CONNACK
switches back to `mqtt`. Records carry their outbox idempotency key on both paths (MQTT 5 user
property, HTTP body); the platform also dedupes on the payload digest, so a record whose
acknowledgement was lost on one path and resent on the other is stored once.

State that must survive a restart (`<data_dir>/sync-state.json`, written atomically before a
desired message is acknowledged): the tracker snapshot (versions seen/applied, effective
config), the latest desired documents, the report counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cloud_sync import topics
from cloud_sync.credentials import DeviceCredentials
from cloud_sync.credentials import load_credentials_extras as load_credentials_extras
from cloud_sync.device_figures import FunctionCounters as FunctionCounters
from cloud_sync.director_check import DirectorGate, InstructionRefused
from cloud_sync.errors import CloudSyncError, ConfigError
from cloud_sync.mqtt import MqttSession
from cloud_sync.outbox import Outbox, OutboxStats
from cloud_sync.rollout.messages import StatusReport
from cloud_sync.state import (
    AgentConfig,
    ConfigTracker,
    DesiredDoc,
    parse_desired,
    reported_document,
)
from cloud_sync.sync_metrics import MetricsCollector
from cloud_sync.sync_state_file import load_state, save_state

# The transports moved to their own module; these names stay importable from here.
from cloud_sync.transports import HttpError as HttpError
from cloud_sync.transports import HttpTransport as HttpTransport
from cloud_sync.transports import MqttTransport as MqttTransport
from cloud_sync.transports import SendResult as SendResult
from cloud_sync.transports import Transport as Transport
from runtimes import tasks

log = logging.getLogger("edgefn.sync")

# ---- timers (module level so tests and settings can shrink them) --------------------------------

# Broker unreachable this long -> HTTP fallback. Long enough to ride out a broker restart or a
# short cellular gap without doubling traffic, short enough that config still arrives.
FALLBACK_AFTER_S = 30.0
# In fallback: how often desired state is polled over HTTP.
HTTP_POLL_S = 10.0
# Metrics interval (the desired config's metrics.interval_s overrides it).
METRICS_INTERVAL_S = 10.0
# The sender's cadence when there is nothing to do or no transport; an append wakes it earlier.
TICK_S = 0.5
# Records per send round (MQTT publishes them concurrently; HTTP sends one POST).
SEND_BATCH = 64
# Retry pause after a failed round, so a refusing platform is not hammered.
RETRY_S = 1.0
# Connected, but the broker says nobody subscribes (the platform is not back after a broker
# restart): one record per round, the pause doubling from RETRY_S to this, so a fleet does not
# flood the broker while the record still goes soon after the platform subscribes again.
UNHEARD_MAX_S = 15.0

Mode = Literal["mqtt", "http", "waiting"]


@dataclass(frozen=True, slots=True)
class AgentHooks:
    """What the agent lends the sync client; all run on the loop and must be quick."""

    metrics_snapshot: Callable[[], Mapping[str, FunctionCounters]]
    pool_sizes: Callable[[], Mapping[str, int]]
    apply_config: Callable[[AgentConfig], Awaitable[None]]
    describe: Callable[[], Mapping[str, Any]]  # extra reported keys: functions, profile, ...
    # function -> version running: the metrics record's `versions` (rollout gates compare them)
    versions: Callable[[], Mapping[str, str]] | None = None
    # The platform said this device's secrets changed (cloud_sync.secrets_sync fetches them).
    secrets_changed: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class SyncSettings:
    data_dir: Path
    fallback_after_s: float = FALLBACK_AFTER_S
    http_poll_s: float = HTTP_POLL_S
    metrics_interval_s: float = METRICS_INTERVAL_S
    outbox_max_bytes: int = 16 * 1024 * 1024


class SyncClient:
    """Create with the device credentials; `await start()`, `await close()`."""

    def __init__(
        self,
        creds: DeviceCredentials,
        settings: SyncSettings,
        hooks: AgentHooks,
        *,
        platform_url: str,
        fallback_urls: tuple[str, ...] = (),
        token: str = "",
        groups: tuple[str, ...] = (),
        mqtt311: bool = False,
        director: DirectorGate | None = None,
    ) -> None:
        self.creds = creds
        self.director = director  # checks every desired document first (director_check)
        self.device_id = creds.device_id
        self.settings = settings
        self.hooks = hooks
        self.groups = groups
        self.session = MqttSession.for_device(creds, groups, mqtt311=mqtt311)
        self.mqtt = MqttTransport(self.session)
        https = platform_url.startswith("https:")
        self.http = HttpTransport(
            platform_url,
            creds.device_id,
            token,
            creds.ssl_context() if https else None,
            fallback_urls=fallback_urls,
        )
        self.outbox: Outbox | None = None
        self.tracker = ConfigTracker()
        self._device_doc: DesiredDoc | None = None
        self._group_doc: DesiredDoc | None = None
        self._group_name: str | None = groups[0] if groups else None
        self._seq = 0
        self._desired_error: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = MetricsCollector(
            creds.device_id,
            settings.data_dir,
            hooks.metrics_snapshot,
            hooks.pool_sizes,
            hooks.versions,
        )
        self._mode: Mode = "waiting"
        self._switches = 0
        self._last_described: str = ""
        self._state_file = settings.data_dir / "sync-state.json"
        self._stats: OutboxStats | None = None
        self._unheard = 0  # send rounds in a row that reached no subscriber

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.outbox = await Outbox.open(
            self.settings.data_dir / "outbox.db",
            max_bytes=self.settings.outbox_max_bytes,
            events_topic=topics.device_topic(self.device_id, "events"),
        )
        await asyncio.to_thread(self._load_state)
        if self.tracker.effective.raw:
            await self._apply(self.tracker.effective)
        await self._report()
        await self.session.start()
        await self.metrics.prime()  # the first interval starts now; primes cpu_percent
        self._tasks = [
            asyncio.create_task(self._inbound(), name="sync inbound"),
            asyncio.create_task(self._sender(), name="sync sender"),
            asyncio.create_task(self._metrics_loop(), name="sync metrics"),
            asyncio.create_task(self._http_poll(), name="sync http poll"),
        ]
        log.info(
            "sync: device %s, broker %s, platform %s (HTTP fallback after %g s)",
            self.device_id,
            self.creds.broker_url,
            self.http.base,
            self.settings.fallback_after_s,
        )

    async def close(self) -> None:
        await tasks.stop(*self._tasks)
        if self.outbox is not None:
            # Close the last metrics interval into the outbox: a graceful stop (an agent
            # restart while offline) must not lose the invocations since the last round.
            try:
                await self.collect_metrics()
            except CloudSyncError as exc:
                log.warning("sync: last metrics interval lost at shutdown: %s", exc.message)
        await self.session.close()
        await self.http.close()
        if self.outbox is not None:
            await self.outbox.close()

    @property
    def mode(self) -> Mode:
        state = self.session.state
        if state.connected:
            return "mqtt"
        down = state.since_disconnected or 0.0
        return "http" if down >= self.settings.fallback_after_s else "waiting"

    def status(self) -> dict[str, Any]:
        """For the agent's /v1/health: which path, why MQTT is down, the outbox (as of the
        last send or metrics round)."""
        s = self.session.state
        stats = self._stats
        return {
            "device": self.device_id,
            "transport": self.mode,
            "switches": self._switches,
            "mqtt": {
                "broker": self.creds.broker_url,
                "connected": s.connected,
                "since_disconnected_s": None
                if s.since_disconnected is None
                else round(s.since_disconnected, 1),
                "connects": s.connects,
                "last_error": s.last_error,
                "last_error_code": s.last_error_code,
                "no_subscriber_rounds": self._unheard,
            },
            "http": {
                "last_ok": self.http.last_ok,
                "last_error": self.http.last_error,
                "last_error_code": self.http.last_error_code,
            },
            "config": {
                "applied": self.tracker.applied_versions.to_dict(),
                "error": self.tracker.last_error.to_dict() if self.tracker.last_error else None,
                "desired_error": self._desired_error,
            },
            "director": self.director.status() if self.director else None,
            "outbox": {
                "records": stats.records,
                "bytes": stats.bytes,
                "max_bytes": stats.max_bytes,
                "dropped": stats.dropped,
                "merged": stats.merged,
            }
            if stats
            else None,
        }

    # ---- persistence -------------------------------------------------------------------

    def _load_state(self) -> None:
        """Blocking (runs in a thread); a damaged file is set aside (`sync_state_file`)."""
        if self.director is not None:
            self.director.load()
        saved = load_state(self._state_file)
        if saved is not None:
            self.tracker, self._seq = saved.tracker, saved.seq
            self._device_doc, self._group_doc = saved.device_doc, saved.group_doc

    def _save_state(self) -> None:
        save_state(self._state_file, self.tracker, self._seq, self._device_doc, self._group_doc)

    # ---- desired -----------------------------------------------------------------------

    async def _inbound(self) -> None:
        while True:
            msg = await self.session.messages.get()
            try:
                if msg.kind == "desired" and msg.payload:
                    if msg.scope == "group":
                        await self.offer("group", msg.payload, group=msg.target)
                    else:
                        await self.offer("device", msg.payload)
                elif msg.kind == "secrets" and self.hooks.secrets_changed is not None:
                    self.hooks.secrets_changed()
            except Exception:
                log.exception("sync: handling %s failed", msg.topic)
                continue  # not acknowledged: redelivered after a reconnect
            await msg.ack()

    async def offer(
        self, scope: Literal["device", "group"], payload: Any, *, group: str | None = None
    ) -> str:
        """One desired document from either transport; returns the outcome status."""
        async with self._lock:
            instruction = None
            try:
                if self.director is not None:
                    payload, instruction = self.director.screen(scope, payload, group=group)
                doc = parse_desired(payload, f"{scope} desired")
            except InstructionRefused as exc:
                # Forged, replayed, expired, for another device: the config in force stays.
                self._desired_error = exc.to_dict()
                log.warning("sync: %s", exc.message)
                await self._event({"type": "desired_rejected", "scope": scope, **exc.to_dict()})
                await self._report()
                return "refused"
            except ConfigError as exc:
                # Not JSON / bad envelope: nothing to version; keep the config, say why.
                self._desired_error = exc.to_dict()
                log.warning("sync: %s", exc.message)
                await self._event({"type": "desired_rejected", "scope": scope, **exc.to_dict()})
                await self._report()
                return "rejected"
            if doc is None:
                return "unchanged"
            if scope == "group":
                self._group_doc, self._group_name = doc, group
            else:
                self._device_doc = doc
            outcome = self.tracker.offer(self._group_doc, self._device_doc, group=self._group_name)
            if outcome.status == "applied":
                self._desired_error = None
                await self._apply(outcome.config)
                log.info("sync: applied desired config %s", outcome.versions.to_dict())
            elif outcome.status == "rejected" and outcome.error is not None:
                log.warning("sync: %s", outcome.error.message)
                await self._event({"type": "desired_rejected", **outcome.error.to_dict()})
            await asyncio.to_thread(self._save_state)
            if instruction is not None and self.director is not None:
                await asyncio.to_thread(self.director.commit, instruction)  # before the PUBACK
            if outcome.status in ("applied", "rejected"):
                await self._report()
            return outcome.status

    def expected_digest(self, function: str, version: str) -> str | None:
        """The bundle sha256 the accepted director instruction names for function@version
        (the deployer hands it to the TUF check); None when none names it."""
        return self.director.expected_digest(function, version) if self.director else None

    async def _apply(self, config: AgentConfig) -> None:
        try:
            await self.hooks.apply_config(config)
        except Exception:
            log.exception("sync: applying config failed")

    async def _http_poll(self) -> None:
        while True:
            await asyncio.sleep(min(TICK_S, self.settings.http_poll_s))
            if self.mode != "http":
                continue
            try:
                answer = await self.http.fetch_desired()
            except HttpError as exc:
                log.debug("sync: desired over HTTP failed: %s", exc.message)
            else:
                group = answer.get("group") if isinstance(answer, dict) else None
                if isinstance(group, dict) and group.get("name"):
                    doc = {k: v for k, v in group.items() if k != "name"}
                    await self.offer("group", doc, group=str(group["name"]))
                mine = answer.get("device") if isinstance(answer, dict) else None
                if mine is not None:
                    await self.offer("device", mine)
            await asyncio.sleep(self.settings.http_poll_s)

    # ---- reported, events, metrics -----------------------------------------------------

    async def _report(self) -> None:
        assert self.outbox is not None
        self._seq += 1
        extra = {
            **self.hooks.describe(),
            "sync": {"transport": self.mode, "desired_error": self._desired_error},
        }
        doc = reported_document(self.device_id, self._seq, self.tracker, extra=extra)
        self._last_described = json.dumps(self.hooks.describe(), sort_keys=True)
        await self.outbox.append(
            "reported",
            topics.device_topic(self.device_id, "reported"),
            json.dumps(doc).encode(),
            coalesce=True,
        )
        await asyncio.to_thread(self._save_state)

    async def report_rollout(self, report: StatusReport) -> None:
        """A deployer status report into the outbox (durable, resent, de-duplicated by its
        key); the reported document that follows repeats it (`describe`)."""
        assert self.outbox is not None
        await self.outbox.append(
            "rollout",
            topics.rollout_report_topic(self.device_id),
            report.to_json(),
            key=report.key,
        )
        await self._report()

    async def _event(self, event: Mapping[str, Any]) -> None:
        assert self.outbox is not None
        body = {"at": time.time(), **event}
        await self.outbox.append(
            "events", topics.device_topic(self.device_id, "events"), json.dumps(body).encode()
        )

    def _interval(self) -> float:
        configured = self.tracker.effective.metrics_interval_s
        return configured if configured is not None else self.settings.metrics_interval_s

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval())
            try:
                await self.collect_metrics()
                described = json.dumps(self.hooks.describe(), sort_keys=True)
                if described != self._last_described:
                    await self._report()
            except CloudSyncError as exc:
                log.warning("sync: metrics interval lost: %s", exc.message)

    async def collect_metrics(self) -> None:
        """Close the current interval: deltas since the last one, gauges, system figures."""
        assert self.outbox is not None
        self._stats = await self.metrics.collect(self.outbox)

    # ---- sending -----------------------------------------------------------------------

    async def run_sender(self, outbox: Outbox) -> None:
        """Only the sender loop, on `outbox`, without `start()`'s other tasks: the production
        sender that the outage tests drive against a real broker. Cancel it to stop."""
        self.outbox = outbox
        await self._sender()

    async def _sender(self) -> None:
        assert self.outbox is not None
        outbox = self.outbox
        last_mode: Mode = "waiting"
        last_transport: Mode | None = None
        while True:
            mode = self.mode
            if mode != last_mode:
                log.info("sync: transport %s -> %s", last_mode, mode)
                last_mode = mode
                if mode != "waiting":
                    if last_transport is not None and mode != last_transport:
                        self._switches += 1  # MQTT <-> HTTP, the failovers and returns
                    last_transport = mode
                    await self._report()  # the platform sees which path the device uses
            transport: Transport | None = None
            if mode == "mqtt":
                transport = self.mqtt
            elif mode == "http":
                transport = self.http
            if transport is None:
                await asyncio.sleep(TICK_S)
                continue
            outbox.clear_appended()
            records = await outbox.lease(1 if self._unheard else SEND_BATCH)
            if not records:
                await outbox.wait_for_records(TICK_S)
                continue
            try:
                result = await transport.send(records)
            except BaseException:
                with contextlib.suppress(Exception):
                    await outbox.release(r.id for r in records)
                raise
            await asyncio.shield(self._settle(result))
            # Nobody subscribed: the records stay (a PUBACK 0x10 is no delivery); probe with one.
            self._unheard = self._unheard + 1 if result.unheard and not result.acked else 0
            if self._unheard:
                await asyncio.sleep(min(UNHEARD_MAX_S, RETRY_S * 2 ** min(self._unheard - 1, 8)))
            elif result.failed:
                await asyncio.sleep(RETRY_S)

    async def _settle(self, result: SendResult) -> None:
        assert self.outbox is not None
        await self.outbox.ack(result.acked)
        await self.outbox.discard(result.refused)
        await self.outbox.release(result.failed)
        self._stats = await self.outbox.stats()

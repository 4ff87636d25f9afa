"""One simulated device of the fleet simulator (`cloud_sync/platform/simulator.py`), and the
simulator's settings.

A `SimDevice` is enrolled (its own certificate), holds its own MQTT session (`sim_mqtt.py`),
receives its desired documents, acts on the rollout entries in them by the agent's contract
(`cloud_sync.rollout.messages`), downloads the bundle from the registry for real, reports every
step with an increasing seq and sends metrics for the versions it runs, misbehaving where a
`--fault` says so. Kept apart from the fleet (enrolment, running, the summary) so each module
holds one concept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync import credentials, topics
from cloud_sync.director_check import director_gate
from cloud_sync.errors import CloudSyncError, MqttError
from cloud_sync.mqtt import USER_PROPERTY_KEY, USER_PROPERTY_KIND, InboundMessage
from cloud_sync.outbox import METRICS_SCHEMA, new_histogram, observe
from cloud_sync.platform.sim_faults import Fault, SimulatorError, check_loopback
from cloud_sync.platform.sim_mqtt import SimSession
from cloud_sync.registry_client import (
    DigestMismatch,
    NotPublished,
    RegistryClient,
    RegistryError,
)
from cloud_sync.rollout.messages import (
    DesiredDeployment,
    StatusReport,
    parse_deployments,
    reported_extra,
)
from cloud_sync.rollout.states import DeviceState
from cloud_sync.state import ConfigTracker, DesiredDoc, parse_desired, reported_document
from hardware.profile import DeviceProfile
from runtimes.manifest import semver_key

log = logging.getLogger("edgefn.simulator")

MAX_DEVICES = 10_000  # the benchmark's largest fleet
MAX_DURATION_S = 3600.0  # a simulation is a test or a benchmark, not a service
ENROL_CONCURRENCY = 16  # enrolment signs a certificate per device: do not flood the platform
CONNECT_CONCURRENCY = 64  # devices in the TCP + TLS handshake at once (the broker's backlog)
MAX_PENDING = 256  # reports kept per device while the broker is away (then the oldest go)
BASE_LATENCY_MS = 4.0
DOWNLOAD_CAP = 64 * 1024 * 1024  # a simulated device refuses bundles above this


@dataclass(frozen=True, slots=True)
class SimSettings:
    devices: int
    platform_url: str
    token: str
    broker_url: str | None = None  # None: the broker URL the platform wrote into credentials
    labels: Mapping[str, str] = field(default_factory=dict)
    prefix: str = "sim"
    duration_s: float = 60.0
    metrics_interval_s: float = 1.0
    calls_per_interval: int = 20
    health_window_s: float = 0.2
    arch: str = "x86_64"
    memory_mb: int = 2048
    faults: tuple[Fault, ...] = ()
    # Devices that connect per second at start (0: all at once). The platform takes two
    # messages from each (presence, reported document) through one subscription.
    connect_rate: float = 0.0
    workdir: Path | None = None  # downloads go here (deleted after each); None: a temp dir

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise SimulatorError(f"--devices must be between 1 and {MAX_DEVICES}")
        if self.connect_rate < 0:
            raise SimulatorError("--connect-rate must be 0 (no ramp) or more")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise SimulatorError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
        check_loopback(self.platform_url, "platform")
        if self.broker_url:
            check_loopback(self.broker_url, "broker")


@dataclass(slots=True)
class Counters:
    reports: int = 0
    downloads: int = 0
    metrics: int = 0
    publish_failures: int = 0


class SimDevice:
    """One simulated device: desired in, downloads, status reports and metrics out."""

    def __init__(
        self,
        settings: SimSettings,
        creds_doc: Mapping[str, Any],
        work: Path,
        gates: Mapping[bool, asyncio.Semaphore] | None = None,
    ) -> None:
        creds = credentials.from_dict(creds_doc)
        if settings.broker_url:
            creds = dataclasses.replace(creds, broker_url=settings.broker_url)
        self.settings = settings
        self.id = creds.device_id
        self.creds = creds
        self.groups = tuple(str(g) for g in creds_doc.get("groups") or ())
        self.mqtt311 = creds_doc.get("mqtt_protocol") == "3.1.1"
        self.work = work / self.id
        key = creds_doc.get("director_key")
        self.director = director_gate(self.id, key if isinstance(key, str) else "", self.work,
                                      required=False, groups=self.groups)  # fmt: skip
        self.active: dict[str, str] = {}
        self.installed: dict[str, set[str]] = {}
        self.bad: dict[str, str] = {}  # function -> version that failed here: not retried
        self.latest: dict[str, StatusReport] = {}
        self.seq = 0
        self.tracker = ConfigTracker()
        self.docs: dict[str, DesiredDoc | None] = {"device": None, "group": None}
        self.pending: list[tuple[str, bytes, str, str]] = []
        self.counters = Counters()
        self.profile = DeviceProfile(
            arch=settings.arch, libc="glibc", libc_version="2.36", cpu_count=2, cpu_model="sim",
            memory_total_mb=settings.memory_mb, memory_available_mb=settings.memory_mb // 2,
            disk_total_mb=16_000, disk_free_mb=8_000, data_dir=str(self.work),
            board_vendor="edgefn", board_model="simulated", kernel="sim", hostname=self.id,
            labels=settings.labels,
        )  # fmt: skip
        self._offline_for = 0.0
        self._offline_done: set[str] = set()  # versions whose outage already happened
        self._flush_lock = asyncio.Lock()
        self._gate = (gates or {}).get(self.mqtt311)  # handshakes at once, per protocol
        self._ssl: ssl.SSLContext | None = None  # made once: it writes the key to a temp file
        self._session: SimSession | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._deploy: asyncio.Task[None] | None = None
        self._wanted: dict[str, DesiredDeployment] = {}

    def fault(self, kind: str, version: str | None) -> Fault | None:
        return next(
            (f for f in self.settings.faults if f.kind == kind and f.hits(self.id, version)), None
        )

    # ---- run ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, delay_s: float = 0.0) -> None:
        """Connect (after `delay_s`: the fleet's ramp) and serve until `stop`."""
        await _sleep_or(stop, delay_s)
        offline = self.fault("offline", None)
        if offline is not None and offline.version == "*":
            await _sleep_or(stop, offline.value)
        if self.creds.broker.tls and self._ssl is None:
            self._ssl = await asyncio.to_thread(self.creds.ssl_context)
        while not stop.is_set():
            session = SimSession.for_device(
                self.creds, self.groups, ssl_context=self._ssl, mqtt311=self.mqtt311,
                gate=self._gate, on_connected=self._connected,
            )  # fmt: skip
            self._session = session
            await session.start()
            try:
                await self._publish_reported()
                if self._wanted:  # back from an outage: act on the desired we already have
                    self._deploy = asyncio.create_task(self._converge())
                went_offline = await self._serve(session, stop)
            finally:
                self._session = None
                if self._deploy is not None:
                    self._deploy.cancel()
                    await asyncio.gather(self._deploy, return_exceptions=True)
                    self._deploy = None
                await session.close()
            if went_offline:
                await _sleep_or(stop, went_offline)

    def _connected(self) -> None:
        # What was queued while the link was down (the first reported document: the profile)
        # goes out now, not at the next message or metrics interval.
        if self.pending:
            self._flusher = asyncio.create_task(self._flush())

    async def _serve(self, session: SimSession, stop: asyncio.Event) -> float:
        """Handle messages and metrics until stopped; returns seconds to stay offline (0)."""
        self._offline_for = 0.0
        next_metrics = time.monotonic() + self.settings.metrics_interval_s
        window_start = time.time()
        while not stop.is_set() and not self._offline_for:
            timeout = max(0.01, next_metrics - time.monotonic())
            try:
                async with asyncio.timeout(timeout):
                    msg = await session.messages.get()
            except TimeoutError:
                msg = None
            if msg is not None:
                if self._for_me(msg):
                    await self._on_message(msg.scope, msg.payload)
                await msg.ack()
            if time.monotonic() >= next_metrics:
                now = time.time()
                await self._send_metrics(window_start, now)
                window_start = now
                next_metrics = time.monotonic() + self.settings.metrics_interval_s
            await self._flush()
        return self._offline_for

    def _for_me(self, msg: InboundMessage) -> bool:
        """Our own desired documents only: a broker may hand us other retained messages too
        (the embedded amqtt broker sends a connecting client every subscribed retained topic)."""
        if msg.kind != "desired":
            return False
        return msg.target == self.id if msg.scope == "device" else msg.target in self.groups

    async def _on_message(self, scope: str | None, payload: bytes) -> None:
        try:
            # Checked like a real device checks it (director_check), counters kept in memory.
            value, instruction = self.director.screen(
                scope or "", payload, group=self.groups[0] if self.groups else None
            )
            doc = parse_desired(value)
            if instruction is not None:
                self.director.remember(instruction)
        except CloudSyncError as exc:
            log.warning("%s: bad desired document: %s", self.id, exc)
            return
        if doc is None or scope not in ("device", "group"):
            return
        self.docs[scope] = doc
        outcome = self.tracker.offer(
            self.docs["group"], self.docs["device"], self.groups[0] if self.groups else None
        )
        if outcome.status != "applied":
            return
        try:
            self._wanted = parse_deployments(outcome.config.raw)
        except CloudSyncError as exc:
            log.warning("%s: bad rollout entries: %s", self.id, exc)
            return
        # Newest desired wins: a step still running is canceled before the next starts.
        if self._deploy is not None:
            self._deploy.cancel()
            await asyncio.gather(self._deploy, return_exceptions=True)
        self._deploy = asyncio.create_task(self._converge())

    # ---- deployments ------------------------------------------------------------------------

    async def _converge(self) -> None:
        for name, want in sorted(self._wanted.items()):
            await self._deploy_one(name, want)
        await self._publish_reported()

    async def _deploy_one(self, name: str, want: DesiredDeployment) -> None:
        current = self.active.get(name)
        version = want.version
        if want.remove:
            if current is not None:
                self.active.pop(name)
                await self._report(want, DeviceState.ROLLED_BACK, None, previous=current)
            return
        if version is None or version == current:
            return
        if self.bad.get(name) == version and not want.rollback:
            return  # failed here before: no install loop against a desired that names it
        if current and semver_key(version) < semver_key(current) and not want.rollback:
            await self._report(want, DeviceState.REJECTED, "downgrade_refused", previous=current)
            return
        started = time.time()
        if version not in self.installed.get(name, set()):
            offline = self.fault("offline", version)
            if offline is not None and not want.rollback and version not in self._offline_done:
                self._offline_done.add(version)
                self._offline_for = offline.value
                return  # the desired document is retained: it is acted on after the outage
            await self._report(want, DeviceState.DOWNLOADING, None, current, started)
            if self.fault("drop", version) is not None and not want.rollback:
                return  # gone silent mid-install: only the platform's timeout ends this
            code = await self._download(name, version)
            if code is not None:
                state = DeviceState.FAILED if code == "download_failed" else DeviceState.REJECTED
                await self._report(want, state, code, current, started)
                return
            self.installed.setdefault(name, set()).add(version)
            await self._report(want, DeviceState.INSTALLING, None, current, started)
            await self._report(want, DeviceState.WARMING, None, current, started)
        self.active[name] = version
        if want.rollback:
            await self._report(want, DeviceState.ROLLED_BACK, None, current, started)
            return
        await self._report(want, DeviceState.ACTIVE, None, current, started)
        await asyncio.sleep(self.settings.health_window_s)
        if self.fault("crash", version) is not None:
            # The health window saw a crash loop: back to the previous version, by itself.
            if current is None:
                self.active.pop(name, None)
            else:
                self.active[name] = current
            self.bad[name] = version
            await self._report(want, DeviceState.FAILED, "crash_loop", current, started)
            return
        await self._report(want, DeviceState.HEALTHY, None, current, started)

    async def _download(self, name: str, version: str) -> str | None:
        """A real download from the registry; None, or the stable code of the failure."""
        client = RegistryClient(self.settings.platform_url)
        part = self.work / f"{name}-{version}.part"
        try:
            info = await asyncio.to_thread(client.resolve, name, version)
            await asyncio.to_thread(self.work.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(client.download, info, part, max_bytes=DOWNLOAD_CAP)
        except NotPublished:
            return "not_found"
        except DigestMismatch:
            return "digest_mismatch"
        except RegistryError as exc:
            log.info("%s: download of %s@%s failed: %s", self.id, name, version, exc)
            return "download_failed"
        finally:
            await asyncio.to_thread(part.unlink, missing_ok=True)
        self.counters.downloads += 1
        return None

    # ---- outbound ---------------------------------------------------------------------------

    async def _report(
        self,
        want: DesiredDeployment,
        state: DeviceState,
        code: str | None,
        previous: str | None = None,
        started: float | None = None,
    ) -> None:
        self.seq += 1
        report = StatusReport(
            device=self.id, function=want.function, rollout=want.rollout,
            version=want.version, state=state, seq=self.seq, at=time.time(), code=code,
            started_at=started, rollback=want.rollback, previous=previous,
        )  # fmt: skip
        self.latest[want.function] = report
        self.counters.reports += 1
        self._queue(topics.rollout_report_topic(self.id), report.to_json(), report.key, "rollout")
        await self._flush()

    async def _publish_reported(self) -> None:
        self.seq += 1
        extra = {
            "functions": dict(sorted(self.active.items())),
            "profile": self.profile.to_dict(),
            **reported_extra(self.latest),
        }
        doc = reported_document(self.id, self.seq, self.tracker, extra=extra)
        key = f"reported-{self.id}-{self.seq}"
        self._queue(topics.device_topic(self.id, "reported"), json.dumps(doc).encode(), key,
                    "reported")  # fmt: skip
        await self._flush()

    async def _send_metrics(self, start: float, end: float) -> None:
        if not self.active:
            return
        functions: dict[str, Any] = {}
        calls = self.settings.calls_per_interval
        for name, version in sorted(self.active.items()):
            errors = self.fault("errors", version)
            slow = self.fault("latency", version)
            hist = new_histogram()
            for i in range(calls):
                observe(hist, BASE_LATENCY_MS + (slow.value if slow else 0.0) + (i % 5))
            functions[name] = {
                "invocations": calls,
                "errors": round(calls * errors.value) if errors else 0,
                "latency_ms": hist,
            }
        record = {
            "schema": METRICS_SCHEMA, "device": self.id, "interval_start": start,
            "interval_end": max(start, end), "samples": 1, "functions": functions,
            # Which version produced these counts: the per-version split the gates need.
            "versions": dict(sorted(self.active.items())),
        }  # fmt: skip
        self.seq += 1
        self.counters.metrics += 1
        key = f"metrics-{self.id}-{self.seq}"
        self._queue(topics.device_topic(self.id, "metrics"), json.dumps(record).encode(), key,
                    "metrics")  # fmt: skip

    def _queue(self, topic: str, payload: bytes, key: str, kind: str) -> None:
        self.pending.append((topic, payload, key, kind))
        del self.pending[:-MAX_PENDING]

    async def _flush(self) -> None:
        # One sender at a time (the message loop and a deployment both flush): in order, once.
        async with self._flush_lock:
            session = self._session
            while self.pending and session is not None and session.connected:
                topic, payload, key, kind = self.pending[0]
                props = [(USER_PROPERTY_KEY, key), (USER_PROPERTY_KIND, kind)]
                try:
                    await session.publish(
                        topic, payload, user_properties=props, require_subscriber=True
                    )
                except MqttError:  # NoSubscriber too: nobody got it (the agent keeps it as well)
                    self.counters.publish_failures += 1
                    return  # kept: sent again at the next flush or (re)connect
                self.pending.pop(0)


async def _sleep_or(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()

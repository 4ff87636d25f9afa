"""A fleet simulator: N lightweight devices in one process, against a real platform and broker.

`edge-cloud simulate --devices N --platform URL [--broker URL] [--labels k=v] [--fault ...]`

Each simulated device is enrolled through the platform's API (its own certificate and token),
holds its own MQTT session (`cloud_sync.mqtt.MqttSession`, the agent's), receives its desired
documents (device and group, retained), and acts on the rollout entries in them through the
same contract the agent's deployer will follow (`cloud_sync.rollout.messages`): it downloads the
bundle from the registry for real (`RegistryClient`, digest checked, then deleted), reports
every step with an increasing `seq`, keeps its latest report per function in its reported
document, and sends an `edgefn.metrics/1` record per interval for the versions it runs.

Misbehaviour on purpose, per version and per fraction of devices (`--fault`):

    VERSION:crash[@F]          the version crashes after install: `failed` / `crash_loop`,
                               the previous version comes back, the version is not retried
    VERSION:errors=R[@F]       answers errors at rate R (0..1) without crashing
    VERSION:latency=MS[@F]     adds MS milliseconds to every call
    VERSION:offline=S[@F]      goes offline for S seconds when told to install the version
    VERSION:drop[@F]           stops mid-install (reports `downloading`, then nothing)

`VERSION` may be `*` (any version; `offline` then also applies at start). `F` is the fraction
of devices (default 1); which devices is decided by a stable hash of (fault, device id), so a
run is repeatable.

Bounds: at most `MAX_DEVICES` devices and `MAX_DURATION_S` seconds; the platform and broker
must be on loopback, so a simulated fleet can never reach a real deployment by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cloud_sync import credentials, topics
from cloud_sync.director_check import director_gate
from cloud_sync.errors import CloudSyncError, MqttError
from cloud_sync.mqtt import USER_PROPERTY_KEY, USER_PROPERTY_KIND, MqttSession
from cloud_sync.outbox import METRICS_SCHEMA, new_histogram, observe
from cloud_sync.platform.sim_faults import Fault, SimulatorError, check_loopback, parse_fault
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

__all__ = ["Fault", "SimSettings", "Simulator", "SimulatorError", "Summary", "parse_fault"]

log = logging.getLogger("edgefn.simulator")

MAX_DEVICES = 10_000  # the benchmark's largest fleet
MAX_DURATION_S = 3600.0  # a simulation is a test or a benchmark, not a service
ENROL_CONCURRENCY = 16  # enrolment signs a certificate per device: do not flood the platform
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
    workdir: Path | None = None  # downloads go here (deleted after each); None: a temp dir

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise SimulatorError(f"--devices must be between 1 and {MAX_DEVICES}")
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

    def __init__(self, settings: SimSettings, creds_doc: Mapping[str, Any], work: Path) -> None:
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
        self._session: MqttSession | None = None
        self._deploy: asyncio.Task[None] | None = None
        self._wanted: dict[str, DesiredDeployment] = {}

    def fault(self, kind: str, version: str | None) -> Fault | None:
        return next(
            (f for f in self.settings.faults if f.kind == kind and f.hits(self.id, version)), None
        )

    # ---- run ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        offline = self.fault("offline", None)
        if offline is not None and offline.version == "*":
            await _sleep_or(stop, offline.value)
        while not stop.is_set():
            session = MqttSession.for_device(self.creds, self.groups, mqtt311=self.mqtt311)
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

    async def _serve(self, session: MqttSession, stop: asyncio.Event) -> float:
        """Handle messages and metrics until stopped; returns seconds to stay offline (0)."""
        self._offline_for = 0.0
        next_metrics = time.monotonic() + self.settings.metrics_interval_s
        window_start = time.time()
        while not stop.is_set() and not self._offline_for:
            timeout = max(0.01, next_metrics - time.monotonic())
            try:
                msg = await asyncio.wait_for(session.messages.get(), timeout)
            except TimeoutError:
                msg = None
            if msg is not None:
                await self._on_message(msg.scope, msg.payload)
                await msg.ack()
            if time.monotonic() >= next_metrics:
                now = time.time()
                await self._send_metrics(window_start, now)
                window_start = now
                next_metrics = time.monotonic() + self.settings.metrics_interval_s
            await self._flush()
        return self._offline_for

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
                    await session.publish(topic, payload, user_properties=props)
                except MqttError:
                    self.counters.publish_failures += 1
                    return  # kept: sent again after the next (re)connect
                self.pending.pop(0)


async def _sleep_or(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@dataclass(slots=True)
class Summary:
    devices: int
    seconds: float
    reports: int
    downloads: int
    metrics: int
    publish_failures: int
    active: dict[str, dict[str, str]]  # device -> function -> version

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Simulator:
    """Enrol `settings.devices` devices, run them until the duration ends or `stop()`."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.devices: list[SimDevice] = []
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def enrol(self, work: Path) -> None:
        s = self.settings
        headers = {"Authorization": f"Bearer {s.token}"}
        gate = asyncio.Semaphore(ENROL_CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=60)

        async def one(http: aiohttp.ClientSession, index: int) -> SimDevice:
            body = {"id": f"{s.prefix}-{index:05d}", "labels": dict(s.labels)}
            async with gate, http.post("/v1/devices", json=body, headers=headers) as resp:
                doc = await resp.json(content_type=None)
                if resp.status != 201:
                    raise SimulatorError(f"enrolling {body['id']}: HTTP {resp.status} {doc}")
            return SimDevice(s, doc, work)

        async with aiohttp.ClientSession(s.platform_url, timeout=timeout) as http:
            self.devices = list(await asyncio.gather(*(one(http, i) for i in range(s.devices))))

    async def run(self) -> Summary:
        started = time.monotonic()
        own = self.settings.workdir is None
        work = Path(tempfile.mkdtemp(prefix="edgefn-sim-")) if own else self.settings.workdir
        assert work is not None
        try:
            if not self.devices:
                await self.enrol(work)
            tasks = [asyncio.create_task(d.run(self._stop)) for d in self.devices]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.duration_s)
            self._stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for device, result in zip(self.devices, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("simulated device %s failed: %r", device.id, result)
        finally:
            if own:
                await asyncio.to_thread(shutil.rmtree, work, True)
        counters = [d.counters for d in self.devices]
        return Summary(
            devices=len(self.devices),
            seconds=round(time.monotonic() - started, 3),
            reports=sum(c.reports for c in counters),
            downloads=sum(c.downloads for c in counters),
            metrics=sum(c.metrics for c in counters),
            publish_failures=sum(c.publish_failures for c in counters),
            active={d.id: dict(d.active) for d in self.devices},
        )

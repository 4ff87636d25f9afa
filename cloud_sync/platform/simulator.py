"""A fleet simulator: N lightweight devices in one process, against a real platform and broker.

`edge-cloud simulate --devices N --platform URL [--broker URL] [--labels k=v] [--connect-rate R]
[--fault ...]`

Each simulated device is enrolled through the platform's API (its own certificate and token),
holds its own MQTT session (`sim_mqtt.SimSession`: all devices share one asyncio loop, no thread
per device; `sim_device.SimDevice` is one device), receives its desired documents (device and
group, retained), and acts on the rollout entries in them through the
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
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from cloud_sync.platform.sim_device import (
    CONNECT_CONCURRENCY,
    ENROL_CONCURRENCY,
    MAX_DEVICES,
    MAX_DURATION_S,
    SimDevice,
    SimSettings,
)
from cloud_sync.platform.sim_faults import Fault, SimulatorError, parse_fault
from cloud_sync.platform.sim_mqtt import raise_fd_limit

__all__ = [
    "MAX_DEVICES",
    "MAX_DURATION_S",
    "Fault",
    "SimDevice",
    "SimSettings",
    "Simulator",
    "SimulatorError",
    "Summary",
    "parse_fault",
]

log = logging.getLogger("edgefn.simulator")


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
        # Devices in the handshake at once; the embedded broker (MQTT 3.1.1): one at a time.
        self._gates = {False: asyncio.Semaphore(CONNECT_CONCURRENCY), True: asyncio.Semaphore(1)}

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
            return SimDevice(s, doc, work, self._gates)

        async with aiohttp.ClientSession(s.platform_url, timeout=timeout) as http:
            self.devices = list(await asyncio.gather(*(one(http, i) for i in range(s.devices))))

    async def run(self) -> Summary:
        started = time.monotonic()
        own = self.settings.workdir is None
        work = Path(tempfile.mkdtemp(prefix="edgefn-sim-")) if own else self.settings.workdir
        assert work is not None
        try:
            raise_fd_limit(self.settings.devices + 256)  # a socket per device, and some
            if not self.devices:
                await self.enrol(work)
            rate = self.settings.connect_rate
            tasks = [
                asyncio.create_task(d.run(self._stop, i / rate if rate else 0.0))
                for i, d in enumerate(self.devices)
            ]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.duration_s):
                    await self._stop.wait()
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

"""The simulator's scale path: 1,000 simulated devices, one short rollout, through the real
platform and a real Mosquitto (TLS, a client certificate and an MQTT session per device).

What it proves: the devices share the test's one event loop (no thread per device: the
process's thread count stays small while all 1,000 sessions are up), every device comes online
with its own identity, and a 4-wave rollout reaches `succeeded` with every device healthy on the
new version in the platform's view and in the simulator's own. Bounded: every wait has a limit;
no timing is asserted (bench/rollout.py measures).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.platform.simulator import SimSettings, Simulator
from tests.mosquitto import Broker, eventually
from tests.registry_helpers import Platform, publish, start_platform
from tests.rollout_fleet import FN, api, make_bundles, wait_state

DEVICES = 1000


@pytest.fixture
def fleet_platform(tmp_path: Path) -> Iterator[Platform]:
    broker = Broker(tmp_path / "mq")  # edgefn's config: its queue holds the fleet's bursts
    broker.start()
    try:
        plat = start_platform(broker.workdir / "platform", "--broker", broker.url)
        try:
            yield plat
        finally:
            plat.stop()
    finally:
        broker.stop()


@pytest.mark.slow
async def test_a_thousand_simulated_devices_take_a_four_wave_rollout(
    fleet_platform: Platform, tmp_path: Path
) -> None:
    plat = fleet_platform
    for bundle in make_bundles(tmp_path / "src", ["0.1.0"]).values():
        publish(plat, bundle)
    settings = SimSettings(
        devices=DEVICES, platform_url=plat.url, token=plat.token, labels={"group": "scale"},
        prefix="k", duration_s=900, metrics_interval_s=30, health_window_s=0.1,
        workdir=tmp_path / "sim", connect_rate=100,  # ramped as the bench ramps
    )  # fmt: skip
    sim = Simulator(settings)
    await sim.enrol(tmp_path / "sim")
    ids = {d.id for d in sim.devices}
    assert len(ids) == DEVICES
    threads_before = threading.active_count()
    run = asyncio.create_task(sim.run())
    try:

        async def online() -> bool:
            await asyncio.sleep(2)  # the whole fleet's view per poll: not every few ms
            view = await asyncio.to_thread(api, plat, "GET", "/v1/devices")
            up = [d for d in view["devices"] if d["id"] in ids and d["online"] and d.get("profile")]
            return len(up) == DEVICES

        await eventually(online, 300, f"all {DEVICES} simulated devices online")
        # One event loop for the whole fleet: a few threads for downloads, none per device.
        assert threading.active_count() < threads_before + 40
        spec = {
            "function": FN, "version": "0.1.0", "target": "group=scale",
            "waves": [1, 10, 50, 100], "bake_s": 0, "interval_s": 0.1, "min_invocations": 0,
            "rate_per_minute": 1_000_000, "device_timeout_s": 600,
            # The platform's MQTT intake drops messages when a burst overfills its inbound
            # queue: a cap on devices installing at once bounds the burst (docs/BENCHMARKS.md).
            "max_concurrent_downloads": 100,
        }  # fmt: skip
        rid = (await asyncio.to_thread(api, plat, "POST", "/v1/rollouts", spec))["id"]
        ended = {"succeeded", "rolled_back", "rollback_failed", "aborted"}
        done = await wait_state(plat, rid, ended, 400)
        assert done["state"] == "succeeded", done["reason"]
        assert len(done["devices"]) == DEVICES

        async def all_healthy() -> bool:
            await asyncio.sleep(1)
            doc = await asyncio.to_thread(api, plat, "GET", f"/v1/rollouts/{rid}")
            counts = collections.Counter(d["state"] for d in doc["devices"])
            return counts == {"healthy": DEVICES}

        await eventually(all_healthy, 120, "every device healthy in the platform's view")
        waves = collections.Counter(d["wave"] for d in done["devices"])
        assert sorted(waves) == [0, 1, 2, 3] and sum(waves.values()) == DEVICES
    finally:
        sim.stop()
        summary = await asyncio.wait_for(run, 120)
    assert summary.devices == DEVICES
    assert {tuple(a.items()) for a in summary.active.values()} == {((FN, "0.1.0"),)}
    assert summary.downloads == DEVICES

"""The rollout controller across outages: the platform restarted mid-rollout (its state survives
and it continues), the broker restarted mid-rollout, a device offline for the whole rollout,
and a device that joins the target after the rollout ended. Real platform, real Mosquitto,
simulated fleet; every wait bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloud_sync.platform.sim_faults import parse_fault
from tests.mosquitto import Broker, eventually, free_port
from tests.registry_helpers import Platform, publish, start_platform
from tests.rollout_fleet import (
    ENDED,
    FN,
    desired_version,
    fleet,
    make_bundles,
    start,
    status,
    wait_state,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    return make_bundles(tmp_path / "src", ["0.1.0", "0.2.0"])


def serve(mosquitto: Broker, port: int) -> Platform:
    # A fixed port: the simulated devices download from the URL they were given at enrolment.
    return start_platform(
        mosquitto.workdir / "platform", "--broker", mosquitto.url, "--port", str(port)
    )


async def test_a_platform_restarted_mid_rollout_continues_where_it_was(
    mosquitto: Broker, bundles: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()
    plat = serve(mosquitto, port)
    try:
        for b in bundles.values():
            publish(plat, b)
        async with fleet(plat, tmp_path / "sim", 4):
            rid = start(plat, f"{FN}@0.1.0", "--target", "group=sim", "--waves", "50,100",
                        "--bake", "5", "--interval", "0.2", "--min-invocations", "0")  # fmt: skip

            async def first_wave_healthy() -> bool:
                await asyncio.sleep(0.2)
                view = await status(plat, rid)
                return view["waves"][0]["states"] == {"healthy": 2}

            await eventually(first_wave_healthy, 60, "wave 1 healthy, baking")
            before = await status(plat, rid)
            assert before["state"] == "running" and before["wave"] == 0
            assert plat.stop() == 0
            plat = serve(mosquitto, port)
            after = await status(plat, rid)  # read back from the store
            healthy = {d["device"] for d in before["devices"] if d["state"] == "healthy"}
            assert len(healthy) == 2 and after["state"] in ("running", "succeeded")
            assert {d["device"] for d in after["devices"] if d["state"] == "healthy"} >= healthy
            view = await wait_state(plat, rid, ENDED)
            assert view["state"] == "succeeded", view
            assert {d["state"] for d in view["devices"]} == {"healthy"}
    finally:
        plat.stop()


async def test_a_broker_restarted_mid_rollout_does_not_stop_it(
    mosquitto: Broker, bundles: dict[str, Path], tmp_path: Path
) -> None:
    plat = serve(mosquitto, free_port())
    try:
        for b in bundles.values():
            publish(plat, b)
        async with fleet(plat, tmp_path / "sim", 4):
            rid = start(plat, f"{FN}@0.1.0", "--target", "group=sim", "--waves", "50,100",
                        "--bake", "2", "--interval", "0.2", "--min-invocations", "0")  # fmt: skip
            await asyncio.sleep(0.5)
            # Without persistence the broker forgets the retained desired documents too: the
            # platform republishes them when its session is back.
            await asyncio.to_thread(mosquitto.restart)
            view = await wait_state(plat, rid, ENDED, within_s=120)
            assert view["state"] == "succeeded", view
            for d in view["devices"]:
                assert (d["state"], d["version"]) == ("healthy", "0.1.0")
    finally:
        plat.stop()


async def test_an_offline_device_gets_the_current_version_and_a_joiner_the_last_succeeded(
    mosquitto: Broker, bundles: dict[str, Path], tmp_path: Path
) -> None:
    plat = serve(mosquitto, free_port())
    try:
        for b in bundles.values():
            publish(plat, b)
        away = parse_fault("*:offline=25")  # offline from its start for 25 s, then back
        fast = ["--waves", "100", "--bake", "0.2", "--interval", "0.2", "--min-invocations", "0",
                "--device-timeout", "3", "--gate", "install_success>=0.5"]  # fmt: skip
        async with (
            fleet(plat, tmp_path / "sim", 4),
            fleet(plat, tmp_path / "away", 1, prefix="away", faults=[away], wait_online=False)
            as gone,
        ):  # fmt: skip
            device = gone.devices[0]
            for version in ("0.1.0", "0.2.0"):
                rid = start(plat, f"{FN}@{version}", "--target", "group=sim", *fast)
                view = await wait_state(plat, rid, ENDED)
                assert view["state"] == "succeeded", view
                mine = next(d for d in view["devices"] if d["device"] == device.id)
                assert mine["state"] == "timed_out"

            async def back_on_current() -> bool:
                await asyncio.sleep(0.2)
                return device.active.get(FN) == "0.2.0"

            await eventually(back_on_current, 60, "the returning device runs 0.2.0")
            assert device.installed.get(FN) == {"0.2.0"}  # never a step of the older rollout

            async def late_report_counted() -> bool:
                await asyncio.sleep(0.2)
                view = await status(plat, rid)
                mine = next(d for d in view["devices"] if d["device"] == device.id)
                return bool(mine["state"] == "healthy" and view["state"] == "succeeded")

            await eventually(late_report_counted, 30, "the late report updates the record")

            async with fleet(plat, tmp_path / "late", 1, prefix="late") as late:
                joiner = late.devices[0]

                async def joined() -> bool:
                    await asyncio.sleep(0.2)
                    return joiner.active.get(FN) == "0.2.0"

                await eventually(joined, 60, "a device enrolled later gets 0.2.0")
                assert await desired_version(plat, joiner.id) == "0.2.0"
    finally:
        plat.stop()

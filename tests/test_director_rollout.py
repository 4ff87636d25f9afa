"""A real rollout through the platform's controller with signed instructions: the real platform
with a real Mosquitto and a simulated fleet whose devices check every desired document with the
director key from their enrolment (`SimDevice` runs `cloud_sync.director_check`), so a rollout
that completes is one whose every instruction verified. Fixtures: tests/rollout_fleet.py."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.platform.sim_faults import parse_fault
from tests.mosquitto import Broker, eventually
from tests.registry_helpers import Platform, publish, start_platform
from tests.rollout_fleet import ENDED, FN, fleet, make_bundles, start, wait_state

pytestmark = pytest.mark.slow
FAST = ["--bake", "0.3", "--interval", "0.2", "--device-timeout", "30"]


@pytest.fixture
def platform(mosquitto: Broker) -> Iterator[Platform]:
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url)
    try:
        yield plat
    finally:
        plat.stop()


async def test_a_rollout_and_its_rollback_complete_with_signed_instructions(
    platform: Platform, tmp_path: Path
) -> None:
    bundles = make_bundles(tmp_path / "src", ["0.1.0", "0.2.0"])
    for b in bundles.values():
        publish(platform, b)
    digest = {v: hashlib.sha256(p.read_bytes()).hexdigest() for v, p in bundles.items()}
    crash = parse_fault("0.2.0:crash@0.5")
    async with fleet(platform, tmp_path / "sim", 4, faults=[crash]) as sim:
        assert all(d.director.enforcing for d in sim.devices)  # enrolment carried the key
        rid = start(platform, f"{FN}@0.1.0", "--target", "group=sim", "--waves", "50,100",
                    *FAST, "--min-invocations", "0")  # fmt: skip
        view = await wait_state(platform, rid, ENDED)
        assert view["state"] == "succeeded", view
        for d in sim.devices:
            assert d.active.get(FN) == "0.1.0"
            # The instruction named the very bundle the registry holds (the TUF check's input).
            assert d.director.expected_digest(FN, "0.1.0") == digest["0.1.0"]
        first = {d.id: d.director.accepted["device"]["counter"] for d in sim.devices}
        # A version that crashes on some devices: the controller's explicit rollback
        # instructions are signed too, and every device obeys them.
        rid = start(platform, f"{FN}@0.2.0", "--target", "group=sim", "--waves", "50,100",
                    *FAST)  # fmt: skip
        view = await wait_state(platform, rid, ENDED)
        assert view["state"] == "rolled_back", view

        async def all_back() -> bool:
            return all(d.active.get(FN) == "0.1.0" for d in sim.devices)

        await eventually(all_back, 30, "every simulated device runs 0.1.0 again")
        # Wave 1 got 0.2.0 and then the rollback: two newer instructions each.
        moved = [d for d in sim.devices if d.director.accepted["device"]["counter"] > first[d.id]]
        assert moved, "no device received a signed instruction for 0.2.0 and its rollback"
        for d in sim.devices:
            assert d.director.expected_digest(FN, "0.1.0") == digest["0.1.0"]

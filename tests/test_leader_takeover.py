"""A new leader's first step: repair what the dead leader stored but did not carry out.

The controller stores each decision before acting on it. A leader killed between the two leaves
devices the stored rollout calls `notified` whose desired document does not name the rollout;
`RolloutController.repair()` (run by `start()`, i.e. at every term) writes exactly those, and
leaves alone every device whose document already says so -- no device gets a second desired
change, none is left waiting for one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.leader import LocalLease
from cloud_sync.platform.rollout_feed import RecordFeed
from cloud_sync.platform.rollout_store import RolloutStore
from cloud_sync.platform.rollouts import RolloutController
from cloud_sync.platform.store import LocalStore
from cloud_sync.rollout import controller as core
from cloud_sync.rollout.eligibility import BundleFacts
from cloud_sync.rollout.messages import desired_patch
from cloud_sync.rollout.model import new_rollout, plan
from cloud_sync.rollout.selector import DeviceFacts
from cloud_sync.rollout.spec import RolloutSpec
from cloud_sync.rollout.states import DeviceState
from cloud_sync.state import merge_config
from hardware.profile import DeviceProfile

BUNDLE = BundleFacts("resize", "1.4.0", "go", ("linux-x86_64",))
IDS = [f"edge-{i}" for i in range(4)]


def _facts(device: str) -> DeviceFacts:
    profile = DeviceProfile(
        arch="x86_64", libc="glibc", libc_version="2.36", cpu_count=2, cpu_model="",
        memory_total_mb=2048, memory_available_mb=1024, disk_total_mb=32_000,
        disk_free_mb=10_000, data_dir="/d", board_vendor="", board_model="", kernel="6.1",
        hostname=device,
    ).to_dict()  # fmt: skip
    return DeviceFacts(device, {"group": "west"}, profile, None, {"resize": "1.3.0"})


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[RolloutController]:
    fleet = FleetStore(tmp_path / "fleet.db")
    for n, device in enumerate(IDS):
        fleet.enroll(device, {"group": "west"}, f"token-{n}", n + 1)
    registry = LocalStore(tmp_path / "registry.db", tmp_path / "blobs")
    c = RolloutController(
        RolloutStore(tmp_path / "rollouts.db"),
        fleet,
        registry,
        RecordFeed(tmp_path / "fleet.db"),
        None,
        lease=LocalLease(),
    )
    yield c
    await c.close()
    fleet.close()
    registry.close()


def _apply(fleet: FleetStore, action: core.SetDesired) -> None:
    patch = desired_patch(action.function, action.version, action.rollout)
    fleet.set_desired(action.device, merge_config(fleet.desired(action.device).config, patch))


async def test_a_decision_stored_but_not_carried_out_is_carried_out_once(
    controller: RolloutController,
) -> None:
    spec = RolloutSpec.from_dict(
        {"function": "resize", "version": "1.4.0", "target": "group=west", "waves": "50,100",
         "bake_s": 60, "rate_per_minute": 100_000}
    )  # fmt: skip
    r = new_rollout(spec, plan("r-1", spec, [_facts(d) for d in IDS], BUNDLE), now=0.0)
    r, actions = core.step(r, core.Start(0.0))
    notified = sorted(a.device for a in actions)
    assert len(notified) == 2
    # The dead leader stored the step, carried out the first action and died before the second.
    await asyncio.to_thread(controller.rollouts.save, r)
    await asyncio.to_thread(_apply, controller.fleet, actions[0])
    done, missing = actions[0].device, actions[1].device

    assert await controller.repair() == 1
    fleet = controller.fleet
    assert fleet.desired(done).version == 1  # untouched: it already had its step
    assert fleet.desired(missing).version == 1  # written now, once
    want = fleet.desired(missing).config["functions"]["resize"]["version"]
    assert want == "1.4.0"
    assert fleet.desired(missing).config["deployment"]["rollouts"]["resize"]["rollout"] == "r-1"
    for other in set(IDS) - set(notified):  # later waves: nothing yet
        assert fleet.desired(other).version == 0
    # A second new leader finds nothing to do.
    assert await controller.repair() == 0
    assert {d: fleet.desired(d).version for d in notified} == {done: 1, missing: 1}
    stored = await controller.get("r-1")
    assert {stored.devices[d].state for d in notified} == {DeviceState.NOTIFIED}


async def test_start_and_stop_follow_the_term(controller: RolloutController) -> None:
    """The loop is a leader duty: start() runs it, stop() ends it, and operator calls work
    either way (they read and write the store)."""
    await controller.start()
    assert controller._task is not None and not controller._task.done()
    await controller.stop()
    assert controller._task is None
    assert await controller.all() == []
    await controller.start()  # a later term
    assert controller._task is not None


async def test_a_pass_carries_out_every_action_and_each_devices_in_order(
    controller: RolloutController, caplog: pytest.LogCaptureFixture
) -> None:
    """Actions run concurrently across devices (`_carry_out`), never out of order on one: a
    device told to install and then, in the same pass, to roll back ends rolled back."""
    fleet = controller.fleet
    actions = [core.SetDesired(d, "resize", "1.4.0", False, "r-2") for d in IDS]
    actions.append(core.SetDesired(IDS[0], "resize", "1.3.0", True, "r-2"))
    actions.append(core.SetDesired("edge-gone", "resize", "1.4.0", False, "r-2"))
    await controller._carry_out(actions)
    assert {d: fleet.desired(d).version for d in IDS} == {
        IDS[0]: 2, IDS[1]: 1, IDS[2]: 1, IDS[3]: 1
    }  # fmt: skip
    first = fleet.desired(IDS[0]).config
    assert first["functions"]["resize"]["version"] == "1.3.0"
    assert first["deployment"]["rollouts"]["resize"]["rollback"] is True
    for d in IDS[1:]:
        assert fleet.desired(d).config["functions"]["resize"]["version"] == "1.4.0"
    assert "device edge-gone is gone" in caplog.text  # an unknown device is skipped, said

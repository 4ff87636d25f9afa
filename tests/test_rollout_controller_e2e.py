"""The platform's rollout controller end to end: the real platform (`edge-cloud serve`) with a
real Mosquitto, a simulated fleet (`cloud_sync.platform.simulator`) and the operator's
`edge-cloud rollout` CLI. Bake times and gate intervals are tiny; every wait is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.platform.sim_faults import parse_fault
from tests.mosquitto import Broker, eventually
from tests.registry_helpers import Platform, build, cli, ok, publish, start_platform
from tests.rollout_fleet import (
    ENDED,
    FN,
    desired_version,
    fleet,
    make_bundles,
    refused_with,
    rollout,
    start,
    status,
    wait_state,
)

pytestmark = pytest.mark.slow
FAST = ["--bake", "0.3", "--interval", "0.2", "--device-timeout", "30"]


@pytest.fixture
def platform(request: pytest.FixtureRequest, mosquitto: Broker) -> Iterator[Platform]:
    """The platform on SQLite; a test parametrised `indirect` with "postgresql" gets it on a
    fresh PostgreSQL database (`--database`) instead."""
    extra: list[str] = []
    if getattr(request, "param", "sqlite") == "postgresql":
        extra = ["--database", request.getfixturevalue("postgres_db").url]
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url, *extra)
    try:
        yield plat
    finally:
        plat.stop()


@pytest.fixture
def published(platform: Platform, tmp_path: Path) -> dict[str, Path]:
    bundles = make_bundles(tmp_path / "src", ["0.1.0", "0.2.0"])
    for b in bundles.values():
        publish(platform, b)
    return bundles


async def first_version(platform: Platform) -> str:
    """Roll 0.1.0 out to the whole simulated group: the 'previous' version of the tests."""
    rid = start(platform, f"{FN}@0.1.0", "--target", "group=sim", "--waves", "50,100", *FAST,
                "--min-invocations", "0")  # fmt: skip
    view = await wait_state(platform, rid, ENDED)
    assert view["state"] == "succeeded", view
    return rid


@pytest.mark.parametrize("platform", ["sqlite", "postgresql"], indirect=True)
async def test_rollout_reaches_every_device_wave_by_wave_and_the_cli_shows_it(
    platform: Platform, published: dict[str, Path], tmp_path: Path
) -> None:
    async with fleet(platform, tmp_path / "sim", 6) as sim:
        ids = sorted(d.id for d in sim.devices)
        dry = ok(rollout(platform, "start", f"{FN}@0.1.0", "--target", "group=sim",
                         "--waves", "50,100", "--dry-run"))  # fmt: skip
        assert "wave 1: 3 devices" in dry and "wave 2: 3 devices" in dry
        assert "nothing started" in dry
        assert ok(rollout(platform, "list")) == ""  # the dry run started nothing
        rid = await first_version(platform)
        view = await status(platform, rid)
        assert [w["devices"] for w in view["waves"]] == [3, 3]
        assert {d["device"]: (d["state"], d["version"]) for d in view["devices"]} == {
            d: ("healthy", "0.1.0") for d in ids
        }
        for d in ids:
            assert await desired_version(platform, d) == "0.1.0"
        assert rid in ok(rollout(platform, "list"))
        watched = ok(rollout(platform, "status", rid, "--watch"))  # ends: the rollout ended
        assert "succeeded" in watched and "wave 2/2" in watched
        refused_with(rollout(platform, "pause", rid), "rollout_state")
        refused_with(rollout(platform, "status", "r-nope"), "rollout_not_found")
        refused_with(
            rollout(platform, "start", f"{FN}@9.9.9", "--target", "*"), "version_not_found"
        )
        refused_with(rollout(platform, "start", f"{FN}@0.2.0", "--target", "group=",
                        "--gate", "p95_ms<=fast"), "bad_rollout_spec")  # fmt: skip


async def test_a_version_that_crashes_on_half_the_fleet_is_rolled_back_everywhere(
    platform: Platform, published: dict[str, Path], tmp_path: Path
) -> None:
    crash = parse_fault("0.2.0:crash@0.5")
    async with fleet(platform, tmp_path / "sim", 6, faults=[crash]) as sim:
        ids = sorted(d.id for d in sim.devices)
        assert 0 < sum(crash.hits(d, "0.2.0") for d in ids) < len(ids)
        await first_version(platform)
        rid = start(platform, f"{FN}@0.2.0", "--target", "group=sim", "--waves", "50,100",
                    *FAST)  # fmt: skip
        view = await wait_state(platform, rid, ENDED)
        assert view["state"] == "rolled_back", view
        assert "install_success" in view["reason"]
        for d in view["devices"]:
            want = "failed" if crash.hits(d["device"], "0.2.0") else "rolled_back"
            assert d["state"] in (want, "canceled"), d
        for d in ids:
            assert await desired_version(platform, d) == "0.1.0"

        async def all_back() -> bool:
            return all(d.active.get(FN) == "0.1.0" for d in sim.devices)

        await eventually(all_back, 30, "every simulated device runs 0.1.0 again")


@pytest.mark.parametrize(
    ("fault", "gate", "metric"),
    [
        ("0.2.0:errors=0.5", "error_rate<=0.05", "error_rate"),
        ("0.2.0:latency=300", "p95_ms<=200", "p95_ms"),
    ],
)
async def test_a_misbehaving_version_is_caught_by_its_gate_and_rolled_back(
    platform: Platform, published: dict[str, Path], tmp_path: Path, fault: str, gate: str,
    metric: str,
) -> None:  # fmt: skip
    async with fleet(platform, tmp_path / "sim", 4, faults=[parse_fault(fault)]) as sim:
        await first_version(platform)
        rid = start(platform, f"{FN}@0.2.0", "--target", "group=sim", "--waves", "50,100",
                    *FAST, "--gate", gate, "--min-invocations", "20")  # fmt: skip
        view = await wait_state(platform, rid, ENDED)
        assert view["state"] == "rolled_back", view
        assert view["reason"].startswith(f"{metric}=") or metric in view["reason"], view
        for d in sim.devices:
            assert await desired_version(platform, d.id) == "0.1.0"


async def test_too_little_traffic_pauses_as_inconclusive_and_abort_puts_the_fleet_back(
    platform: Platform, published: dict[str, Path], tmp_path: Path
) -> None:
    async with fleet(platform, tmp_path / "sim", 4) as sim:
        await first_version(platform)
        rid = start(platform, f"{FN}@0.2.0", "--target", "group=sim", "--waves", "50,100",
                    *FAST, "--gate", "error_rate<=0.05",
                    "--min-invocations", "1000000")  # fmt: skip
        view = await wait_state(platform, rid, {"paused", *ENDED})
        assert view["state"] == "paused" and "inconclusive" in view["reason"], view
        assert view["wave"] == 0
        ok(rollout(platform, "resume", rid))
        ok(rollout(platform, "pause", rid))
        out = ok(rollout(platform, "abort", rid))
        assert "aborted" in out
        view = await status(platform, rid)
        assert view["state"] == "aborted"
        # Updated devices keep 0.2.0; every other device's desired stays on 0.1.0.
        states = {d["device"]: d["state"] for d in view["devices"]}
        for d in sim.devices:
            want = "0.2.0" if states[d.id] in ("active", "healthy") else "0.1.0"
            assert await desired_version(platform, d.id) == want


async def test_a_second_rollout_is_refused_until_it_supersedes_the_first(
    platform: Platform, published: dict[str, Path], tmp_path: Path
) -> None:
    async with fleet(platform, tmp_path / "sim", 4):
        await first_version(platform)
        slow = ["--bake", "600", "--interval", "0.2", "--min-invocations", "0"]
        first = start(platform, f"{FN}@0.2.0", "--target", "group=sim", "--waves", "50,100",
                      *slow)  # fmt: skip
        line = refused_with(rollout(platform, "start", f"{FN}@0.2.0", "--target", "group=sim",
                               *slow), "rollout_active")  # fmt: skip
        assert first in line
        second = start(platform, f"{FN}@0.2.0", "--target", "group=sim", *FAST,
                       "--waves", "100", "--min-invocations", "0", "--supersede")  # fmt: skip
        old = await status(platform, first)
        assert old["state"] == "aborted" and old["superseded_by"] == second
        view = await wait_state(platform, second, ENDED)
        assert view["state"] == "succeeded", view


async def test_an_abort_while_devices_download_withdraws_their_step(
    platform: Platform, published: dict[str, Path], tmp_path: Path
) -> None:
    stuck = parse_fault("0.2.0:drop")  # reports `downloading`, then nothing
    async with fleet(platform, tmp_path / "sim", 4, faults=[stuck]) as sim:
        await first_version(platform)
        rid = start(platform, f"{FN}@0.2.0", "--target", "group=sim", "--waves", "100",
                    "--bake", "0.2", "--interval", "0.2", "--min-invocations", "0")  # fmt: skip

        async def downloading() -> bool:
            await asyncio.sleep(0.2)
            view = await status(platform, rid)
            return bool(view["waves"][0]["states"] == {"downloading": 4})

        await eventually(downloading, 60, "every device stuck downloading")
        ok(rollout(platform, "abort", rid))
        view = await status(platform, rid)
        assert view["state"] == "aborted"
        assert {(d["state"], d["code"]) for d in view["devices"]} == {("canceled", "aborted")}
        for d in sim.devices:
            assert await desired_version(platform, d.id) == "0.1.0"


async def test_devices_whose_arch_the_bundle_lacks_are_rejected_and_the_rest_proceed(
    platform: Platform, tmp_path: Path
) -> None:
    src = tmp_path / "cpp"
    src.mkdir()
    ok(cli("keys", "create", "--out", src / "publisher.key"))
    ok(cli("fn", "new", FN, "--runtime", "cpp", "--dir", src / FN))
    publish(platform, build(src / FN, src / "publisher.key", src / "echo.efb"))  # this arch only
    async with (
        fleet(platform, tmp_path / "x86", 3, prefix="x86"),
        fleet(platform, tmp_path / "arm", 2, prefix="arm", arch="aarch64") as arm,
    ):
        dry = ok(rollout(platform, "start", f"{FN}@0.1.0", "--target", "group=sim",
                         "--waves", "100", "--dry-run"))  # fmt: skip
        assert "wave 1: 3 devices" in dry
        assert dry.count(": wrong_arch (") == 2
        rid = start(platform, f"{FN}@0.1.0", "--target", "group=sim", "--waves", "100",
                    *FAST, "--min-invocations", "0")  # fmt: skip
        view = await wait_state(platform, rid, ENDED)
        assert view["state"] == "succeeded", view
        arms = {d.id for d in arm.devices}
        for d in view["devices"]:
            if d["device"] in arms:
                assert (d["state"], d["code"], d["wave"]) == ("rejected", "wrong_arch", None), d
            else:
                assert (d["state"], d["code"], d["wave"]) == ("healthy", None, 0), d

"""The fleet simulator against the real platform and a real Mosquitto (TLS, ACL), on loopback.

The simulated devices speak the rollout contract (cloud_sync/rollout/messages.py) for real:
they receive retained desired documents, download the published bundle from the registry,
report each step with an increasing seq through the broker into the platform's store, and send
metrics. The rollout controller does not exist yet, so the test plays it by writing each
device's desired document through the platform API (what the controller's SetDesired will do).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.platform.simulator import Fault, SimSettings, Simulator, SimulatorError, parse_fault
from cloud_sync.rollout.messages import StatusReport, decode_status
from cloud_sync.rollout.states import DeviceState
from tests.mosquitto import Broker, eventually
from tests.registry_helpers import (
    Platform,
    build,
    cli,
    ok,
    publish,
    set_version,
    start_platform,
)

FN = "echo"


def test_fault_syntax() -> None:
    assert parse_fault("1.4.0:crash@0.5") == Fault("1.4.0", "crash", 0.0, 0.5)
    assert parse_fault("1.4.0:errors=0.3") == Fault("1.4.0", "errors", 0.3, 1.0)
    assert parse_fault("*:offline=30@0.1") == Fault("*", "offline", 30.0, 0.1)
    for bad in ("1.4.0:explode", "1.4.0:errors", "1.4.0:errors=2", "crash@0.5", "1.0.0:drop@3"):
        with pytest.raises(SimulatorError):
            parse_fault(bad)


def test_fault_fraction_is_stable_and_proportional() -> None:
    fault = Fault("1.0.0", "crash", fraction=0.3)
    hits = [fault.hits(f"sim-{i:05d}", "1.0.0") for i in range(2000)]  # bounded
    assert hits == [fault.hits(f"sim-{i:05d}", "1.0.0") for i in range(2000)]
    assert 0.25 < sum(hits) / len(hits) < 0.35
    assert not fault.hits("sim-00000", "2.0.0")
    assert all(Fault("*", "crash").hits(f"d{i}", v) for i, v in enumerate(["1.0.0", None]))


def test_only_loopback_and_bounded() -> None:
    with pytest.raises(SimulatorError, match="loopback"):
        SimSettings(devices=1, platform_url="http://10.0.0.1:8080", token="t")
    with pytest.raises(SimulatorError, match="loopback"):
        SimSettings(devices=1, platform_url="http://127.0.0.1:1", token="t",
                    broker_url="mqtts://example.com:8883")  # fmt: skip
    with pytest.raises(SimulatorError, match="--devices"):
        SimSettings(devices=0, platform_url="http://127.0.0.1:1", token="t")
    with pytest.raises(SimulatorError, match="--duration"):
        SimSettings(devices=1, platform_url="http://localhost:1", token="t", duration_s=1e9)


# ---- against the real platform and Mosquitto -----------------------------------------------


@pytest.fixture
def platform(mosquitto: Broker) -> Iterator[Platform]:
    # The platform's data dir holds the broker's CA, so the certificates it issues are trusted.
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url)
    try:
        yield plat
    finally:
        plat.stop()


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    ok(cli("keys", "create", "--out", tmp_path / "publisher.key"))
    ok(cli("fn", "new", FN, "--runtime", "node", "--dir", tmp_path / FN))
    out = {"0.1.0": build(tmp_path / FN, tmp_path / "publisher.key", tmp_path / "a.efb")}
    set_version(tmp_path / FN, "0.2.0")
    out["0.2.0"] = build(tmp_path / FN, tmp_path / "publisher.key", tmp_path / "b.efb")
    return out


def api(plat: Platform, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        plat.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {plat.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def desire(
    plat: Platform, device: str, version: str, rollout: str, *, rollback: bool = False
) -> None:
    entry = {"rollout": rollout, "version": version, "rollback": rollback}
    sets = {f"functions.{FN}.version": version, f"deployment.rollouts.{FN}": entry}
    doc = await asyncio.to_thread(api, plat, "POST", f"/v1/devices/{device}/config", {"set": sets})
    assert doc["published"] is True


async def reports(plat: Platform, device: str) -> list[StatusReport]:
    doc = await asyncio.to_thread(
        api, plat, "GET", f"/v1/devices/{device}/records?kind=rollout&limit=200"
    )
    return sorted((decode_status(r["value"]) for r in doc["records"]), key=lambda r: r.seq)


async def last_state(plat: Platform, device: str, rollout: str) -> DeviceState | None:
    mine = [r for r in await reports(plat, device) if r.rollout == rollout]
    return mine[-1].state if mine else None


@pytest.mark.slow
async def test_simulated_fleet_installs_crashes_and_rolls_back_through_the_real_platform(
    platform: Platform, bundles: dict[str, Path], tmp_path: Path
) -> None:
    for bundle in bundles.values():
        publish(platform, bundle)
    crash = parse_fault("0.2.0:crash@0.5")
    settings = SimSettings(
        devices=6, platform_url=platform.url, token=platform.token, labels={"group": "sim"},
        duration_s=120, metrics_interval_s=0.3, health_window_s=0.1, faults=(crash,),
        workdir=tmp_path / "sim",
    )  # fmt: skip
    sim = Simulator(settings)
    await sim.enrol(tmp_path / "sim")
    ids = [d.id for d in sim.devices]
    crashers = {d for d in ids if crash.hits(d, "0.2.0")}
    assert 0 < len(crashers) < len(ids)  # deterministic: the hash splits these six ids
    run = asyncio.create_task(sim.run())
    try:

        async def profiles_reported() -> bool:
            view = await asyncio.to_thread(api, platform, "GET", "/v1/devices")
            mine = [d for d in view["devices"] if d["id"] in ids]
            return len(mine) == len(ids) and all(d.get("profile") and d["online"] for d in mine)

        await eventually(profiles_reported, 60, "every simulated device online with a profile")
        for device in ids:
            await desire(platform, device, "0.1.0", "r-1")

        async def all_in(rollout: str, want: dict[str, DeviceState]) -> bool:
            got = {d: await last_state(platform, d, rollout) for d in want}
            return got == want

        await eventually(lambda: all_in("r-1", dict.fromkeys(ids, DeviceState.HEALTHY)), 60,
                         "0.1.0 healthy everywhere")  # fmt: skip
        first = await reports(platform, ids[0])
        assert [r.state for r in first] == [
            DeviceState.DOWNLOADING, DeviceState.INSTALLING, DeviceState.WARMING,
            DeviceState.ACTIVE, DeviceState.HEALTHY,
        ]  # fmt: skip
        assert all(b.seq > a.seq for a, b in itertools.pairwise(first))
        assert {r.version for r in first} == {"0.1.0"} and first[0].previous is None

        async def invoked() -> bool:
            doc = await asyncio.to_thread(
                api, platform, "GET", f"/v1/devices/{ids[0]}/metrics?function={FN}"
            )
            return int(doc["functions"].get(FN, {}).get("invocations", 0)) > 0

        await eventually(invoked, 30, "metrics of the active version stored")

        # 0.2.0 crashes on the devices the fault picks: they go back to 0.1.0 by themselves.
        for device in ids:
            await desire(platform, device, "0.2.0", "r-2")
        expected = {d: DeviceState.FAILED if d in crashers else DeviceState.HEALTHY for d in ids}
        await eventually(lambda: all_in("r-2", expected), 60, "0.2.0 healthy or crashed")
        failed = [r for r in await reports(platform, sorted(crashers)[0]) if r.rollout == "r-2"]
        assert (failed[-1].code, failed[-1].previous) == ("crash_loop", "0.1.0")

        # The platform's rollback of the healthy ones: an explicit downgrade.
        healthy = [d for d in ids if d not in crashers]
        for device in healthy:
            await desire(platform, device, "0.1.0", "r-2", rollback=True)
        await eventually(
            lambda: all_in("r-2", {**expected, **dict.fromkeys(healthy, DeviceState.ROLLED_BACK)}),
            60, "healthy devices rolled back",
        )  # fmt: skip
        # A downgrade without the rollback flag is refused by the device.
        await desire(platform, healthy[0], "0.2.0", "r-3")
        await eventually(lambda: all_in("r-3", {healthy[0]: DeviceState.HEALTHY}), 60, "r-3")
        await desire(platform, healthy[0], "0.1.0", "r-4")
        await eventually(lambda: all_in("r-4", {healthy[0]: DeviceState.REJECTED}), 60, "r-4")
        refused = [r for r in await reports(platform, healthy[0]) if r.rollout == "r-4"][-1]
        assert refused.code == "downgrade_refused"
    finally:
        sim.stop()
        summary = await asyncio.wait_for(run, 60)
    assert summary.devices == 6 and summary.downloads >= 6 + len(healthy)
    assert {summary.active[d][FN] for d in crashers} == {"0.1.0"}
    assert summary.active[healthy[0]][FN] == "0.2.0"
    # The reported document carries the latest report per function (heals a lost report).
    view = await asyncio.to_thread(
        api, platform, "GET", f"/v1/devices/{healthy[0]}/records?kind=reported&limit=1"
    )
    assert view["records"][0]["value"]["rollouts"][FN]["rollout"] == "r-4"


@pytest.mark.slow
async def test_simulated_faults_offline_drop_errors_and_latency(
    platform: Platform, bundles: dict[str, Path], tmp_path: Path
) -> None:
    publish(platform, bundles["0.1.0"])
    faults = tuple(
        parse_fault(f)
        for f in ("0.1.0:drop@0.3", "0.1.0:offline=3@0.3", "0.1.0:errors=0.5@0.5",
                  "0.1.0:latency=300@0.5")
    )  # fmt: skip
    settings = SimSettings(
        devices=8, platform_url=platform.url, token=platform.token, prefix="flt",
        duration_s=120, metrics_interval_s=0.3, health_window_s=0.1, faults=faults,
    )  # fmt: skip
    sim = Simulator(settings)
    await sim.enrol(tmp_path)
    ids = [d.id for d in sim.devices]
    picked = {f.kind: {d for d in ids if f.hits(d, "0.1.0")} for f in faults}
    assert all(0 < len(p) < len(ids) for p in picked.values()), picked  # the hash splits them
    run = asyncio.create_task(sim.run())
    try:

        async def online() -> bool:
            view = await asyncio.to_thread(api, platform, "GET", "/v1/devices")
            return all(d["online"] for d in view["devices"] if d["id"] in ids)

        await eventually(online, 60, "devices online")
        for device in ids:
            await desire(platform, device, "0.1.0", "r-1")
        went_offline: set[str] = set()

        async def settled() -> bool:
            view = await asyncio.to_thread(api, platform, "GET", "/v1/devices")
            went_offline.update(
                d["id"] for d in view["devices"] if d["id"] in ids and d["presence"] == "offline"
            )
            states = {d: await last_state(platform, d, "r-1") for d in ids}
            want = {
                d: DeviceState.DOWNLOADING if d in picked["drop"] else DeviceState.HEALTHY
                for d in ids
            }
            return states == want

        await eventually(settled, 60, "healthy, except the devices that drop mid-install")
        assert went_offline >= picked["offline"]  # each was seen offline before it installed

        async def metrics_show_faults() -> bool:
            running = [d for d in ids if d not in picked["drop"]]
            for device in running:
                doc = await asyncio.to_thread(
                    api, platform, "GET", f"/v1/devices/{device}/metrics?function={FN}"
                )
                entry = doc["functions"].get(FN)
                if not entry or entry["invocations"] < 40:
                    return False
                rate = entry["errors"] / entry["invocations"]
                assert rate == (0.5 if device in picked["errors"] else 0.0), (device, entry)
                assert (entry["latency_ms_avg"] > 300) is (device in picked["latency"]), entry
            return True

        await eventually(metrics_show_faults, 60, "metrics with the injected errors and latency")
    finally:
        sim.stop()
        summary = await asyncio.wait_for(run, 60)
    assert all(summary.active[d] == {} for d in picked["drop"])
    assert all(summary.active[d] == {FN: "0.1.0"} for d in ids if d not in picked["drop"])


@pytest.mark.slow
def test_edge_cloud_simulate_command(platform: Platform) -> None:
    bad = cli("simulate", "--devices", "1", "--platform", "http://10.1.2.3:80", "--token", "t")
    assert bad.returncode == 2 and "loopback" in bad.stderr
    proc = cli(
        "simulate", "--devices", "2", "--platform", platform.url, "--data-dir",
        platform.data_dir, "--duration", "3", "--metrics-interval", "0.5", "--prefix", "cli",
        "--json",
    )  # fmt: skip
    summary = json.loads(ok(proc))
    assert summary["devices"] == 2 and set(summary["active"]) == {"cli-00000", "cli-00001"}
    view = api(platform, "GET", "/v1/devices")
    assert {"cli-00000", "cli-00001"} <= {d["id"] for d in view["devices"]}


@pytest.mark.slow
async def test_broker_restart_mid_deployment_loses_no_report(
    mosquitto_factory: Callable[..., Broker], bundles: dict[str, Path], tmp_path: Path
) -> None:
    # Persistent like a production broker: the platform's session survives the restart, so a
    # report the broker acknowledged is not lost before the platform resubscribes.
    broker = mosquitto_factory(persistence=True, autosave_on_changes=True)
    plat = start_platform(broker.workdir / "platform", "--broker", broker.url)
    try:
        publish(plat, bundles["0.1.0"])
        settings = SimSettings(
            devices=3, platform_url=plat.url, token=plat.token, prefix="brk", duration_s=120,
            metrics_interval_s=0.5, health_window_s=0.5,
        )  # fmt: skip
        sim = Simulator(settings)
        await sim.enrol(tmp_path)
        ids = [d.id for d in sim.devices]
        run = asyncio.create_task(sim.run())
        try:

            async def online() -> bool:
                view = await asyncio.to_thread(api, plat, "GET", "/v1/devices")
                return all(d["online"] for d in view["devices"] if d["id"] in ids)

            await eventually(online, 60, "devices online")
            for device in ids:
                await desire(plat, device, "0.1.0", "r-1")
            await asyncio.to_thread(broker.restart, crash=True)

            async def all_healthy() -> bool:
                got = [await last_state(plat, d, "r-1") for d in ids]
                return got == [DeviceState.HEALTHY] * len(ids)

            await eventually(all_healthy, 90, "healthy everywhere after the broker restart")
            for device in ids:
                states = [r.state for r in await reports(plat, device) if r.rollout == "r-1"]
                assert states == [
                    DeviceState.DOWNLOADING, DeviceState.INSTALLING, DeviceState.WARMING,
                    DeviceState.ACTIVE, DeviceState.HEALTHY,
                ], (device, states)  # fmt: skip
        finally:
            sim.stop()
            await asyncio.wait_for(run, 60)
    finally:
        plat.stop()

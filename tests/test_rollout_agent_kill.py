"""A real agent `kill -9`ed mid-install under the real rollout controller (issue 13's fault list).

Real parts only: Mosquitto (TLS, ACL), `edge-cloud serve` with its controller, an `edge-agent
run` process enrolled like any device, and the `edge-cloud rollout` CLI. The agent's installer
is held at one step by `EDGEFN_INSTALL_PAUSE_AT` (it writes a marker and sleeps there), so the
SIGKILL lands mid-install for certain. Then:

* restarted in time, the agent finishes the install and the rollout `succeeded`, with the
  device `healthy` on the new version in the platform's view, the new version the only one
  `active` on disk and the one that answers;
* down past the rollout's per-device timeout, the device is `timed_out`, the install gate fails
  and the rollback policy asks for the previous version; restarted while the rollout waits for
  that confirmation, the agent ends on the previous version (whole, the only one active), and
  the rollout is `rolled_back` with the device `rolled_back` to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import AgentProcess, children_of, pid_alive, start_agent
from tests.mosquitto import Broker, eventually
from tests.registry_helpers import Platform, agent_cli, cli, ok, publish, start_platform
from tests.rollout_fleet import FN, api, desired_version, make_bundles, rollout, start, wait_state

pytestmark = pytest.mark.slow

KEY = "publisher.key"
# The rollback test's per-device timeout: the killed agent stays down longer than this, and is
# back well within it to confirm the rollback (an agent starts and connects in a few seconds).
TIMEOUT_S = 30


@pytest.fixture
def platform(mosquitto: Broker, tmp_path: Path) -> Iterator[Platform]:
    bundles = make_bundles(tmp_path / "src", ["0.1.0", "0.2.0"])
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url)
    try:
        for bundle in bundles.values():
            publish(plat, bundle)
        yield plat
    finally:
        plat.stop()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    made: list[AgentProcess] = []
    yield made
    for a in made:
        a.stop(signal.SIGKILL if a.proc.poll() is None else signal.SIGTERM)


def run_agent(
    agents: list[AgentProcess], data: Path, creds: Path, env: dict[str, str] | None = None
) -> AgentProcess:
    saved = dict(os.environ)
    os.environ.update({"EDGEFN_DEPLOY_HEALTH_WINDOW_S": "1.5", **(env or {})})
    try:
        agent = start_agent(data, "--credentials", str(creds), "--metrics-interval", "0.3")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    agents.append(agent)
    return agent


def enrol(plat: Platform, tmp: Path, name: str, group: str) -> tuple[Path, Path]:
    creds = tmp / f"{name}.json"
    ok(cli("device", "enroll", name, "--labels", f"group={group}", "--out", creds,
           "--data-dir", plat.data_dir))  # fmt: skip
    data = tmp / name
    ok(agent_cli("trust", "add", tmp / "src" / f"{KEY}.pub", "--data-dir", data))
    return data, creds


def active(data: Path) -> str | None:
    try:
        return (data / "functions" / FN / "active").read_text().strip()
    except FileNotFoundError:
        return None


def served_version(agent: AgentProcess) -> str | None:
    resp = agent.invoke(FN, b"x")
    return resp.headers.get("X-Edgefn-Version") if resp.status == 200 else None


async def online(plat: Platform, name: str) -> None:
    async def up() -> bool:
        view = await asyncio.to_thread(api, plat, "GET", "/v1/devices")
        mine = [d for d in view["devices"] if d["id"] == name]
        return bool(mine and mine[0]["online"] and mine[0].get("profile"))

    await eventually(up, 60, f"{name} online with its profile")


def device_record(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in doc["devices"] if d["device"] == name)


def paused_agent(
    agents: list[AgentProcess], data: Path, creds: Path, step: str, marker: Path
) -> AgentProcess:
    """An agent whose installer will stop at `step` (and write `marker`) on its next install."""
    pause = {"EDGEFN_INSTALL_PAUSE_AT": step, "EDGEFN_INSTALL_PAUSE_MARKER": str(marker)}
    return run_agent(agents, data, creds, pause)


async def seen_downloading(plat: Platform, rid: str, name: str) -> bool:
    doc = await asyncio.to_thread(api, plat, "GET", f"/v1/rollouts/{rid}")
    return device_record(doc, name)["state"] in {"downloading", "installing"}


async def sigkill(agent: AgentProcess, marker: Path, step: str) -> None:
    await eventually(lambda: marker.exists(), 90, f"the install to reach {step}")
    workers = list(children_of(agent.proc.pid))
    os.kill(agent.proc.pid, signal.SIGKILL)
    await asyncio.to_thread(agent.proc.wait, 10)
    await eventually(lambda: not any(pid_alive(w) for w in workers), 15, "workers gone")


async def base_version(plat: Platform, agents: list[AgentProcess], tmp: Path, group: str,
                       name: str) -> tuple[Path, Path]:  # fmt: skip
    """An enrolled agent running 0.1.0 through a first rollout, then stopped."""
    data, creds = enrol(plat, tmp, name, group)
    agent = run_agent(agents, data, creds)
    await online(plat, name)
    first = start(plat, f"{FN}@0.1.0", "--target", f"group={group}", "--waves", "100",
                  "--bake", "0", "--min-invocations", "0")  # fmt: skip
    assert (await wait_state(plat, first, {"succeeded", "rolled_back"}))["state"] == "succeeded"
    assert active(data) == "0.1.0"
    agent.stop()
    return data, creds


async def test_agent_killed_while_downloading_finishes_the_rollout_after_restart(
    platform: Platform, agents: list[AgentProcess], tmp_path: Path
) -> None:
    name = "edge-kill-dl"
    data, creds = await base_version(platform, agents, tmp_path, "kill", name)
    marker = tmp_path / "paused-download"
    agent = paused_agent(agents, data, creds, "download", marker)
    await online(platform, name)
    rid = start(platform, f"{FN}@0.2.0", "--target", "group=kill", "--waves", "100",
                "--bake", "0", "--min-invocations", "0", "--device-timeout", "600")  # fmt: skip
    await sigkill(agent, marker, "download")
    assert active(data) == "0.1.0"  # the old version stays whole while the new one downloads
    mid = await asyncio.to_thread(api, platform, "GET", f"/v1/rollouts/{rid}")
    assert mid["state"] == "running", mid["reason"]
    assert device_record(mid, name)["state"] in {"notified", "downloading"}

    agent = run_agent(agents, data, creds)
    done = await wait_state(platform, rid, {"succeeded", "rolled_back", "failed", "aborted"})
    assert done["state"] == "succeeded", done["reason"]
    assert device_record(done, name)["version"] == "0.2.0"

    async def healthy() -> bool:  # bake 0: the wave may pass on `active`, the window then ends
        doc = await asyncio.to_thread(api, platform, "GET", f"/v1/rollouts/{rid}")
        record = device_record(doc, name)
        return (record["state"], record["version"]) == ("healthy", "0.2.0")

    await eventually(healthy, 60, "the device healthy on 0.2.0 in the platform's view")
    assert active(data) == "0.2.0"
    await eventually(lambda: served_version(agent) == "0.2.0", 30, "0.2.0 answers")
    root = data / "functions" / FN
    assert not [p.name for p in root.iterdir() if p.name.startswith((".staging", ".trash"))]
    # The operator's view says the same: `rollout status --json`, and the reported document.
    status = json.loads(ok(rollout(platform, "status", rid, "--json")))
    assert device_record(status, name)["state"] == "healthy"
    assert await desired_version(platform, name) == "0.2.0"

    async def reported() -> bool:
        doc = await asyncio.to_thread(
            api, platform, "GET", f"/v1/devices/{name}/records?kind=reported&limit=1"
        )
        return bool(doc["records"]) and doc["records"][0]["value"]["functions"].get(FN) == "0.2.0"

    await eventually(reported, 30, "the reported document naming 0.2.0")


async def test_agent_down_past_the_device_timeout_is_rolled_back_by_the_policy(
    platform: Platform, agents: list[AgentProcess], tmp_path: Path
) -> None:
    name = "edge-kill-un"
    data, creds = await base_version(platform, agents, tmp_path, "killrb", name)
    marker = tmp_path / "paused-unpack"
    agent = paused_agent(agents, data, creds, "unpack", marker)
    await online(platform, name)
    rid = start(platform, f"{FN}@0.2.0", "--target", "group=killrb", "--waves", "100",
                "--bake", "0", "--min-invocations", "0", "--device-timeout", str(TIMEOUT_S),
                "--on-failure", "rollback")  # fmt: skip
    await eventually(lambda: marker.exists(), 90, "the install to reach unpack")
    # The kill lands once the platform has heard the download start: from then on the device
    # may have switched unseen, so the rollback must wait for its confirmation (a device the
    # platform only ever saw `notified` has its step canceled instead -- a different test).
    await eventually(lambda: seen_downloading(platform, rid, name), 30, "downloading reported")
    await sigkill(agent, marker, "unpack")
    assert active(data) == "0.1.0"
    # Down past the device timeout: timed out, the install gate fails, the rollback begins and
    # waits (up to the device timeout again) for the device to confirm its previous version.
    ended = {"succeeded", "rolled_back", "rollback_failed", "aborted"}
    failing = await wait_state(platform, rid, {"failed", *ended}, TIMEOUT_S * 3)
    assert failing["state"] == "failed", failing
    assert "install_success" in (failing["reason"] or ""), failing["reason"]
    assert device_record(failing, name)["state"] == "timed_out", failing
    assert await desired_version(platform, name) == "0.1.0"

    agent = run_agent(agents, data, creds)
    done = await wait_state(platform, rid, ended, TIMEOUT_S * 3)
    assert done["state"] == "rolled_back", done
    record = device_record(done, name)
    assert (record["state"], record["version"]) == ("rolled_back", "0.1.0"), record
    assert active(data) == "0.1.0"
    await eventually(lambda: served_version(agent) == "0.1.0", 30, "0.1.0 answers")
    root = data / "functions" / FN
    assert not [p.name for p in root.iterdir() if p.name.startswith((".staging", ".trash"))]

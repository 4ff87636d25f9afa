"""Helpers of the rollout controller's end-to-end tests: a real platform (its rollout controller
inside) with a real Mosquitto, a simulated fleet, and the `edge-cloud rollout` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from cloud_sync.director_check import unverified_document
from cloud_sync.platform.sim_faults import Fault
from cloud_sync.platform.simulator import SimSettings, Simulator
from tests.mosquitto import eventually
from tests.registry_helpers import Platform, build, cli, ok, set_version

FN = "echo"
ENDED = {"succeeded", "rolled_back", "rollback_failed", "aborted"}


def make_bundles(tmp_path: Path, versions: Sequence[str]) -> dict[str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    ok(cli("keys", "create", "--out", tmp_path / "publisher.key"))
    ok(cli("fn", "new", FN, "--runtime", "node", "--dir", tmp_path / FN))
    out = {}
    for v in versions:
        set_version(tmp_path / FN, v)
        out[v] = build(tmp_path / FN, tmp_path / "publisher.key", tmp_path / f"{FN}-{v}.efb")
    return out


def api(plat: Platform, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        plat.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {plat.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def rollout(plat: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    """`edge-cloud rollout ARGS --platform URL --token T`."""
    return cli("rollout", *args, "--platform", plat.url, "--token", plat.token, timeout=60)


def refused_with(proc: subprocess.CompletedProcess[str], code: str) -> str:
    """A refusal of the platform: exit 1 and one stderr line `... (CODE, HTTP NNN)`."""
    assert proc.returncode == 1, f"expected a refusal:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"({code}, HTTP " in lines[0], proc.stderr
    return lines[0]


def start(plat: Platform, *args: str) -> str:
    """`rollout start ...`: the id on its last line."""
    return ok(rollout(plat, "start", *args)).strip().splitlines()[-1]


async def status(plat: Platform, rollout_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = await asyncio.to_thread(api, plat, "GET", f"/v1/rollouts/{rollout_id}")
    return doc


async def wait_state(
    plat: Platform, rollout_id: str, states: set[str], within_s: float = 90
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        await asyncio.sleep(0.2)  # a status call per poll: keep the load on the platform low
        seen.update(await status(plat, rollout_id))
        return seen["state"] in states

    await eventually(reached, within_s, f"rollout {rollout_id} in {sorted(states)}")
    return seen


async def desired_version(plat: Platform, device: str) -> str | None:
    doc = await asyncio.to_thread(api, plat, "GET", f"/v1/devices/{device}/desired")
    config = (unverified_document(doc.get("device")) or {}).get("config") or {}
    version = ((config.get("functions") or {}).get(FN) or {}).get("version")
    return str(version) if version is not None else None


@contextlib.asynccontextmanager
async def fleet(
    plat: Platform,
    work: Path,
    devices: int,
    *,
    faults: Sequence[Fault] = (),
    prefix: str = "sim",
    labels: dict[str, str] | None = None,
    arch: str = "x86_64",
    wait_online: bool = True,
) -> AsyncIterator[Simulator]:
    """A running simulated fleet, every device online with its profile reported."""
    settings = SimSettings(
        devices=devices, platform_url=plat.url, token=plat.token,
        labels=labels if labels is not None else {"group": "sim"}, prefix=prefix,
        duration_s=300, metrics_interval_s=0.3, health_window_s=0.1, faults=tuple(faults),
        workdir=work, arch=arch,
    )  # fmt: skip
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    sim = Simulator(settings)
    await sim.enrol(work)
    ids = {d.id for d in sim.devices}
    task = asyncio.create_task(sim.run())

    async def online() -> bool:
        view = await asyncio.to_thread(api, plat, "GET", "/v1/devices")
        mine = [d for d in view["devices"] if d["id"] in ids]
        return len(mine) == len(ids) and all(d.get("profile") and d["online"] for d in mine)

    try:
        if wait_online:
            await eventually(online, 60, "every simulated device online with a profile")
        yield sim
    finally:
        sim.stop()
        await asyncio.wait_for(task, 60)

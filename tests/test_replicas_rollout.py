"""Three platform replicas (real processes) on one broker and one leader lease: a rollout over a
simulated fleet survives `kill -9` of the leader mid-rollout. Another replica takes over, the
rollout completes, and each device is updated exactly once (one desired change, one download).

The killed replica is started again under its name afterwards, as its service manager would:
the broker kept its MQTT session (a persistent shared-subscription member), and the messages
queued for it are taken in when it is back (docs/scale-out.md, "Several replicas").
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import Broker, eventually
from tests.postgres import PostgresDatabase
from tests.registry_helpers import Platform, publish
from tests.replica_helpers import call, leaders, start_replica, wait_subscribed
from tests.rollout_fleet import FN, fleet, make_bundles, start, status

pytestmark = pytest.mark.slow
NAMES = ("a", "b", "c")
DEVICES = 8
SPEC = ["--target", "group=sim", "--waves", "25,50,100", "--bake", "1.5", "--interval", "0.2",
        "--device-timeout", "60", "--min-invocations", "0"]  # fmt: skip


class Fleet:
    """The replicas by name; restartable under the same name (same MQTT session). Their
    state, and the leader lease, are in one PostgreSQL database."""

    def __init__(self, data: Path, broker: Broker, database: str) -> None:
        self.data, self.broker, self.lease = data, broker, database
        self.replicas: dict[str, Platform] = {}

    def start(self, name: str) -> Platform:
        self.replicas[name] = start_replica(self.data, self.broker, self.lease, name)
        return self.replicas[name]

    def live(self) -> list[Platform]:
        return [p for p in self.replicas.values() if p.proc.poll() is None]

    def stop(self) -> None:
        for p in self.replicas.values():
            p.stop()


@pytest.fixture
def replicas(mosquitto: Broker, postgres_db: PostgresDatabase) -> Iterator[Fleet]:
    f = Fleet(mosquitto.workdir / "platform", mosquitto, postgres_db.url)
    try:
        for name in NAMES:
            f.start(name)
        yield f
    finally:
        f.stop()


async def _leader(f: Fleet, *, not_: str = "") -> str:
    found: list[str] = []

    async def one() -> bool:
        found[:] = await leaders(*f.live())
        return len(found) == 1 and found[0] != not_

    await eventually(one, 30, "exactly one leader" + (f" other than {not_}" if not_ else ""))
    return found[0]


async def test_the_leader_killed_mid_rollout_another_finishes_it_once(
    replicas: Fleet, tmp_path: Path
) -> None:
    f = replicas
    await wait_subscribed(*f.live())
    first = await _leader(f)
    # Operator and devices talk to a follower: it stays up throughout.
    follower = next(p for n, p in f.replicas.items() if n != first)
    bundles = make_bundles(tmp_path / "src", ["0.1.0"])
    publish(follower, bundles["0.1.0"])
    async with fleet(follower, tmp_path / "sim", DEVICES) as sim:
        rid = start(follower, f"{FN}@0.1.0", *SPEC)  # created on a follower, run by the leader
        seen: dict[str, Any] = {}

        async def mid_rollout() -> bool:
            await asyncio.sleep(0.1)
            seen.update(await status(follower, rid))
            return seen["state"] == "running" and seen["wave"] >= 1

        await eventually(mid_rollout, 90, "the rollout past its first wave")
        killed = f.replicas[first]
        killed.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(killed.stop)  # reaps it and closes its log pipe
        second = await _leader(f, not_=first)
        assert second != first
        # Its service manager restarts it under the same name: it comes back as a follower.
        f.start(first)
        await wait_subscribed(*f.live())
        assert await leaders(*f.live()) == [second]

        done: dict[str, Any] = {}

        async def ended() -> bool:
            await asyncio.sleep(0.2)
            done.update(await status(follower, rid))
            return done["state"] in {"succeeded", "rolled_back", "rollback_failed", "aborted"}

        await eventually(ended, 120, "the rollout to end")
        assert done["state"] == "succeeded", done
        states = {d["device"]: (d["state"], d["version"]) for d in done["devices"]}
        assert states == {d.id: ("healthy", "0.1.0") for d in sim.devices}
        # Each device updated exactly once: one desired change, one download, one version.
        for d in sim.devices:
            desired = await asyncio.to_thread(call, follower, "GET", f"/v1/devices/{d.id}/desired")
            assert desired["device"]["signed"]["document"]["version"] == 1, (d.id, desired)
            assert d.counters.downloads == 1, d.id
            assert d.active == {FN: "0.1.0"}
        # Every wave ran, in order, on both leaders (none repeated: the desired versions above).
        assert [w["devices"] for w in done["waves"]] == [2, 2, 4]

"""The platform re-issues instructions before they expire: the real MQTT intake on a real
Mosquitto, a real fleet store and director (their SQLite files), the director's clock moved
past half an instruction's lifetime. What a subscriber with access sees retained is checked the
way a device checks it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from cloud_sync import topics
from cloud_sync.director_check import director_gate
from cloud_sync.platform.director import DEFAULT_TTL_S, Director
from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.intake import MqttIntake
from tests.mosquitto import Broker, eventually, platform_session

TOPIC = topics.device_topic("dev-r", "desired")


class Clock:
    now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


async def retained(broker: Broker, name: str) -> bytes:
    """The retained desired message, as a new subscriber (own client id: nothing queued) sees it."""
    session = platform_session(broker, TOPIC, client_id=f"edgefn-observer-{name}")
    async with session:
        await session.wait_connected(10)
        msg = await asyncio.wait_for(session.messages.get(), 10)
        await msg.ack()
    return msg.payload


async def retained_counter(broker: Broker, name: str) -> int:
    counter: int = json.loads(await retained(broker, name))["signed"]["counter"]
    return counter


async def test_instructions_past_half_their_life_are_reissued_and_published(
    mosquitto: Broker, tmp_path: Path
) -> None:
    clock = Clock()
    fleet = FleetStore(tmp_path / "fleet.db")
    director = Director(tmp_path, lambda n, v: None, clock=clock)
    intake = MqttIntake(fleet, mosquitto.ca, mosquitto.url, mqtt311=False, director=director)
    try:
        fleet.enroll("dev-r", {}, "token", 1)
        fleet.set_desired("dev-r", {"log_level": "debug"})
        await intake.start()
        await eventually(lambda: intake.session.state.connected, 10, "intake connected")
        assert await intake.publish_desired("dev-r")
        assert await retained_counter(mosquitto, "a") == 1
        await intake.renew()  # nothing due: the retained instruction stays
        assert await retained_counter(mosquitto, "b") == 1
        clock.now += DEFAULT_TTL_S * 0.6
        await intake.renew()
        assert await retained_counter(mosquitto, "c") == 2
        # A device with the enrolment key accepts the renewed one (its clock: after the first
        # instruction's half-life, before the renewed one's expiry).
        gate = director_gate("dev-r", director.public_pem, tmp_path / "dev", required=True)
        gate.clock = clock
        payload = await retained(mosquitto, "d")
        doc, instruction = gate.screen("device", payload)
        assert doc == {"version": 1, "config": {"log_level": "debug"}}
        assert instruction is not None and instruction.counter == 2
        assert instruction.expires == int(clock.now) + DEFAULT_TTL_S
    finally:
        await intake.close()
        director.close()
        fleet.close()


def test_serve_refuses_a_ttl_under_a_minute(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cloud_sync.platform.cli", "serve", "--data-dir", str(tmp_path),
         "--port", "0", "--no-mqtt", "--director-ttl-s", "5"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("(bad_director_ttl)"), proc.stderr

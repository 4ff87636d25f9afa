"""The director's attacks end to end: a real platform (`edge-cloud serve`), a real Mosquitto and
a real agent process, with an attacker who has broker access (a client certificate with the
platform's ACL, the strongest broker position) publishing on the device's desired topic.

Each attack must be refused with its stable code, reported to the platform (an event and the
reported document's `sync.desired_error`), and leave the config in force and the function
serving. Every wait is bounded (`wait_for`), never a timing assertion.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync import topics
from cloud_sync.director_check import director_gate
from tests.director_forge import as_platform, envelope
from tests.harness import AgentProcess, http
from tests.mosquitto import Broker, platform_session
from tests.test_sync_e2e import (
    FN,
    Platform,
    enrol,
    mosquitto_platform,
    run_agent,
    start_platform,
    sync_status,
    wait_for,
)

pytestmark = pytest.mark.slow
TOPIC = topics.device_topic("edge-01", "desired")
_observers = itertools.count()


@pytest.fixture
def platforms() -> Iterator[list[Platform]]:
    made: list[Platform] = []
    yield made
    for p in made:
        p.stop()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    made: list[AgentProcess] = []
    yield made
    for a in made:
        a.stop(signal.SIGKILL if a.proc.poll() is None else signal.SIGTERM)


async def _retained(broker: Broker, topic: str) -> bytes:
    # A new client id each time: a session of its own holds no queued older messages.
    session = platform_session(broker, topic, client_id=f"edgefn-observer-{next(_observers)}")
    async with session:
        await session.wait_connected(10)
        msg = await asyncio.wait_for(session.messages.get(), 10)
        await msg.ack()
        return msg.payload


def retained(broker: Broker, topic: str = TOPIC) -> bytes:
    """The retained desired message on `topic`, as any subscriber with access sees it."""
    return asyncio.run(_retained(broker, topic))


def attack(broker: Broker, payload: bytes, topic: str = TOPIC) -> None:
    """Publish retained on the device's desired topic from a client that is not the platform."""

    async def go() -> None:
        session = platform_session(broker, client_id="edgefn-attacker")
        async with session:
            await session.wait_connected(10)
            await session.publish(topic, payload, retain=True)

    asyncio.run(go())


def refusal(agent: AgentProcess) -> str | None:
    return (sync_status(agent)["config"]["desired_error"] or {}).get("code")


def reported_refusal(plat: Platform) -> str | None:
    return ((plat.devices()["edge-01"].get("sync") or {}).get("desired_error") or {}).get("code")


def refusal_events(plat: Platform) -> list[str]:
    op = {"Authorization": "Bearer " + (plat.data_dir / "admin.token").read_text().strip()}
    url = f"{plat.url}/v1/devices/edge-01/records?kind=events"
    items = http("GET", url, headers=op).json()["records"]
    return [
        str(r["value"].get("code")) for r in items if r["value"].get("type") == "desired_rejected"
    ]


def refused_everywhere(plat: Platform, agent: AgentProcess, code: str) -> None:
    wait_for(lambda: refusal(agent) == code, f"the agent refusing with {code}")
    wait_for(lambda: reported_refusal(plat) == code, f"{code} in the reported document")
    wait_for(lambda: code in refusal_events(plat), f"a desired_rejected event with {code}")


def serving(
    plat: Platform, agent: AgentProcess, config_version: int, instances: int | None
) -> None:
    """The config in force is still `config_version`, and the function still answers."""
    assert plat.devices()["edge-01"]["config_version"]["reported"] == config_version
    resp = agent.invoke(FN, b"still here")
    assert resp.status == 200, resp.body
    fn = next(f for f in agent.get("/v1/functions").json()["functions"] if f["name"] == FN)
    assert fn["version"] == "1.0.0"
    if instances is not None:  # the warm minimum the config in force asks for
        assert fn["status"]["instances"] == instances


def configured(plat: Platform, agent: AgentProcess, version: int, min_instances: int) -> None:
    setting = f"functions.{FN}.pool.min_instances={min_instances}"
    plat.cli("device", "config", "edge-01", "--set", setting)
    wait_for(
        lambda: plat.devices()["edge-01"]["config_version"]["reported"] == version,
        f"config v{version} applied",
    )


def started(
    broker: Broker, platforms: list[Platform], agents: list[AgentProcess], tmp: Path
) -> tuple[Platform, AgentProcess, dict[str, Any]]:
    plat = mosquitto_platform(broker, platforms)
    creds = enrol(plat, "edge-01", tmp)
    doc = json.loads(creds.read_text())
    agent = run_agent(agents, tmp / "agent", creds)
    configured(plat, agent, 1, 2)
    return plat, agent, doc


def checked(doc: dict[str, Any], payload: bytes, tmp: Path) -> dict[str, Any]:
    """Verify a retained instruction as a fresh device would; returns its signed part."""
    gate = director_gate("edge-01", doc["director_key"], tmp, required=True)
    value = json.loads(payload)
    gate.check("device", value)  # raises when forged, expired, for another device
    signed: dict[str, Any] = value["signed"]
    return signed


def test_documents_are_signed_with_counters_that_grow_across_a_platform_restart(
    mosquitto: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat, agent, doc = started(mosquitto, platforms, agents, tmp_path)
    assert doc["director_key"].startswith("-----BEGIN PUBLIC KEY-----")
    first = checked(doc, retained(mosquitto), tmp_path / "v1")
    assert first["device"] == "edge-01" and first["document"]["version"] == 1
    plat.stop()
    platforms.remove(plat)
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url)
    platforms.append(plat)
    configured(plat, agent, 2, 3)
    second = checked(doc, retained(mosquitto), tmp_path / "v2")
    assert second["counter"] > first["counter"]
    assert second["document"]["version"] == 2
    accepted = sync_status(agent)["director"]["accepted"]["device"]
    assert accepted["counter"] == second["counter"]
    # The HTTP fallback hands out the very same instruction (no counter churn per poll).
    got = http("GET", f"{plat.url}/v1/devices/edge-01/desired",
               headers={"Authorization": f"Bearer {doc['token']}"}).json()  # fmt: skip
    assert got["device"]["signed"] == second
    serving(plat, agent, 2, 3)


def test_a_forged_rollback_on_the_mqtt_topic_is_refused_and_the_function_keeps_serving(
    mosquitto: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat, agent, _ = started(mosquitto, platforms, agents, tmp_path)
    rollback = {
        "version": 9,
        "config": {
            "functions": {FN: {"version": "0.0.1", "pool": {"min_instances": 0}}},
            "deployment": {"rollouts": {FN: {"rollout": "r-evil", "version": "0.0.1",
                                              "rollback": True}}},
        },
    }  # fmt: skip
    forged = envelope(Ed25519PrivateKey.generate(), "edge-01", rollback)
    attack(mosquitto, json.dumps(forged).encode())
    refused_everywhere(plat, agent, "instruction_forged")
    serving(plat, agent, 1, 2)
    # The plain document of yesterday's protocol is refused too: it carries no signature.
    attack(mosquitto, json.dumps(rollback).encode())
    refused_everywhere(plat, agent, "instruction_unsigned")
    serving(plat, agent, 1, 2)


def test_a_replayed_old_instruction_is_refused_also_after_an_agent_restart(
    mosquitto: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat, agent, _ = started(mosquitto, platforms, agents, tmp_path)
    captured = retained(mosquitto)  # validly signed: config v1, min_instances 2
    configured(plat, agent, 2, 3)
    attack(mosquitto, captured)
    refused_everywhere(plat, agent, "instruction_replayed")
    serving(plat, agent, 2, 3)
    # The accepted counter is on disk: a restarted agent (nothing in memory) that gets the
    # replay again still refuses it.
    agent.stop(signal.SIGTERM)
    agents.remove(agent)
    agent = run_agent(agents, tmp_path / "agent", tmp_path / "edge-01.json")
    wait_for(lambda: sync_status(agent)["mqtt"]["connected"], "the restarted agent connected")
    assert refusal(agent) is None
    attack(mosquitto, captured)
    wait_for(lambda: refusal(agent) == "instruction_replayed", "the replay refused after restart")
    serving(plat, agent, 2, 3)


def test_expired_and_other_devices_instructions_are_refused(
    mosquitto: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat, agent, _ = started(mosquitto, platforms, agents, tmp_path)
    enrol(plat, "edge-02", tmp_path)
    plat.cli("device", "config", "edge-02", "--set", f"functions.{FN}.pool.min_instances=0")
    for_b = retained(mosquitto, topics.device_topic("edge-02", "desired"))
    attack(mosquitto, for_b)  # genuine, but for edge-02
    refused_everywhere(plat, agent, "instruction_wrong_device")
    serving(plat, agent, 1, 2)
    # Genuinely signed with the director key, for this device, but past its expiry: what a
    # captured instruction becomes.
    old = {"version": 7, "config": {"functions": {FN: {"pool": {"min_instances": 0}}}}}
    attack(mosquitto, as_platform(plat.data_dir, "edge-01", old, expires_in_s=-60))
    refused_everywhere(plat, agent, "instruction_expired")
    serving(plat, agent, 1, 2)
    # And the platform's next real instruction still goes through.
    configured(plat, agent, 2, 1)
    wait_for(lambda: refusal(agent) is None, "the refusal cleared by an accepted instruction")


@pytest.mark.parametrize(("security", "applied"), [("tuf", False), ("signatures", True)])
def test_credentials_without_a_director_key_follow_update_security(
    mosquitto: Broker,
    tmp_path: Path,
    platforms: list[Platform],
    agents: list[AgentProcess],
    security: str,
    applied: bool,
) -> None:
    plat = mosquitto_platform(mosquitto, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    older = json.loads(creds.read_text())
    del older["director_key"]  # what a device enrolled before the director has
    creds.write_text(json.dumps(older))
    config = tmp_path / "agent.toml"
    config.write_text(f'update_security = "{security}"\n')
    agent = run_agent(agents, tmp_path / "agent", creds, "--config", str(config))
    assert sync_status(agent)["director"]["enforcing"] is (security == "tuf")
    plat.cli("device", "config", "edge-01", "--set", f"functions.{FN}.pool.min_instances=2")
    if applied:  # today's behaviour: the document inside is used, unchecked
        wait_for(lambda: plat.devices()["edge-01"]["config_version"]["reported"] == 1, "v1 applied")
        serving(plat, agent, 1, 2)
    else:
        refused_everywhere(plat, agent, "director_key_missing")
        serving(plat, agent, 0, None)

"""The whole loop on loopback: real platform (`edge-cloud serve`), real broker, real agent.

Mosquitto comes from tests/mosquitto.py (TLS, client certificates, ACL, CRL); the platform uses
that broker's CA as its own (its data dir is the fixture's `platform/` dir), so devices it enrols
are trusted by the broker. Timers are shortened through the agent's flags.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cloud_sync import topics
from tests.director_forge import as_platform
from tests.harness import FUNCTIONS, AgentProcess, http, install_dev_function, start_agent
from tests.mosquitto import Broker, platform_session

pytestmark = pytest.mark.slow

FN = "conformance-node"
BOUND_S = 60.0  # upper bound of every wait below: a bound, never a timing assertion


def wait_for(check: Callable[[], Any], what: str, within_s: float = BOUND_S) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {within_s} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Platform:
    data_dir: Path
    proc: subprocess.Popen[bytes]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "EDGEFN_TOKEN"}
        proc = subprocess.run(
            [sys.executable, "-m", "cloud_sync.platform.cli", *args, "--data-dir",
             str(self.data_dir)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"edge-cloud {args} failed: {proc.stderr}")
        return proc

    def devices(self) -> dict[str, Any]:
        return {d["id"]: d for d in json.loads(self.cli("devices", "--json").stdout)}

    def invocations(self, device: str) -> int:
        doc = json.loads(self.cli("metrics", device, "--function", FN, "--json").stdout)
        return int(doc["functions"].get(FN, {}).get("invocations", 0))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.reader is not None:
            self.reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start_platform(data_dir: Path, *extra: str) -> Platform:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_sync.platform.cli", "serve", "--data-dir", str(data_dir),
         "--port", "0", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    plat = Platform(data_dir, proc)

    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            plat.lines.append(raw.decode(errors="replace").rstrip())

    plat.reader = threading.Thread(target=pump, daemon=True)
    plat.reader.start()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError("platform exited:\n" + "\n".join(plat.lines[-30:]))
        try:
            state = json.loads((data_dir / "platform.json").read_text())
        except (OSError, ValueError):
            return False
        if state.get("pid") != proc.pid:
            return False
        plat.url = state["url"]
        return True

    wait_for(ready, "the platform to listen")
    return plat


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


def enrol(plat: Platform, device: str, tmp: Path, labels: str = "") -> Path:
    out = tmp / f"{device}.json"
    args = ["device", "enroll", device, "--out", str(out)]
    if labels:
        args += ["--labels", labels]
    plat.cli(*args)
    assert out.stat().st_mode & 0o777 == 0o600
    return out


def run_agent(agents: list[AgentProcess], data: Path, creds: Path, *flags: str) -> AgentProcess:
    if not (data / "functions" / FN).exists():
        install_dev_function(FUNCTIONS / "conformance" / "node", data, FN)
    agent = start_agent(data, "--credentials", str(creds), "--metrics-interval", "0.3", *flags)
    agents.append(agent)
    return agent


def sync_status(agent: AgentProcess) -> dict[str, Any]:
    return dict(agent.get("/v1/health").json()["sync"])


def invoke(agent: AgentProcess, n: int) -> None:
    for i in range(n):
        resp = agent.invoke(FN, f"payload-{i}".encode())
        assert resp.status == 200, resp.body


def drained(agent: AgentProcess) -> bool:
    out = sync_status(agent).get("outbox") or {}
    return out.get("records") == 0


@pytest.fixture
def broker(mosquitto_factory: Callable[..., Broker]) -> Broker:
    """Persistent like a production broker (write_broker_files' default): the platform's
    session and the QoS 1 messages queued for it survive a broker restart. A broker that
    forgets them would PUBACK a device's record and then lose it before the platform
    resubscribed."""
    return mosquitto_factory(persistence=True, autosave_on_changes=True)


def mosquitto_platform(broker: Broker, platforms: list[Platform]) -> Platform:
    plat = start_platform(broker.workdir / "platform", "--broker", broker.url)
    platforms.append(plat)
    return plat


# ---- the loop with the embedded broker (what `make run` uses) --------------------------------


def test_embedded_broker_full_loop(
    tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat = start_platform(tmp_path / "plat")
    platforms.append(plat)
    creds = enrol(plat, "edge-01", tmp_path, labels="site=lab")
    agent = run_agent(agents, tmp_path / "agent", creds)
    wait_for(lambda: plat.devices()["edge-01"]["online"], "device online")
    invoke(agent, 7)
    wait_for(lambda: plat.invocations("edge-01") == 7, "7 invocations in the platform")
    dev = plat.devices()["edge-01"]
    assert dev["functions"] == {FN: "1.0.0"}
    assert dev["labels"] == {"site": "lab"}
    # Desired config applied live: a warm minimum of 2 workers shows on the agent.
    plat.cli("device", "config", "edge-01", "--set", f"functions.{FN}.pool.min_instances=2")

    def instances() -> int:
        fns = agent.get("/v1/functions").json()["functions"]
        return int(next(f for f in fns if f["name"] == FN)["status"]["instances"])

    wait_for(lambda: instances() == 2, "pool resized to 2 workers")
    wait_for(
        lambda: plat.devices()["edge-01"]["config_version"] == {"desired": 1, "reported": 1},
        "config version reported",
    )


# ---- Mosquitto with TLS + ACL + CRL ------------------------------------------------------------


def test_broker_down_at_start_then_up(
    broker: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat = mosquitto_platform(broker, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    broker.stop()
    agent = run_agent(agents, tmp_path / "agent", creds)
    invoke(agent, 5)  # serves locally with no broker
    status = sync_status(agent)
    assert status["transport"] == "waiting" and status["mqtt"]["connected"] is False
    assert status["mqtt"]["last_error_code"] == "broker_unreachable"
    broker.start()
    wait_for(lambda: sync_status(agent)["transport"] == "mqtt", "MQTT after the broker started")
    wait_for(lambda: plat.invocations("edge-01") == 5, "metrics kept while offline arrive")


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    broker: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat = mosquitto_platform(broker, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    agent = run_agent(agents, tmp_path / "agent", creds)
    wait_for(lambda: sync_status(agent)["transport"] == "mqtt", "MQTT up")
    total = 0
    for _ in range(3):
        invoke(agent, 10)
        total += 10
        broker.restart(crash=True)
        invoke(agent, 5)
        total += 5
    wait_for(lambda: sync_status(agent)["transport"] == "mqtt", "MQTT back")
    wait_for(lambda: drained(agent), "outbox drained")
    wait_for(lambda: plat.invocations("edge-01") >= total, f"{total} invocations stored")
    assert plat.invocations("edge-01") == total  # nothing twice


def test_revoked_or_foreign_certificate_is_refused_and_the_agent_keeps_serving(
    mosquitto: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    from cloud_sync import credentials
    from cloud_sync.platform.pki import PlatformCA

    plat = mosquitto_platform(mosquitto, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    plat.cli("device", "revoke", "edge-01")
    mosquitto.files.refresh_crl(mosquitto.ca)
    mosquitto.reload()
    agent = run_agent(agents, tmp_path / "agent", creds)
    wait_for(
        lambda: sync_status(agent)["mqtt"]["last_error_code"] == "certificate_revoked",
        "status names the revoked certificate",
    )
    invoke(agent, 3)
    assert sync_status(agent)["mqtt"]["connects"] == 0

    # A certificate from another CA, for an enrolled id: the broker refuses it too.
    enrol(plat, "edge-02", tmp_path)
    other_ca = PlatformCA.load_or_create(tmp_path / "other-ca")
    good = credentials.load(tmp_path / "edge-02.json")
    issued = other_ca.issue_device_cert("edge-02")
    doc = json.loads((tmp_path / "edge-02.json").read_text())
    doc.update(cert_pem=issued.cert_pem, key_pem=issued.key_pem, ca_pem=good.ca_pem)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(doc))
    wrong.chmod(0o600)
    agent2 = run_agent(agents, tmp_path / "agent2", wrong)
    wait_for(
        lambda: sync_status(agent2)["mqtt"]["last_error_code"] == "certificate_rejected",
        "status names the rejected certificate",
    )
    invoke(agent2, 2)


def test_kill_9_with_unsent_records_resends_them_once(
    broker: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat = mosquitto_platform(broker, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    data = tmp_path / "agent"
    agent = run_agent(agents, data, creds)
    wait_for(lambda: sync_status(agent)["transport"] == "mqtt", "MQTT up")
    invoke(agent, 4)
    wait_for(lambda: plat.invocations("edge-01") == 4, "first batch stored")
    broker.stop()
    invoke(agent, 6)
    # Wait until a metrics record with the 6 is in the outbox, unsent, then kill -9.
    wait_for(
        lambda: any(FN in json.loads(x)["functions"] for x in _outbox_payloads(data)),
        "unsent metrics in the outbox",
    )
    agent.stop(signal.SIGKILL)
    broker.start()
    agent = run_agent(agents, data, creds)
    # The platform's own MQTT session reconnects with a backoff that may have grown toward
    # cloud_sync.mqtt.RECONNECT_MAX_S (60 s) while the broker was down: bound the waits above it.
    wait_for(lambda: drained(agent), "outbox drained after restart", within_s=150)
    wait_for(lambda: plat.invocations("edge-01") >= 10, "all 10 invocations stored", within_s=150)
    assert plat.invocations("edge-01") == 10


def _outbox_payloads(data: Path) -> list[str]:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{data / 'outbox.db'}?mode=ro", uri=True, timeout=1) as db:
            rows = db.execute("SELECT payload FROM records WHERE kind='metrics'").fetchall()
    except sqlite3.Error:
        return []
    return [bytes(r[0]).decode() for r in rows]


def test_compressed_outage_switches_to_http_and_back(
    broker: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat = mosquitto_platform(broker, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    bound = 64 * 1024
    agent = run_agent(
        agents, tmp_path / "agent", creds, "--fallback-after", "1", "--outbox-max-bytes",
        str(bound),
    )  # fmt: skip
    wait_for(lambda: sync_status(agent)["transport"] == "mqtt", "MQTT up")
    invoke(agent, 3)
    wait_for(lambda: plat.invocations("edge-01") == 3, "records sent over MQTT")
    broker.stop()
    wait_for(lambda: sync_status(agent)["transport"] == "http", "HTTP fallback")
    invoke(agent, 8)
    wait_for(lambda: plat.invocations("edge-01") == 11, "records pushed over HTTP")
    # Desired state reaches the device over HTTP while the broker is down.
    plat.cli("device", "config", "edge-01", "--set", f"functions.{FN}.routing=local")
    wait_for(
        lambda: sync_status(agent)["config"]["applied"]["device_version"] == 1,
        "config pulled over HTTP",
    )
    broker.start()
    wait_for(lambda: sync_status(agent)["transport"] == "mqtt", "back on MQTT")
    invoke(agent, 4)
    wait_for(lambda: drained(agent), "outbox drained")
    wait_for(lambda: plat.invocations("edge-01") >= 15, "all 15 stored")
    status = sync_status(agent)
    assert plat.invocations("edge-01") == 15
    transport_lines = [line for line in agent.lines if "sync: transport" in line]
    assert status["switches"] >= 2, transport_lines  # mqtt -> http -> mqtt
    assert status["outbox"]["bytes"] <= bound
    records = json.loads(plat.cli("metrics", "edge-01", "--json").stdout)["records"]
    assert records > 0


def test_malformed_desired_documents_are_rejected_and_reported(
    mosquitto: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    import asyncio

    plat = mosquitto_platform(mosquitto, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    agent = run_agent(agents, tmp_path / "agent", creds)
    plat.cli("device", "config", "edge-01", "--set", f"functions.{FN}.pool.min_instances=2")
    wait_for(lambda: plat.devices()["edge-01"]["config_version"]["reported"] == 1, "v1 applied")
    topic = topics.device_topic("edge-01", "desired")

    async def publish(payload: bytes) -> None:
        session = platform_session(mosquitto, client_id="edgefn-platform-test")
        async with session:
            await session.wait_connected(10)
            await session.publish(topic, payload, retain=True)

    bad = {"version": 5, "config": {"functions": {FN: {"routing": "sideways"}}}}
    # Signed as the platform signs (the director key): the config check is what refuses it.
    asyncio.run(publish(as_platform(plat.data_dir, "edge-01", bad)))
    wait_for(lambda: plat.devices()["edge-01"]["config_status"] == "rejected", "rejection reported")
    dev = plat.devices()["edge-01"]
    assert "routing" in json.dumps(dev["config_error"])
    assert dev["config_version"]["reported"] == 1  # the previous config stays in force
    asyncio.run(publish(b"{not json"))
    wait_for(
        lambda: (
            (sync_status(agent)["config"]["desired_error"] or {}).get("code") == "bad_desired_json"
        ),
        "bad JSON reported",
    )
    fns = agent.get("/v1/functions").json()["functions"]
    assert next(f for f in fns if f["name"] == FN)["status"]["instances"] == 2
    op = {"Authorization": "Bearer " + (plat.data_dir / "admin.token").read_text().strip()}

    def rejections() -> int:
        url = f"{plat.url}/v1/devices/edge-01/records?kind=events"
        items = http("GET", url, headers=op).json()["records"]
        return sum(1 for r in items if r["value"].get("type") == "desired_rejected")

    wait_for(lambda: rejections() >= 2, "both rejections stored as events")


# ---- building blocks: publish (docs/building-blocks.md) -------------------------------------


def _function_events(plat: Platform, device: str) -> list[dict[str, Any]]:
    out = plat.cli("events", device, "--function", "route", "--json").stdout
    return list(json.loads(out)["events"])


def test_publish_during_an_outage_and_a_kill_9_arrives_exactly_once(
    broker: Broker, tmp_path: Path, platforms: list[Platform], agents: list[AgentProcess]
) -> None:
    plat = mosquitto_platform(broker, platforms)
    creds = enrol(plat, "edge-01", tmp_path)
    data = tmp_path / "agent"
    route = data / "functions" / "route"
    install_dev_function(FUNCTIONS / "conformance" / "node", data, "route")
    (route / "edgefn.toml").write_text(
        'name = "route"\nversion = "1.0.0"\nruntime = "node"\nentry = "handler.js"\n'
        '[permissions]\npublish = ["traffic/#"]\n'
    )
    agent = run_agent(agents, data, creds)
    wait_for(lambda: sync_status(agent)["transport"] == "mqtt", "MQTT up")

    def publish(first: int, n: int) -> None:
        calls = [
            {"op": "publish", "target": f"traffic/seg{i}", "payload": f"jam-{i}"}
            for i in range(first, first + n)
        ]
        body = json.dumps({"op": "blocks", "calls": calls}).encode()
        resp = agent.invoke("route", body, headers={"Content-Type": "application/json"})
        assert resp.status == 200, resp.body
        # The call returned once durable: each publish answered without an error.
        assert json.loads(resp.body)["results"] == [{"value": ""}] * n

    publish(0, 2)
    wait_for(lambda: len(_function_events(plat, "edge-01")) == 2, "first events stored")
    # Broker and platform down: nothing can leave the device.
    broker.stop()
    plat.stop()
    publish(2, 5)
    agent.stop(signal.SIGKILL)  # with the 5 still in the outbox
    broker.start()
    plat = mosquitto_platform(broker, platforms)
    agent = run_agent(agents, data, creds)
    wait_for(lambda: drained(agent), "outbox drained after restart")
    wait_for(lambda: len(_function_events(plat, "edge-01")) >= 7, "all 7 events stored")
    events = _function_events(plat, "edge-01")
    assert sorted(e["topic"] for e in events) == sorted(f"traffic/seg{i}" for i in range(7))
    assert all(e["function"] == "route" and e["version"] == "1.0.0" for e in events)
    assert {e["size"] for e in events} == {5}

"""The agent's deployer, end to end: a real agent process, the real platform, a real Mosquitto.

The test plays the rollout controller: it writes a device's desired document through the
platform API the `edge-cloud device config` CLI uses (`functions.<f>.version` plus the
`deployment.rollouts.<f>` entry, what the controller's SetDesired writes), and reads the
device's status reports back from the platform's store. The pure parts (health verdicts, code
mapping, the state file, config validation) are tested on values first.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.errors import ConfigError, MetricsFormatError
from cloud_sync.metrics_record import METRICS_SCHEMA, merge_metrics
from cloud_sync.registry_client import RegistryUnreachable
from cloud_sync.rollout.messages import StatusReport, decode_status
from cloud_sync.rollout.states import DeviceState
from cloud_sync.state import ConfigTracker, DesiredDoc, reported_document, validate_config
from edge_agent.deployer_health import CRASH_LIMIT, ERROR_MIN_CALLS, HealthSample, judge
from edge_agent.deployer_install import classify
from edge_agent.deployer_state import MAX_ATTEMPTS, STATE_FILE, DeployerState
from edge_agent.staging import InstallError
from runtimes.errors import BundleError
from tests.harness import AgentProcess, children_of, pid_alive, start_agent
from tests.mosquitto import Broker
from tests.registry_helpers import (
    Platform,
    agent_cli,
    build,
    cli,
    ok,
    publish,
    set_version,
    start_platform,
)

FN = "echo"
BOUND_S = 90.0  # every wait below is bounded by this; never a timing assertion
S = DeviceState

# ---- pure parts ----------------------------------------------------------------------------


def test_health_verdicts() -> None:
    v = "1.1.0"
    first = HealthSample(v, restarts=2, invocations=100, errors=3)
    assert judge(v, first, first, 0.5) is None
    crashed = judge(v, first, HealthSample(v, 2 + CRASH_LIMIT, 103, 6), 1.0)
    assert crashed is not None and crashed.code == "crash_loop"
    # Restarts of a new pool start at 0 again: counted from there, not negative.
    before = HealthSample(v, restarts=CRASH_LIMIT + 5, invocations=0, errors=0)
    assert judge(v, before, HealthSample(v, CRASH_LIMIT, 0, 0), 1.0) is not None
    few = HealthSample(v, 2, 100 + ERROR_MIN_CALLS - 1, 3 + ERROR_MIN_CALLS - 1)
    assert judge(v, first, few, 1.0) is None  # too few calls to decide
    bad = HealthSample(v, 2, 100 + ERROR_MIN_CALLS, 3 + ERROR_MIN_CALLS)
    verdict = judge(v, first, bad, 1.0)
    assert verdict is not None and verdict.code == "error_rate"
    old = HealthSample("1.0.0", 0, 0, 0, problem="worker exited during start")
    assert judge(v, old, old, 1.0) is None  # the reload may still be under way
    late = judge(v, old, old, 60.0)
    assert late is not None and late.code == "worker_start_failed"
    assert "worker exited during start" in late.message


def test_installer_errors_become_stable_codes() -> None:
    assert classify(BundleError("x", code="wrong_arch")).code == "wrong_arch"
    assert classify(BundleError("x", code="wrong_arch")).state is S.REJECTED
    assert classify(BundleError("x", code="unknown_signer")).code == "signature"
    assert classify(BundleError("x", code="downgrade")).code == "downgrade_refused"
    assert classify(InstallError("x", code="no_space")).code == "disk_full"
    failed = classify(RegistryUnreachable("registry down"))
    assert (failed.state, failed.code) == (S.FAILED, "download_failed")
    assert classify(OSError("disk on fire")).code == "install_failed"


def test_damaged_state_file_is_set_aside_and_seq_stays_above_the_old_one(tmp_path: Path) -> None:
    state = DeployerState.load(tmp_path)
    state.refused["echo"] = "1.1.0"
    first = state.next_seq()
    state.save()
    again = DeployerState.load(tmp_path)
    assert again.refused == {"echo": "1.1.0"} and again.seq == first
    (tmp_path / STATE_FILE).write_bytes(b'{"seq": 5, "step": ')  # torn by a broken disk
    fresh = DeployerState.load(tmp_path)
    assert fresh.refused == {}
    assert fresh.seq >= first  # a lost counter restarts from the clock, never below
    assert len(list(tmp_path.glob(f"{STATE_FILE}.damaged-*"))) == 1


def test_desired_deployment_keys_are_checked_not_ignored() -> None:
    entry = {"rollout": "r-1", "version": "1.1.0", "rollback": False}
    good = validate_config(
        {"functions": {FN: {"version": "1.1.0"}}, "deployment": {"rollouts": {FN: entry}}}
    )
    assert good.functions[FN].version == "1.1.0"
    with pytest.raises(ConfigError) as exc:
        validate_config({"deployment": {"strategy": "fast", "rollouts": {}}})
    assert [f.path for f in exc.value.fields] == ["deployment.strategy"]
    with pytest.raises(ConfigError) as exc:  # the rollout entry and the version disagree
        validate_config(
            {"functions": {FN: {"version": "1.2.0"}}, "deployment": {"rollouts": {FN: entry}}}
        )
    assert "disagrees" in str(exc.value.to_dict())


def test_a_refused_deployment_key_reaches_the_reported_document() -> None:
    tracker = ConfigTracker()
    outcome = tracker.offer(None, DesiredDoc(3, {"deployment": {"strategy": "fast"}}))
    assert outcome.status == "rejected"
    doc = reported_document("edge-1", 1, tracker)
    assert doc["status"] == "rejected"
    assert "device:deployment.strategy" in json.dumps(doc["error"])


def test_metrics_of_two_versions_never_merge() -> None:
    def record(start: float, version: str) -> dict[str, Any]:
        return {
            "schema": METRICS_SCHEMA, "device": "edge-1", "interval_start": start,
            "interval_end": start + 1, "functions": {FN: {"invocations": 3, "errors": 1}},
            "versions": {FN: version},
        }  # fmt: skip

    same = merge_metrics(record(0, "1.0.0"), record(1, "1.0.0"))
    assert same["versions"] == {FN: "1.0.0"} and same["functions"][FN]["invocations"] == 6
    with pytest.raises(MetricsFormatError, match="different versions"):
        merge_metrics(record(0, "1.0.0"), record(1, "1.1.0"))


# ---- against the real platform, broker and agent -------------------------------------------


@dataclass
class Bundles:
    key: Path
    paths: dict[str, Path]


CRASHING = "0.3.0"  # starts (passes the warm check) and dies on every call


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("deployer-bundles")
    key = root / "publisher.key"
    ok(cli("keys", "create", "--out", key))
    fn_dir = root / FN
    ok(cli("fn", "new", FN, "--runtime", "node", "--dir", fn_dir))
    (fn_dir / "handler.test.js").unlink()
    paths = {}
    for version in ("0.1.0", "0.2.0", CRASHING):
        if version == CRASHING:
            (fn_dir / "handler.js").write_text(
                "'use strict';\nexports.handler = async () => { process.exit(3); };\n"
            )
        set_version(fn_dir, version)
        paths[version] = build(fn_dir, key, root / f"{FN}-{version}.efb")
    return Bundles(key, paths)


@pytest.fixture
def platform(mosquitto: Broker, bundles: Bundles) -> Iterator[Platform]:
    plat = start_platform(mosquitto.workdir / "platform", "--broker", mosquitto.url)
    try:
        for bundle in bundles.paths.values():
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


def wait_for(check: Callable[[], Any], what: str, within_s: float = BOUND_S) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {within_s} s waiting for {what}")
        time.sleep(0.1)


def link_logs(agent: AgentProcess, plat: Platform, last: int = 40) -> str:
    """The agent's and the platform's MQTT, sync and deployer log lines: why a wait failed."""
    keys = ("cloud_sync.mqtt", "edgefn.sync", "edgefn.deployer", "edgefn.intake", "ERROR")
    parts = []
    for name, lines in (("agent", agent.lines), ("platform", plat.lines)):
        kept = [line for line in list(lines) if any(k in line for k in keys)]
        parts.append(f"---- {name} log (last {last} MQTT/sync lines)\n" + "\n".join(kept[-last:]))
    return "\n".join(parts)


def api(plat: Platform, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        plat.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {plat.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def desire(plat: Platform, device: str, version: str, rollout: str, rollback: bool = False) -> None:
    entry = {"rollout": rollout, "version": version, "rollback": rollback}
    sets = {f"functions.{FN}.version": version, f"deployment.rollouts.{FN}": entry}
    api(plat, "POST", f"/v1/devices/{device}/config", {"set": sets})


def reports(plat: Platform, device: str, rollout: str | None = None) -> list[StatusReport]:
    doc = api(plat, "GET", f"/v1/devices/{device}/records?kind=rollout&limit=500")
    out = sorted((decode_status(r["value"]) for r in doc["records"]), key=lambda r: r.seq)
    return [r for r in out if rollout is None or r.rollout == rollout]


def states(plat: Platform, device: str, rollout: str) -> list[tuple[S, str | None]]:
    return [(r.state, r.code) for r in reports(plat, device, rollout)]


def final(
    plat: Platform, device: str, rollout: str, after_seq: int = 0
) -> tuple[S, str | None] | None:
    """The last report of `rollout` when it is a finished one (and newer than `after_seq`)."""
    seen = [r for r in reports(plat, device, rollout) if r.seq > after_seq]
    terminal = {S.HEALTHY, S.FAILED, S.REJECTED, S.ROLLED_BACK, S.CANCELED}
    return (seen[-1].state, seen[-1].code) if seen and seen[-1].state in terminal else None


def last_seq(plat: Platform, device: str) -> int:
    return max((r.seq for r in reports(plat, device)), default=0)


def device(
    plat: Platform, bundles: Bundles, tmp: Path, agents: list[AgentProcess], name: str,
    env: dict[str, str] | None = None, *flags: str,
) -> tuple[Path, Path, AgentProcess]:  # fmt: skip
    creds = tmp / f"{name}.json"
    ok(cli("device", "enroll", name, "--out", creds, "--data-dir", plat.data_dir))
    data = tmp / name
    ok(agent_cli("trust", "add", f"{bundles.key}.pub", "--data-dir", data))
    agent = run(agents, data, creds, env, *flags)
    return data, creds, agent


def run(
    agents: list[AgentProcess], data: Path, creds: Path, env: dict[str, str] | None = None,
    *flags: str,
) -> AgentProcess:  # fmt: skip
    saved = dict(os.environ)
    os.environ.update({"EDGEFN_DEPLOY_HEALTH_WINDOW_S": "1.5", **(env or {})})
    try:
        agent = start_agent(data, "--credentials", str(creds), "--metrics-interval", "0.3", *flags)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    agents.append(agent)
    return agent


def active(data: Path) -> str | None:
    try:
        return (data / "functions" / FN / "active").read_text().strip()
    except FileNotFoundError:
        return None


def served_version(agent: AgentProcess) -> str | None:
    resp = agent.invoke(FN, b"x")
    return resp.headers.get("X-Edgefn-Version") if resp.status == 200 else None


@pytest.mark.slow
def test_install_report_every_step_healthy_then_crash_rolls_back_and_is_not_retried(
    platform: Platform, bundles: Bundles, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    # A window long enough for three crashes through the pool's restart backoff on a busy box.
    env = {"EDGEFN_DEPLOY_HEALTH_WINDOW_S": "10"}
    data, _, agent = device(platform, bundles, tmp_path, agents, "edge-d1", env)
    desire(platform, "edge-d1", "0.1.0", "r-first")
    assert wait_for(lambda: final(platform, "edge-d1", "r-first"), "first install") == (
        S.HEALTHY,
        None,
    )
    seen = [s for s, _ in states(platform, "edge-d1", "r-first")]
    assert seen == [S.DOWNLOADING, S.INSTALLING, S.WARMING, S.ACTIVE, S.HEALTHY]
    assert wait_for(lambda: served_version(agent) == "0.1.0", "0.1.0 served")

    desire(platform, "edge-d1", "0.2.0", "r-second")
    assert wait_for(lambda: final(platform, "edge-d1", "r-second"), "upgrade")[0] is S.HEALTHY
    assert wait_for(lambda: served_version(agent) == "0.2.0", "0.2.0 served")
    last = reports(platform, "edge-d1", "r-second")[-1]
    assert last.previous == "0.1.0" and last.version == "0.2.0"

    # The reported document repeats the latest report per function (heals a lost report).
    def reported_rollout() -> Any:
        doc = api(platform, "GET", "/v1/devices/edge-d1/records?kind=reported&limit=500")
        if not doc["records"]:
            return None
        newest = max((r["value"] for r in doc["records"]), key=lambda v: v["version"])
        return (newest.get("rollouts") or {}).get(FN)

    assert wait_for(lambda: (reported_rollout() or {}).get("rollout") == "r-second", "reported")

    # Metrics carry the version that ran, so the platform's gates can compare versions.
    def versions_in_metrics() -> bool:
        doc = api(platform, "GET", "/v1/devices/edge-d1/records?kind=metrics&limit=500")
        return any(
            (r["value"].get("versions") or {}).get(FN) == "0.2.0"
            and FN in r["value"].get("functions", {})
            for r in doc["records"]
        )

    assert wait_for(versions_in_metrics, "a metrics record of 0.2.0")

    # A version that starts but dies on every call: crash loop in the health window.
    desire(platform, "edge-d1", CRASHING, "r-bad")
    wait_for(lambda: (S.ACTIVE, None) in states(platform, "edge-d1", "r-bad"), "bad active")

    def crash_some() -> Any:
        agent.invoke(FN, b"boom")
        return final(platform, "edge-d1", "r-bad")

    assert wait_for(crash_some, "the crash loop to be caught") == (S.FAILED, "crash_loop")
    assert active(data) == "0.2.0"
    assert wait_for(lambda: served_version(agent) == "0.2.0", "0.2.0 served again")

    # The bad version's crashes reach the platform under its own name (the crash_count gate).
    def crashes_of_the_bad_version() -> bool:
        doc = api(platform, "GET", "/v1/devices/edge-d1/records?kind=metrics&limit=500")
        return any(
            (r["value"].get("versions") or {}).get(FN) == CRASHING
            and r["value"]["functions"].get(FN, {}).get("restarts", 0) >= 1
            for r in doc["records"]
        )

    assert wait_for(crashes_of_the_bad_version, "restarts of the crashing version in metrics")
    # Not retried while the desired document keeps naming it (another change re-applies it).
    count = len(reports(platform, "edge-d1"))
    api(platform, "POST", "/v1/devices/edge-d1/config", {"set": {"log_level": "debug"}})
    wait_for(
        lambda: agent.get("/v1/health").json()["sync"]["config"]["applied"]["device_version"] >= 4,
        "the unrelated change applied",
    )
    assert wait_for(lambda: agent.get("/v1/health").json()["deployer"]["idle"], "deployer idle")
    assert len(reports(platform, "edge-d1")) == count
    assert agent.get("/v1/health").json()["deployer"]["refused"] == {FN: CRASHING}

    # The platform's rollback: back down with the rollback flag.
    seq = last_seq(platform, "edge-d1")
    desire(platform, "edge-d1", "0.1.0", "r-second", rollback=True)
    assert wait_for(lambda: final(platform, "edge-d1", "r-second", seq), "rollback") == (
        S.ROLLED_BACK,
        None,
    )
    assert active(data) == "0.1.0"
    # A downgrade no rollout asked for is refused.
    desire(platform, "edge-d1", "0.1.0", "r-second")
    desire(platform, "edge-d1", "0.2.0", "r-up")
    wait_for(lambda: final(platform, "edge-d1", "r-up"), "up again")
    desire(platform, "edge-d1", "0.1.0", "r-down")
    assert wait_for(lambda: final(platform, "edge-d1", "r-down"), "downgrade") == (
        S.REJECTED,
        "downgrade_refused",
    )
    assert active(data) == "0.2.0"
    seqs = [r.seq for r in reports(platform, "edge-d1")]
    assert seqs == sorted(set(seqs))  # increasing, no report stored twice


@pytest.mark.slow
def test_broker_down_during_the_health_window_still_rolls_back_and_reports_once(
    mosquitto: Broker,
    platform: Platform,
    bundles: Bundles,
    tmp_path: Path,
    agents: list[AgentProcess],
) -> None:
    env = {"EDGEFN_DEPLOY_HEALTH_WINDOW_S": "20"}  # the outage starts inside the window
    data, _, agent = device(platform, bundles, tmp_path, agents, "edge-d2", env)
    desire(platform, "edge-d2", "0.1.0", "r-one")
    wait_for(lambda: final(platform, "edge-d2", "r-one"), "first install")
    desire(platform, "edge-d2", CRASHING, "r-crash")
    wait_for(lambda: (S.ACTIVE, None) in states(platform, "edge-d2", "r-crash"), "crash active")
    mosquitto.stop()

    def rolled_back_locally() -> bool:
        agent.invoke(FN, b"boom")
        return active(data) == "0.1.0" and served_version(agent) == "0.1.0"

    assert wait_for(rolled_back_locally, "a local rollback with the broker down")

    # Both the agent and the platform reconnect with a backoff that grows to 60 s
    # (cloud_sync.mqtt.RECONNECT_MAX_S), in either order. This broker has no persistence: it
    # restarts without the platform's session, and until the platform has subscribed again it
    # answers the device's publishes "no matching subscribers" (0x10). The worse order, made
    # certain by stopping the platform: the agent publishes its report to nobody first, keeps
    # it and probes again (cloud_sync.sync.UNHEARD_MAX_S) until the platform is back.
    def unheard() -> bool:
        return bool(agent.get("/v1/health").json()["sync"]["mqtt"]["no_subscriber_rounds"])

    os.kill(platform.proc.pid, signal.SIGSTOP)
    try:
        mosquitto.start()
        wait_for(unheard, "the agent to publish to a broker nobody subscribes on")
    finally:
        os.kill(platform.proc.pid, signal.SIGCONT)
    try:
        report = wait_for(lambda: final(platform, "edge-d2", "r-crash"), "the report", 180)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{link_logs(agent, platform)}") from None
    assert report == (
        S.FAILED,
        "crash_loop",
    )
    wait_for(lambda: agent.get("/v1/health").json()["sync"]["outbox"]["records"] == 0, "drain")
    keys = [(r.seq, r.state) for r in reports(platform, "edge-d2", "r-crash")]
    assert len(keys) == len(set(keys))  # delivered once


@pytest.mark.slow
def test_newest_desired_wins_and_a_health_window_is_interrupted(
    platform: Platform, bundles: Bundles, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    env = {"EDGEFN_DEPLOY_HEALTH_WINDOW_S": "600"}  # longer than every bound below
    data, _, _ = device(platform, bundles, tmp_path, agents, "edge-d3", env)
    desire(platform, "edge-d3", "0.1.0", "r-a")
    wait_for(lambda: (S.ACTIVE, None) in states(platform, "edge-d3", "r-a"), "0.1.0 active")
    desire(platform, "edge-d3", "0.2.0", "r-b")
    wait_for(lambda: (S.ACTIVE, None) in states(platform, "edge-d3", "r-b"), "0.2.0 active")
    assert active(data) == "0.2.0"
    # r-a never finished its window: the newer entry took over (no healthy for it).
    assert [s for s, _ in states(platform, "edge-d3", "r-a")][-1] is S.ACTIVE

    # A deployment key the agent would not act on is refused with the reason: the platform
    # checks with the agent's own rules (cloud_sync.state), so the operator hears it at once.
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(platform, "POST", "/v1/devices/edge-d3/config", {"set": {"deployment.strategy": "x"}})
    assert refused.value.code == 422
    assert "deployment.strategy" in refused.value.read().decode()
    assert active(data) == "0.2.0"


@pytest.mark.slow
@pytest.mark.parametrize("step", ["download", "unpack", "switch"])
def test_kill_9_mid_deployment_then_restart_finishes_with_one_version_active(
    platform: Platform, bundles: Bundles, tmp_path: Path, agents: list[AgentProcess], step: str
) -> None:
    name = f"edge-k{step[:2]}"
    data, creds, agent = device(platform, bundles, tmp_path, agents, name)
    desire(platform, name, "0.1.0", "r-base")
    wait_for(lambda: final(platform, name, "r-base"), "the base version")
    agent.stop()
    marker = tmp_path / f"paused-{step}"
    pause = {"EDGEFN_INSTALL_PAUSE_AT": step, "EDGEFN_INSTALL_PAUSE_MARKER": str(marker)}
    agent = run(agents, data, creds, pause)
    desire(platform, name, "0.2.0", "r-kill")
    wait_for(marker.exists, f"the install to reach {step}")
    workers = list(children_of(agent.proc.pid))
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(10)
    wait_for(lambda: not any(pid_alive(w) for w in workers), "workers to die with the agent", 15)
    assert active(data) == "0.1.0"  # before the rename of `active`: the old one

    agent = run(agents, data, creds)
    assert wait_for(lambda: final(platform, name, "r-kill"), "the step to finish") == (
        S.HEALTHY,
        None,
    )
    assert active(data) == "0.2.0"
    assert wait_for(lambda: served_version(agent) == "0.2.0", "0.2.0 served")
    root = data / "functions" / FN
    assert not [p.name for p in root.iterdir() if p.name.startswith((".staging", ".trash"))]
    assert sorted(p.name for p in root.iterdir() if p.name[0].isdigit()) == ["0.1.0", "0.2.0"]


@pytest.mark.slow
def test_http_fallback_carries_desired_reports_and_metrics(
    mosquitto: Broker,
    platform: Platform,
    bundles: Bundles,
    tmp_path: Path,
    agents: list[AgentProcess],
) -> None:
    mosquitto.stop()  # MQTT off from the start: only the HTTP fallback is left
    _, _, agent = device(
        platform, bundles, tmp_path, agents, "edge-h1", None, "--fallback-after", "0.5"
    )
    desire(platform, "edge-h1", "0.1.0", "r-http")
    assert wait_for(lambda: final(platform, "edge-h1", "r-http"), "install over HTTP") == (
        S.HEALTHY,
        None,
    )
    assert wait_for(lambda: served_version(agent) == "0.1.0", "0.1.0 served")
    # An operator's pin, no rollout: the CLI form; reported with rollout null.
    ok(
        cli(
            "device", "config", "edge-h1", "--set", f"functions.{FN}.version=0.2.0",
            "--set", f"deployment.rollouts.{FN}=null", "--data-dir", platform.data_dir,
        )
    )  # fmt: skip

    def pinned() -> bool:
        mine = [r for r in reports(platform, "edge-h1") if r.rollout is None]
        return bool(mine) and (mine[-1].state, mine[-1].version) == (S.HEALTHY, "0.2.0")

    assert wait_for(pinned, "the operator's pin over HTTP")
    assert wait_for(lambda: served_version(agent) == "0.2.0", "0.2.0 served")
    doc = api(platform, "GET", "/v1/devices/edge-h1/records?kind=rollout&limit=50")
    assert {r["via"] for r in doc["records"]} == {"http"}


@pytest.mark.slow
def test_kill_9_in_the_health_window_then_restart_watches_again_and_finishes(
    platform: Platform, bundles: Bundles, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    env = {"EDGEFN_DEPLOY_HEALTH_WINDOW_S": "600"}  # still watching when it is killed
    data, creds, agent = device(platform, bundles, tmp_path, agents, "edge-kw", env)
    desire(platform, "edge-kw", "0.1.0", "r-window")
    wait_for(lambda: (S.ACTIVE, None) in states(platform, "edge-kw", "r-window"), "active")
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(10)
    agent = run(agents, data, creds)  # the default test window: short
    assert wait_for(lambda: final(platform, "edge-kw", "r-window"), "the window to end") == (
        S.HEALTHY,
        None,
    )
    assert active(data) == "0.1.0"
    assert wait_for(lambda: served_version(agent) == "0.1.0", "0.1.0 served")


@pytest.mark.slow
def test_a_step_that_keeps_killing_the_agent_ends_as_interrupted(
    platform: Platform, bundles: Bundles, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    data, creds, agent = device(platform, bundles, tmp_path, agents, "edge-ki")
    desire(platform, "edge-ki", "0.1.0", "r-base")
    wait_for(lambda: final(platform, "edge-ki", "r-base"), "the base version")
    agent.stop()
    desire(platform, "edge-ki", "0.2.0", "r-loop")
    for attempt in range(MAX_ATTEMPTS):
        marker = tmp_path / f"paused-{attempt}"
        pause = {"EDGEFN_INSTALL_PAUSE_AT": "unpack", "EDGEFN_INSTALL_PAUSE_MARKER": str(marker)}
        agent = run(agents, data, creds, pause)
        wait_for(marker.exists, f"attempt {attempt + 1} to reach unpack")
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(10)
    agent = run(agents, data, creds)
    assert wait_for(lambda: final(platform, "edge-ki", "r-loop"), "the step to give up") == (
        S.FAILED,
        "interrupted",
    )
    assert active(data) == "0.1.0"
    assert wait_for(lambda: served_version(agent) == "0.1.0", "0.1.0 still served")
    assert agent.get("/v1/health").json()["deployer"]["refused"] == {FN: "0.2.0"}


@pytest.mark.slow
def test_a_desired_change_while_the_agent_was_down_wins_after_the_restart(
    platform: Platform, bundles: Bundles, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    data, creds, agent = device(platform, bundles, tmp_path, agents, "edge-ks")
    desire(platform, "edge-ks", "0.1.0", "r-base")
    wait_for(lambda: final(platform, "edge-ks", "r-base"), "the base version")
    agent.stop()
    marker = tmp_path / "paused-download"
    pause = {"EDGEFN_INSTALL_PAUSE_AT": "download", "EDGEFN_INSTALL_PAUSE_MARKER": str(marker)}
    agent = run(agents, data, creds, pause)
    desire(platform, "edge-ks", "0.2.0", "r-old")
    wait_for(marker.exists, "the install to reach download")
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(10)
    desire(platform, "edge-ks", CRASHING, "r-new")  # while the device is down
    agent = run(agents, data, creds)
    assert wait_for(lambda: final(platform, "edge-ks", "r-new"), "the newest entry") == (
        S.HEALTHY,  # nobody calls it: its crashes never show
        None,
    )
    # The saved desired config is applied at start, before the broker redelivers the newer
    # one: the old step is either finished first or canceled, never left open.
    assert final(platform, "edge-ks", "r-old") in {(S.HEALTHY, None), (S.CANCELED, "superseded")}
    assert active(data) == CRASHING
    assert wait_for(lambda: served_version(agent) is None, "the crashing version serving")

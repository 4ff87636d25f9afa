"""The agent as a user runs it: a real `edge-agent run` process, real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    FUNCTIONS,
    AgentProcess,
    children_of,
    http,
    install_dev_function,
    pid_alive,
    start_agent,
    write_manifest,
)

CONFORMANCE_NODE = FUNCTIONS / "conformance" / "node"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    broken = data / "functions" / "broken"
    write_manifest(broken, name="broken", version="1.0", runtime="node", entry="index.js")
    proc = start_agent(data)
    yield proc
    proc.stop()


def test_invoke_round_trips_raw_bytes_with_headers(agent: AgentProcess) -> None:
    payload = bytes(range(256)) * 3
    resp = agent.invoke("conformance-node", payload, {"X-Request-Id": "req-42"})
    assert resp.status == 200
    assert resp.body == payload
    assert resp.headers["X-Request-Id"] == "req-42"
    assert resp.headers["X-Edgefn-Version"] == "1.0.0"
    assert resp.headers["X-Edgefn-Served-By"] == "local"
    assert float(resp.headers["X-Edgefn-Duration-Ms"]) > 0


def test_json_in_json_out(agent: AgentProcess) -> None:
    resp = agent.invoke(
        "conformance-node", b'{"op":"context"}', {"Content-Type": "application/json"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    ctx = resp.json()
    assert ctx["function"] == "conformance-node"
    assert ctx["version"] == "1.0.0"
    assert 0 < ctx["deadline_ms_left"] <= 5000


def test_errors_are_json_with_stable_codes(agent: AgentProcess) -> None:
    missing = agent.invoke("nope", b"x")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "unknown_function"

    failed = agent.invoke(
        "conformance-node",
        b'{"op":"throw","message":"bad route"}',
        {"Content-Type": "application/json"},
    )
    assert failed.status == 500
    err = failed.json()["error"]
    assert err["code"] == "function_error"
    assert "bad route" in err["message"]
    assert err["request_id"] == failed.headers["X-Request-Id"]

    route = agent.get("/v1/nothing-here")
    assert route.status == 404
    assert route.json()["error"]["code"] == "not_found"


def test_broken_manifest_is_reported_and_others_keep_serving(agent: AgentProcess) -> None:
    fns = {f["name"]: f for f in agent.get("/v1/functions").json()["functions"]}
    assert "field 'version' must be a semantic version" in fns["broken"]["error"]
    assert "broken/edgefn.toml" in fns["broken"]["error"]
    assert fns["conformance-node"]["status"]["health"] == "healthy"
    resp = agent.invoke("broken", b"x")
    assert resp.status == 404
    assert "not loaded" in resp.json()["error"]["message"]
    assert agent.invoke("conformance-node", b"still here").body == b"still here"


def test_payload_over_the_limit_is_413(tmp_path: Path) -> None:
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    agent = start_agent(data, "--max-body-bytes", "1024")
    try:
        assert agent.invoke("conformance-node", b"x" * 1024).status == 200
        resp = agent.invoke("conformance-node", b"x" * 1025)
        assert resp.status == 413
        assert resp.json()["error"]["code"] == "payload_too_large"
    finally:
        agent.stop()


def test_timeout_is_504_and_crash_is_502(agent: AgentProcess) -> None:
    fn = agent.data_dir / "functions" / "conformance-node"
    write_manifest(
        fn,
        name="conformance-node",
        version="1.0.1",
        runtime="node",
        entry="handler.js",
        timeout_ms=300,
    )
    for _ in range(100):  # bounded: the scanner picks the change up within a few 0.2 s scans
        if agent.invoke("conformance-node", b"v").headers.get("X-Edgefn-Version") == "1.0.1":
            break
        time.sleep(0.1)
    hung = agent.invoke(
        "conformance-node", b'{"op":"hang","ms":10000}', {"Content-Type": "application/json"}
    )
    assert hung.status == 504
    assert hung.json()["error"]["code"] == "timeout"
    crash = agent.invoke(
        "conformance-node", b'{"op":"crash"}', {"Content-Type": "application/json"}
    )
    assert crash.status == 502
    assert crash.json()["error"]["code"] == "worker_crashed"
    # Replaced: the next call succeeds.
    for _ in range(50):
        ok = agent.invoke("conformance-node", b"again")
        if ok.status == 200:
            break
        time.sleep(0.1)
    assert ok.body == b"again"


def test_health_metrics_and_openapi(agent: AgentProcess) -> None:
    agent.invoke("conformance-node", b"count me")
    health = agent.get("/v1/health")
    assert health.status == 200
    assert health.json()["status"] == "ok"
    metrics = agent.get("/metrics").body.decode()
    assert 'edgefn_invocations_total{function="conformance-node"}' in metrics
    assert 'edgefn_pool_instances{function="conformance-node",version="1.0.0"} 1' in metrics
    assert "edgefn_invocation_duration_seconds_bucket" in metrics
    spec = agent.get("/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/functions/{name}/invoke" in spec["paths"]


def test_function_logs_reach_the_agent_log_with_the_request_id(agent: AgentProcess) -> None:
    agent.invoke(
        "conformance-node",
        b'{"op":"log","message":"hello from the function"}',
        {"Content-Type": "application/json", "X-Request-Id": "trace-me-1"},
    )
    line = agent.wait_log("hello from the function")
    assert "edgefn.fn.conformance-node" in line


def test_json_log_format(tmp_path: Path) -> None:
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    agent = start_agent(data, "--log-format", "json")
    try:
        agent.invoke(
            "conformance-node",
            b'{"op":"log","message":"structured"}',
            {"Content-Type": "application/json"},
        )
        record = json.loads(agent.wait_log('"msg":"structured"'))
        assert record["level"] == "info"
        assert record["worker_pid"] > 0
    finally:
        agent.stop()


def test_new_function_is_picked_up_without_restart(agent: AgentProcess, tmp_path: Path) -> None:
    install_dev_function(CONFORMANCE_NODE, agent.data_dir, "conformance-node")  # unchanged
    d = tmp_path / "late"
    d.mkdir()
    (d / "index.js").write_text("exports.handler = async (e) => ({late: true});\n")
    write_manifest(d, name="late", version="0.1.0", runtime="node", entry="index.js")
    install_dev_function(d, agent.data_dir, "late")
    for _ in range(100):
        resp = agent.invoke("late", b"")
        if resp.status == 200:
            break
        time.sleep(0.05)
    assert resp.json() == {"late": True}


def test_sigterm_drains_in_flight_requests(agent: AgentProcess) -> None:
    result: dict[str, object] = {}

    def slow() -> None:
        r = agent.invoke(
            "conformance-node", b'{"op":"sleep","ms":700}', {"Content-Type": "application/json"}
        )
        result["status"], result["body"] = r.status, r.body

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.2)
    assert agent.stop(signal.SIGTERM) == 0
    t.join(10)
    assert result == {"status": 200, "body": b'{"slept":700}'}
    assert not (agent.data_dir / "agent.json").exists()


def test_kill_9_of_the_agent_leaves_no_worker_behind(agent: AgentProcess) -> None:
    assert agent.invoke("conformance-node", b"x").status == 200
    wrappers = list(children_of(agent.proc.pid))
    workers = [w for pid in wrappers for w in [pid, *children_of(pid)]]
    assert workers, "the agent should have worker processes"
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_alive(p) for p in workers):
        time.sleep(0.05)
    assert not [p for p in workers if pid_alive(p)]
    # And it starts again on the same data dir after the hard kill.
    again = start_agent(agent.data_dir)
    try:
        assert again.invoke("conformance-node", b"back").body == b"back"
    finally:
        again.stop()


def test_cli_invoke_prints_result_and_fails_clearly(agent: AgentProcess, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "edge_agent", "invoke"]
    ok = subprocess.run(
        [*cli, "conformance-node", "--data", "hello", "--data-dir", str(agent.data_dir)],
        capture_output=True,
        timeout=30,
    )
    assert (ok.returncode, ok.stdout) == (0, b"hello")
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"\x00\x01file")
    from_file = subprocess.run(
        [*cli, "conformance-node", "--data", f"@{payload}", "--url", agent.url],
        capture_output=True,
        timeout=30,
    )
    assert from_file.stdout == b"\x00\x01file"
    bad = subprocess.run(
        [*cli, "missing-fn", "--url", agent.url], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 1
    assert "no function named 'missing-fn'" in bad.stderr
    assert "unknown_function" in bad.stderr
    down = subprocess.run(
        [*cli, "x", "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=30
    )
    assert down.returncode == 3
    assert "cannot reach the agent" in down.stderr


def test_unwritable_data_dir_is_a_clear_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "--data-dir",
            str(blocker / "d"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 4
    assert "cannot create data dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_startup_error(agent: AgentProcess, tmp_path: Path) -> None:
    port = agent.url.rsplit(":", 1)[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "--data-dir",
            str(tmp_path / "d2"),
            "--port",
            port,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert proc.returncode == 4
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_unknown_runtime_and_missing_toolchain_are_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_manifest(
        data / "functions" / "weird", name="weird", version="1.0.0", runtime="ruby", entry="x.rb"
    )
    nodefn = install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    assert nodefn.exists()
    env_backup = os.environ.get("EDGEFN_NODE")
    os.environ["EDGEFN_NODE"] = str(tmp_path / "no-node-here")
    try:
        agent = start_agent(data)
    finally:
        if env_backup is None:
            del os.environ["EDGEFN_NODE"]
        else:
            os.environ["EDGEFN_NODE"] = env_backup
    try:
        fns = {f["name"]: f for f in agent.get("/v1/functions").json()["functions"]}
        assert "field 'runtime' must be one of node, go, cpp, got 'ruby'" in fns["weird"]["error"]
        assert "Node.js is not installed" in fns["conformance-node"]["error"]
        assert http("GET", f"{agent.url}/v1/health").status == 200
    finally:
        agent.stop()


def test_wrong_method_is_a_json_405(agent: AgentProcess) -> None:
    resp = agent.get("/v1/functions/conformance-node/invoke")
    assert resp.status == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"

"""An install that cannot run is not "installed" (issue 11 item 5): with the worker budget full,
the agent lists the function as installed-but-not-running with the reason, and starts it once
another function frees the budget. A real agent process with a budget of one worker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FUNCTIONS, AgentProcess, install_dev_function, start_agent

pytestmark = pytest.mark.slow

BOUND_S = 60.0  # an upper bound on every wait, never a timing assertion


def install_as(data: Path, name: str) -> None:
    dest = install_dev_function(FUNCTIONS / "conformance" / "node", data, name)
    manifest = dest / "edgefn.toml"
    manifest.write_text(manifest.read_text().replace('"conformance-node"', f'"{name}"'))


def functions(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in agent.get("/v1/functions").json()["functions"]}


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_a_function_over_budget_waits_then_starts_when_budget_frees(tmp_path: Path) -> None:
    data = tmp_path / "data"
    install_as(data, "first")
    agent = start_agent(data, "--budget-workers", "1")
    try:
        assert agent.invoke("first", b"hi").status == 200  # holds the one worker
        install_as(data, "second")
        wait_until(lambda: "second" in functions(agent), "the second function to be seen")
        second = functions(agent)["second"]
        assert second["status"] == {"health": "waiting", "state": "waiting_for_budget"}
        assert "budget" in second["error"]
        assert "installed but not running" in agent.log_text()
        listed = subprocess.run(
            [sys.executable, "-m", "edge_agent", "fn", "list", "--json", "--data-dir", str(data)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows["second"]["not_running"].startswith("waiting_for_budget: ")
        assert rows["first"]["not_running"] is None
        shutil.rmtree(data / "functions" / "first")  # frees the budget
        wait_until(
            lambda: functions(agent).get("second", {}).get("status", {}).get("health") == "healthy",
            "the second function to start",
        )
        assert agent.invoke("second", b"hi").status == 200
    finally:
        agent.stop()

"""kill -9 of `edge-agent fn install` at every step: after a restart exactly one complete version
is active and serving (the old one, or the new one once the switch happened), leftovers are
ignored by the agent, and the next install cleans them up and completes (resuming a cut download).

The installer's fault-injection seam (edge_agent/install_faults.py), set through
EDGEFN_INSTALL_PAUSE_AT=<step>, writes a marker file and sleeps at that step, so the test kills
it exactly there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.install import STEPS
from tests.harness import children_of, pid_alive, start_agent
from tests.registry_helpers import agent_cli, ok
from tests.test_install import Env, make_env, trusting_data_dir, wait_serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with make_env(tmp_path_factory.mktemp("kill")) as e:
        yield e


def install_and_kill(
    env: Env, data: Path, version: str, step: str, tmp_path: Path, *, from_file: bool = False
) -> None:
    marker = tmp_path / f"paused-{step}"
    extra = {"EDGEFN_INSTALL_PAUSE_AT": step, "EDGEFN_INSTALL_PAUSE_MARKER": str(marker)}
    environ = {k: v for k, v in os.environ.items() if k != "EDGEFN_DATA_DIR"}
    source = (
        [str(env.bundles[version])]
        if from_file
        else [f"echo@{version}", "--cloud", env.platform.url]
    )
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "edge_agent", "fn", "install", *source),
            *("--data-dir", str(data)),
        ],
        env={**environ, **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"install ended before {step}: {out!r} {err!r}")
            assert time.monotonic() < deadline, f"install never reached {step}"
            time.sleep(0.02)
        workers = list(children_of(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # Workers of the warm check die with their parent (parent-death signal).
        deadline = time.monotonic() + 10
        while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [w for w in workers if pid_alive(w)]
        for w in left:
            os.kill(w, signal.SIGKILL)
        assert not left, f"worker processes outlived the killed installer: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_each_step(env: Env, tmp_path: Path, step: str) -> None:
    data = trusting_data_dir(env, tmp_path / "device")
    ok(agent_cli("fn", "install", "echo@0.1.0", "--cloud", env.platform.url, "--data-dir", data))
    install_and_kill(env, data, "0.2.0", step, tmp_path)

    root = data / "functions" / "echo"
    expected = "0.2.0" if step == "prune" else "0.1.0"  # prune comes after the switch
    active = (root / "active").read_text().strip()
    assert active == expected
    assert (root / active / "edgefn.toml").is_file()
    agent = start_agent(data, "--require-signed")
    try:
        assert wait_serving(agent, "echo", expected).status == 200
        (item,) = [f for f in agent.get("/v1/functions").json()["functions"] if f["name"] == "echo"]
        assert "error" not in item, item  # leftovers are invisible to the agent

        start = len(env.platform.lines)
        out = ok(
            agent_cli(
                "fn", "install", "echo@0.2.0", "--cloud", env.platform.url, "--data-dir", data
            )
        )
        if step == "download":
            assert "resuming download of echo@0.2.0 at byte 65536" in out
            served = env.platform.wait_log("/v1/registry/bundles/", start)
            assert '" 206 ' in served[-1]
        wait_serving(agent, "echo", "0.2.0")
    finally:
        agent.stop()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith((".staging", ".trash"))]
    leftovers += [p.name for p in (data / "functions").iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in (data / "staging").glob("*.part")]
    assert not leftovers, leftovers
    assert sorted(p.name for p in root.iterdir() if p.name[0].isdigit()) == ["0.1.0", "0.2.0"]


@pytest.mark.parametrize("step", ["unpack", "switch"])
def test_kill_9_during_a_first_install_leaves_nothing(
    env: Env,
    tmp_path: Path,
    step: str,
) -> None:
    data = trusting_data_dir(env, tmp_path / "device")
    install_and_kill(env, data, "0.1.0", step, tmp_path)
    assert not (data / "functions" / "echo").exists()  # built aside, renamed into place at the end
    agent = start_agent(data, "--require-signed")
    try:
        assert agent.get("/v1/functions").json()["functions"] == []
        ok(
            agent_cli(
                "fn", "install", "echo@0.1.0", "--cloud", env.platform.url, "--data-dir", data
            )
        )
        wait_serving(agent, "echo", "0.1.0")
    finally:
        agent.stop()
    assert [p.name for p in (data / "functions").iterdir()] == ["echo"]


def staged_copies(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "staging").glob("file-*.efb"))


@pytest.mark.parametrize("cleaner", ["install", "agent start"])
def test_copies_left_by_interrupted_file_installs_are_removed(
    env: Env, tmp_path: Path, cleaner: str
) -> None:
    """Each install from a file killed after its copy leaves that full copy in staging/; the
    next install (or the agent's start) removes every copy no running install holds."""
    data = trusting_data_dir(env, tmp_path / "device")
    install_and_kill(env, data, "0.1.0", "verify", tmp_path, from_file=True)
    left = staged_copies(data)
    assert len(left) == 1 and (data / "staging" / left[0]).stat().st_size > 0  # a full copy
    if cleaner == "install":
        out = ok(agent_cli("fn", "install", str(env.bundles["0.1.0"]), "--data-dir", data))
        assert all(f"removed {name}" in out for name in left), out
    else:
        agent = start_agent(data, "--require-signed")
        agent.stop()
    assert staged_copies(data) == []

"""zeroconf advertising and discovery (edge_agent.discovery, edge_agent.client).

ONLY inside network namespaces this test creates: zeroconf multicasts on every interface it is
given, and this machine's real interfaces must never carry it. Two namespaces joined by a veth
pair with 10.x addresses the test picks; the agent runs in one, browsers in the other; both are
deleted afterwards.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FUNCTIONS, REPO, AgentProcess, install_dev_function, start_agent

CONFORMANCE_NODE = FUNCTIONS / "conformance" / "node"


@dataclass(frozen=True)
class Lan:
    agent_ns: str
    client_ns: str
    agent_if: str
    agent_ip: str
    client_ip: str

    def in_agent(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.agent_ns)

    def in_client(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.client_ns)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 100000}{time.monotonic_ns() % 1000:03d}"
    a, b = f"efn-lan-{tag}-a", f"efn-lan-{tag}-b"
    va, vb = f"efa{tag}"[:15], f"efb{tag}"[:15]
    net = f"10.{200 + os.getpid() % 50}.{int(tag) % 250}"
    try:
        _ip("netns", "add", a)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
    try:
        _ip("netns", "add", b)
        for ns in (a, b):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        _ip("-n", a, "addr", "add", f"{net}.1/24", "dev", va)
        _ip("-n", b, "addr", "add", f"{net}.2/24", "dev", vb)
        _ip("-n", a, "link", "set", va, "up")
        _ip("-n", b, "link", "set", vb, "up")
        yield Lan(a, b, va, f"{net}.1", f"{net}.2")
    finally:
        for ns in (a, b):  # deletes the veth pair with them
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class Browser:
    """tests/lan_browser.py running in the client namespace; events arrive on a queue."""

    def __init__(self, lan: Lan) -> None:
        self.proc = subprocess.Popen(
            [*lan.in_client(), sys.executable, "-m", "tests.lan_browser"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader: threading.Thread | None = None
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait(lambda e: e["event"] == "browsing")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def wait(self, match: Any, timeout: float = 30, context: Any = str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(event)
            if match(event):
                return event
        raise AssertionError(f"no matching zeroconf event; saw {seen}\n{context()[-3000:]}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def edge_agent_in(lan: Lan, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFN_TOKEN"}
    return subprocess.run(
        [*lan.in_client(), sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def make_token(data_dir: Path, scope: str) -> str:
    argv = ["token", "create", "--data-dir", str(data_dir), "--scope", scope]
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout.strip().splitlines()[-1]


def start_lan_agent(lan: Lan, data: Path) -> AgentProcess:
    return start_agent(
        data,
        "--host",
        "0.0.0.0",  # inside the agent's namespace: lo and the test's veth only
        "--auth",
        "token",
        "--advertise",
        lan.agent_if,
        # The test's tmp dir is root-only; an edgefn-worker user on this machine could not
        # read the functions in it.
        "--worker-user",
        "root",
        wrap=lan.in_agent(),
    )


@pytest.mark.slow
def test_discover_invoke_txt_update_and_unregister(lan: Lan, tmp_path: Path) -> None:
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    token = make_token(data, "invoke:conformance-node")
    browser = Browser(lan)
    agent = start_lan_agent(lan, data)
    try:
        port = int(agent.url.rsplit(":", 1)[1])
        added = browser.wait(lambda e: e["event"] == "added")
        txt = added["txt"]
        assert (txt["api"], txt["auth"], txt["tls"]) == ("1", "token", "0")
        assert added["port"] == port and len(txt["fns"]) == 8
        device = txt["id"]

        # `edge-agent discover` from the other namespace finds it, reachable on the veth.
        listed = edge_agent_in(lan, "discover", "--json", "--timeout", "3")
        assert listed.returncode == 0, listed.stderr
        (found,) = json.loads(listed.stdout)
        assert found["device_id"] == device and found["auth"] == "token"
        assert found["url"] == f"http://{lan.agent_ip}:{port}"

        # ... and `invoke --discover` calls it across the namespaces, with the token.
        ok = edge_agent_in(
            lan, "invoke", "conformance-node", "--discover", "--device", device,
            "--token", token, "--data", "across the veth",
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == "across the veth"
        anon = edge_agent_in(
            lan, "invoke", "conformance-node", "--discover", "--device", device, "--data", "x"
        )
        assert anon.returncode == 1 and "unauthorized" in anon.stderr
        nobody = edge_agent_in(
            lan, "invoke", "conformance-node", "--discover", "--device", "no-such-device",
            "--timeout", "2",
        )  # fmt: skip
        assert nobody.returncode == 3 and "no-such-device" in nobody.stderr

        # A new version changes the fns TXT; the browser is told (Updated), not just a new
        # query answered differently.
        manifest = data / "functions" / "conformance-node" / "edgefn.toml"
        manifest.write_text(manifest.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))
        updated = browser.wait(
            lambda e: e["event"] == "updated" and e["txt"].get("fns") != txt["fns"],
            context=agent.log_text,
        )
        assert updated["txt"]["id"] == device

        # Shutdown unregisters: the goodbye reaches the browser at once. Without it the record
        # would linger for its TTL (minutes), far beyond this wait.
        assert agent.stop() == 0
        browser.wait(lambda e: e["event"] == "removed", timeout=20, context=agent.log_text)
        assert "stopped advertising" in agent.log_text()
    finally:
        agent.stop()
        browser.close()


def test_bad_advertise_settings_are_refused(lan: Lan, tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "d")]
    exposed = ["--host", "0.0.0.0", "--auth", "token", "--port", "0"]
    run = [*lan.in_agent(), sys.executable, "-m", "edge_agent", "run", *data]
    proc = subprocess.run(
        [*run, *exposed, "--advertise", "nosuch0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 4, proc.stderr
    assert "interface 'nosuch0' does not exist" in proc.stderr
    assert not (tmp_path / "d" / "agent.json").exists()
    # In the namespace too: were the check ever lost, nothing would reach a real interface.
    loop = subprocess.run(
        [*run, "--advertise", lan.agent_if],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loop.returncode == 4 and "could find the agent but not reach it" in loop.stderr

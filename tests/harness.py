"""Test helpers that run the real agent as a subprocess and talk to it over loopback HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FUNCTIONS = REPO / "tests" / "functions"
EXAMPLES = REPO / "examples"


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Response:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, resp.read(), dict(resp.headers.items()))
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read(), dict(exc.headers.items()))


@dataclass
class AgentProcess:
    data_dir: Path
    proc: subprocess.Popen[bytes]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def invoke(
        self, name: str, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        return http("POST", f"{self.url}/v1/functions/{name}/invoke", data, headers)

    def get(self, path: str) -> Response:
        return http("GET", f"{self.url}{path}")

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 10) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if rx.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        remove_agent_cgroups(self.data_dir)
        return code


def remove_agent_cgroups(data_dir: Path) -> None:
    """Remove the cgroup subtree of the agent that used `data_dir` (a killed agent cannot):
    cgroups are machine-global and outlive the test's temporary directory. Moves nothing."""
    from hardware.cgroup import CgroupManager
    from hardware.cgroup_v1 import CgroupV1Manager
    from hardware.errors import HardwareError
    from hardware.isolation import instance_prefix

    prefix = instance_prefix(data_dir)
    for manager in (CgroupV1Manager(prefix=prefix), CgroupManager(prefix=prefix, move_self=False)):
        with contextlib.suppress(HardwareError, OSError):
            if manager.setup().available:
                manager.close()


def start_agent(
    data_dir: Path,
    *extra: str,
    wait: bool = True,
    timeout: float = 60,
    wrap: tuple[str, ...] = (),
) -> AgentProcess:
    """Start `edge-agent run` on a free loopback port and wait until it listens.

    `wrap` prefixes the command, e.g. ("ip", "netns", "exec", NS) to run it in a namespace.
    """
    env = dict(os.environ)
    env.pop("EDGEFN_DATA_DIR", None)
    if os.geteuid() == 0 and "--worker-user" not in extra:
        # Whether the machine has an `edgefn-worker` user (the limit tests create it) must not
        # change other tests: their functions live in 0700 temporary directories that only
        # root can read. Tests of the worker user pass --worker-user themselves.
        extra = ("--worker-user", "root", *extra)
    proc = subprocess.Popen(
        [
            *wrap,
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            "--scan-interval",
            "0.2",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    agent = AgentProcess(data_dir, proc)

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            agent.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    agent._reader = threading.Thread(target=read, daemon=True)
    agent._reader.start()
    if not wait:
        return agent
    deadline = time.monotonic() + timeout
    state = data_dir / "agent.json"
    while time.monotonic() < deadline:
        # The agent writes agent.json (atomically) once it listens.
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            agent.url = info["url"]
            return agent
        if proc.poll() is not None:
            agent.stop()
            raise AssertionError(f"agent exited with {proc.returncode}:\n{agent.log_text()}")
        time.sleep(0.02)
    agent.stop(signal.SIGKILL)
    raise AssertionError(f"agent did not start:\n{agent.log_text()}")


def install_dev_function(src: Path, data_dir: Path, name: str | None = None) -> Path:
    """Copy a built function directory into DATA_DIR/functions/<name> (development layout)."""
    dest = data_dir / "functions" / (name or src.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def write_manifest(directory: Path, **fields: Any) -> Path:
    """Write an edgefn.toml from keyword fields (tables as dicts)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    tables: list[str] = []
    for key, value in fields.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]")
            tables.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path = directory / "edgefn.toml"
    path.write_text("\n".join(lines + tables) + "\n")
    return path


def children_of(pid: int) -> Iterator[int]:
    """PIDs whose parent is `pid` (read from /proc; no psutil needed)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            yield int(entry)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

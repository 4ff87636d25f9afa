"""The agent's config file (edge_agent.config_file) and systemd notify (edge_agent.sdnotify)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from edge_agent import config_file
from edge_agent.cli import build_parser
from edge_agent.cli_run import settings_from_args
from edge_agent.errors import StartupError
from edge_agent.settings import Settings
from tests.harness import REPO, start_agent

EXAMPLE = REPO / "packaging" / "agent.toml.example"


def _run_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`edge-agent run ...` expected to exit by itself (a refused start)."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _settings(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["run", *argv]))


# --- the file itself -----------------------------------------------------------------------


def test_shipped_example_loads_with_the_packaged_values() -> None:
    values = config_file.load(EXAMPLE)
    assert values["data_dir"] == Path("/var/lib/edgefn")
    assert values["require_signed"] is True
    assert values["update_security"] == "tuf"  # the packaged agent requires TUF metadata
    assert values["host"] == "127.0.0.1" and values["auth"] == "none"
    # Apart from those two, the shipped file documents the defaults: they must not drift.
    defaults = Settings(data_dir=Path("/x"))
    for name, value in values.items():
        if name not in ("data_dir", "require_signed", "update_security"):
            assert getattr(defaults, name) == value, name


def test_every_run_flag_has_a_config_key_and_field() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    dests = {a.dest for a in run._actions if a.dest != "help"}
    keyed = {k.field for k in config_file.KEYS.values()}
    from edge_agent.cli_run import _FLAG_FIELDS, _NOT_SETTINGS

    flag_fields = {_FLAG_FIELDS.get(d, d) for d in dests - _NOT_SETTINGS} | {"labels"}
    known = {f.name for f in fields(Settings)}
    assert flag_fields <= known
    # cloud_token only by flag or environment: the file is world-readable (module docstring).
    assert flag_fields - keyed == {"cloud_token"}


def test_good_file_sets_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'data_dir = "state"\nport = 9001\nlog_level = "debug"\nadvertise = ["eth1"]\n'
        'host = "0.0.0.0"\nauth = "token"\n'
        'drain_s = 3\n[budget]\nworkers = 3\n[labels]\nsite = "depot-7"\n'
        '[cloud]\nurl = "http://cloud.example:8700"\ndefault_routing = "local-then-cloud"\n'
    )
    s = _settings("--config", str(cfg))
    assert s.data_dir == tmp_path / "state"  # relative to the file, not to the cwd
    assert (s.port, s.log_level, s.advertise, s.drain_s) == (9001, "debug", ("eth1",), 3.0)
    assert s.budget_workers == 3 and s.labels == (("site", "depot-7"),)
    assert s.cloud_url == "http://cloud.example:8700"
    assert s.default_routing == "local-then-cloud"
    assert s.config_file == cfg


def test_explicit_flags_override_the_file_and_only_they_do(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('port = 9001\nlog_level = "debug"\nrequire_signed = true\n[labels]\na = "1"\n')
    s = _settings("--config", str(cfg), "--port", "9002", "--label", "b=2", "--no-require-signed")
    assert s.port == 9002 and s.require_signed is False
    assert s.log_level == "debug"  # not on the command line: the file's value stays
    assert dict(s.labels) == {"a": "1", "b": "2"}


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("prot = 1\n", "'prot'", "unknown key"),
        ("[cloud]\nurll = 'x'\n", "'cloud.urll'", "unknown key"),
        ("[cloud]\ntoken = 'secret'\n", "'cloud.token'", "world-readable"),
        ("port = '8680'\n", "'port'", "expected an integer, got a string"),
        ("port = true\n", "'port'", "expected an integer, got a boolean"),
        ("require_signed = 1\n", "'require_signed'", "expected true or false"),
        ("log_level = 'loud'\n", "'log_level'", "not one of"),
        ("advertise = 'eth1'\n", "'advertise'", "array of interface names"),
        ("budget = 3\n", "'budget'", "unknown key"),
    ],
)
def test_bad_keys_are_refused_with_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    with pytest.raises(StartupError) as info:
        _settings("--config", str(cfg))
    assert str(cfg) in info.value.message and key in info.value.message
    assert reason in info.value.message


# --- a real agent process ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("port = 8680\nmax_body_byte = 10\n", "key 'max_body_byte': unknown key"),
        ("port = 8680\ncache_max_bytes = '64M'\n", "key 'cache_max_bytes': expected an integer"),
        ("port = [\n", "not valid TOML"),
    ],
)
def test_agent_refuses_a_bad_file_at_start(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    proc = _run_agent("--config", str(cfg), "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert str(cfg) in lines[0] and needle in lines[0]
    assert not (tmp_path / "data" / "agent.json").exists()


@pytest.mark.slow
def test_agent_uses_the_file_and_explicit_flags_win(tmp_path: Path) -> None:
    # The file names a port that is taken and a small body limit; the harness passes --port 0.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"port = {taken.getsockname()[1]}\nmax_body_bytes = 1024\n")
    agent = start_agent(tmp_path / "data", "--config", str(cfg))
    try:
        assert not agent.url.endswith(f":{taken.getsockname()[1]}")  # --port 0 won
        resp = agent.invoke("anything", b"x" * 1025)  # the file's limit applies
        assert resp.status == 413 and resp.json()["error"]["code"] == "payload_too_large"
    finally:
        agent.stop()
        taken.close()


# --- systemd notify --------------------------------------------------------------------------


def _receive(sock: socket.socket, want: str, seen: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(want in msg.splitlines() for msg in seen):
            return
    raise AssertionError(f"no {want!r} from the agent; got {seen}")


@pytest.mark.slow
@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_watchdog_and_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"edgefn-lan-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        path = tmp_path / "notify.sock"
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    seen: list[str] = []
    agent = start_agent(tmp_path / "data")
    try:
        _receive(sock, "READY=1", seen)
        ready = next(m for m in seen if "READY=1" in m.splitlines())
        assert f"MAINPID={agent.proc.pid}" in ready.splitlines()
        assert agent.get("/v1/health").status == 200  # READY means it already listens
        count = 0
        for _ in range(3):
            _receive(sock, "WATCHDOG=1", seen)
            count += sum(m == "WATCHDOG=1" for m in seen)
            seen.clear()
        assert count >= 3
        agent.stop()
        _receive(sock, "STOPPING=1", seen)
    finally:
        agent.stop()
        sock.close()


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.sdnotify import Notifier, watchdog_interval

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_env().send("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.5

"""`edge-agent` as a user types it: invoke's content type and newline rules, one-line errors."""

from __future__ import annotations

import argparse
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import cli
from hardware.errors import BudgetExhausted
from tests.harness import FUNCTIONS, AgentProcess, install_dev_function, start_agent

INVOKE = [sys.executable, "-m", "edge_agent", "invoke", "conformance-node"]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    data = tmp_path_factory.mktemp("agent-cli") / "data"
    install_dev_function(FUNCTIONS / "conformance" / "node", data, "conformance-node")
    # As root the agent would run workers as `edgefn-worker` whenever that machine-wide user
    # exists (other tests create it), and that user cannot read pytest's 0700 temp dirs.
    user = ("--worker-user", "root") if os.geteuid() == 0 else ()
    proc = start_agent(data, *user)
    yield proc
    proc.stop()


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*INVOKE, *args], capture_output=True, timeout=30)


def run_on_a_terminal(*args: str) -> bytes:
    """Run invoke with stdout on a pseudo-terminal; everything it wrote there."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*INVOKE, *args], stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        out = b""
        for _ in range(300):  # bounded: 300 reads of at most 0.1 s
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else b""
        if proc.stderr:
            proc.stderr.close()
        return out
    finally:
        os.close(master)


def test_json_looking_data_is_sent_as_json_unless_told_otherwise(agent: AgentProcess) -> None:
    # The conformance function echoes its event: a parsed JSON value comes back re-serialised
    # (no space), raw bytes come back as they were.
    guessed = run("--data", "[1, 2]", "--url", agent.url)
    assert (guessed.returncode, guessed.stdout) == (0, b"[1,2]")
    raw = run("--data", "[1, 2]", "--content-type", "application/octet-stream", "--url", agent.url)
    assert (raw.returncode, raw.stdout) == (0, b"[1, 2]")
    not_json = run("--data", "[1, 2", "--url", agent.url)
    assert not_json.stdout == b"[1, 2"


def test_a_terminal_gets_a_final_newline_a_pipe_gets_the_exact_bytes(
    agent: AgentProcess,
) -> None:
    on_tty = run_on_a_terminal("--data", "hello", "--url", agent.url)
    assert on_tty.replace(b"\r\n", b"\n") == b"hello\n"  # the terminal maps \n to \r\n
    already = run_on_a_terminal("--data", "line\n", "--url", agent.url)
    assert already.replace(b"\r\n", b"\n") == b"line\n"  # no second newline
    piped = run("--data", "hello", "--url", agent.url)
    assert piped.stdout == b"hello"


def test_invoke_help_says_how_the_content_type_is_chosen(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["invoke", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--content-type" in text
    assert "application/json when --data parses as a JSON object or array" in text
    assert "When stdout is a terminal" in text and "never changed" in text


def test_an_unexpected_edgefn_error_is_one_line_with_its_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def explode(args: argparse.Namespace) -> int:
        raise BudgetExhausted("no memory left\nfor one more worker")

    monkeypatch.setitem(cli.COMMANDS, "profile", explode)
    assert cli.main(["profile"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err == "edge-agent: no memory left for one more worker (budget_exhausted)\n"


def test_unreachable_agent_is_exit_3_for_every_http_command(tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    for args in (["functions", "--url", dead], ["cache", "purge", "x", "--url", dead]):
        proc = subprocess.run(
            [sys.executable, "-m", "edge_agent", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == cli.EXIT_UNREACHABLE, proc.stderr
        assert proc.stderr.startswith("edge-agent: cannot reach the agent at")
        assert "Traceback" not in proc.stderr

"""Through the real agent: a function that leaves children (one detached in its own session)
leaves nothing behind when its worker is killed for a timeout, a crash or memory, when the agent
shuts down, or when the agent is SIGKILLed and not restarted.

The hostile C++ function's "detach TOKEN [then]" mode starts the children; they carry TOKEN in
their command line, which is how the test finds them (their pids inside a PID namespace mean
nothing outside it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimes.build import build_function
from tests.harness import FUNCTIONS, AgentProcess, Response, start_agent, write_manifest
from tests.test_process_tree import needs_pidns, tokened, wait_gone, wait_present
from tests.worker_user import ensure_worker_user

pytestmark = [pytest.mark.slow, needs_pidns]

# The hang case must overrun this; the others answer or die well within it.
TIMEOUT_MS = 1500
LIMITS = {"memory_mb": 64, "processes": 32}


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    """The hostile function built once, in a directory the worker user can read."""
    ensure_worker_user()
    root = Path(tempfile.mkdtemp(prefix="edgefn-tree-"))
    root.chmod(0o755)
    try:
        src = root / "build"
        shutil.copytree(FUNCTIONS / "hostile-cpp", src)
        build_function(src)
        write_manifest(
            src,
            name="tree",
            version="1.0.0",
            runtime="cpp",
            entry="hostile",
            timeout_ms=TIMEOUT_MS,
            limits=LIMITS,
        )
        yield src
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_data_dir(built: Path) -> Path:
    """A data dir of its own per agent (two agents never share one)."""
    data = built.parent / f"data-{uuid.uuid4().hex[:8]}"
    shutil.copytree(built, data / "functions" / "tree")
    for p in [data, *data.rglob("*")]:
        p.chmod(0o755 if p.is_dir() or p.name == "hostile" else 0o644)
    return data


@pytest.fixture(scope="module")
def agent(built: Path) -> Iterator[AgentProcess]:
    proc = start_agent(fresh_data_dir(built), "--worker-user", "edgefn-worker")
    yield proc
    proc.stop()


@pytest.fixture
def token() -> Iterator[str]:
    value = f"edgefn-tree-{uuid.uuid4().hex}"
    yield value
    for pid in tokened(value):  # never leave a failed test's processes behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _invoke_in_background(
    agent: AgentProcess, body: bytes
) -> tuple[threading.Thread, list[Response]]:
    answers: list[Response] = []
    thread = threading.Thread(target=lambda: answers.append(agent.invoke("tree", body)))
    thread.start()
    return thread, answers


@pytest.mark.parametrize(
    ("then", "status", "says"),
    [("hang", 504, "timeout"), ("crash", 502, "worker_crashed"), ("alloc", 502, "worker_crashed")],
)
def test_killed_worker_leaves_no_process(
    agent: AgentProcess, token: str, then: str, status: int, says: str
) -> None:
    thread, answers = _invoke_in_background(agent, f"detach {token} {then}".encode())
    wait_present(token, 2)
    thread.join(30)  # bounded: the deadline is 1.5 s, the hog dies within a second
    assert answers, "no answer"
    assert answers[0].status == status, answers[0].body
    assert answers[0].json()["error"]["code"] == says
    assert wait_gone(token) == []


def test_agent_shutdown_leaves_no_process(built: Path, token: str) -> None:
    agent = start_agent(fresh_data_dir(built), "--worker-user", "edgefn-worker")
    try:
        resp = agent.invoke("tree", f"detach {token}".encode())
        assert resp.status == 200, resp.body
        wait_present(token, 2)
    finally:
        agent.stop()
    assert wait_gone(token) == []


def test_agent_killed_and_not_restarted_leaves_no_process(built: Path, token: str) -> None:
    agent = start_agent(fresh_data_dir(built), "--worker-user", "edgefn-worker")
    try:
        resp = agent.invoke("tree", f"detach {token}".encode())
        assert resp.status == 200, resp.body
        wait_present(token, 2)
    finally:
        agent.stop(signal.SIGKILL)
    assert wait_gone(token) == []

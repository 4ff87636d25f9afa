"""The isolated C++ worker, driven over its pipes with runtimes/protocol.py alone.

No pool here on purpose: these tests pin down what the worker executable itself does (framing,
concurrency, logging, stdout redirection, crash, drain, exit), so a pool bug cannot hide a
worker bug. The conformance function is built once per module with runtimes.cppbuild.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from runtimes import protocol
from runtimes.cppbuild import build_cpp
from runtimes.protocol import Frame, Key, Kind

CONFORMANCE_DIR = Path(__file__).resolve().parent / "functions" / "conformance" / "cpp"
# Upper bound on any single wait for a frame or an exit: generous for a loaded 2-core CI box.
WAIT_S = 15.0


@pytest.fixture(scope="module")
def worker_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cpp-worker")
    _, exe = build_cpp(CONFORMANCE_DIR, out, "conformance")
    return exe


class WorkerProc:
    """One worker process and a frame reader on its stdout; stderr is collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.decoder = protocol.FrameDecoder()
        self.frames: list[Frame] = []
        self.stderr = bytearray()
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr += chunk

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    def invoke(self, rid: int, payload: bytes, deadline_ms: int = 10_000, **kw: Any) -> None:
        self.send(protocol.encode_invoke(rid, payload, deadline_ms=deadline_ms, **kw))

    async def recv(self) -> Frame:
        """The next frame; fails the test if none comes within WAIT_S."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(WAIT_S):
            while not self.frames:
                chunk = await self.proc.stdout.read(1 << 20)
                if not chunk:
                    raise EOFError("worker stdout closed")
                self.frames.extend(self.decoder.feed(chunk))
        return self.frames.pop(0)

    async def answer(self) -> Frame:
        """The next RESULT or ERROR (LOG frames are skipped)."""
        while True:
            frame = await self.recv()
            if frame.kind in (Kind.RESULT, Kind.ERROR):
                return frame

    async def exit_code(self) -> int:
        async with asyncio.timeout(WAIT_S):
            code = await self.proc.wait()
            await self._stderr_task
        return code

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stderr_task, WAIT_S)


Spawn = Callable[..., Any]


@pytest.fixture
async def spawn(worker_exe: Path) -> AsyncIterator[Spawn]:
    started: list[WorkerProc] = []

    async def start(concurrency: int | None = 4, ready: bool = True) -> WorkerProc:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "EDGEFN_FUNCTION": "conformance-cpp",
            "EDGEFN_VERSION": "1.0.0",
        }
        if concurrency is not None:
            env["EDGEFN_CONCURRENCY"] = str(concurrency)
        proc = await asyncio.create_subprocess_exec(
            str(worker_exe),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        worker = WorkerProc(proc)
        started.append(worker)
        if ready:
            frame = await worker.recv()
            assert frame.kind is Kind.READY
        return worker

    yield start
    for worker in started:
        await worker.stop()


def op(name: str, **fields: Any) -> bytes:
    return json.dumps({"op": name, **fields}).encode()


async def test_ready_names_the_runtime(spawn: Spawn) -> None:
    worker = await spawn(ready=False)
    frame = await worker.recv()
    assert frame.kind is Kind.READY and frame.request_id == 0
    assert frame.text(Key.RUNTIME) == "cpp/2"
    assert frame.text(Key.FEATURES) == "notify"  # the library has edgefn_config_changed


async def test_echo_is_byte_exact_small_and_1mib(spawn: Spawn) -> None:
    worker = await spawn()
    small = b"\x00\xff" + bytes(range(256)) + b"\x00"
    big = os.urandom(1 << 20)
    worker.invoke(1, small)
    worker.invoke(2, big)
    worker.invoke(3, b"")
    answers = {f.request_id: f for f in [await worker.answer() for _ in range(3)]}
    assert answers[1].kind is Kind.RESULT and answers[1].payload == small
    assert answers[2].payload == big
    assert answers[3].kind is Kind.RESULT and answers[3].payload == b""
    assert answers[1].flags == 0 and not answers[1].text(Key.CONTENT_TYPE)


async def test_requests_run_concurrently_and_answer_out_of_order(spawn: Spawn) -> None:
    worker = await spawn(concurrency=4)
    worker.invoke(1, op("sleep", ms=1500))
    worker.invoke(2, b"quick")
    first = await worker.answer()
    assert (first.request_id, first.payload) == (2, b"quick")
    second = await worker.answer()
    assert second.request_id == 1
    assert json.loads(second.payload) == {"slept": 1500}
    assert second.flags & protocol.Flag.JSON
    assert second.text(Key.CONTENT_TYPE) == "application/json"


async def test_context_carries_the_invoke_headers(spawn: Spawn) -> None:
    worker = await spawn()
    worker.invoke(41, op("context"), deadline_ms=3000, trace_id="trace-9", json=True)
    worker.invoke(42, op("context"), function="other", version="2.0.0")
    by_id = {f.request_id: json.loads(f.payload) for f in [await worker.answer() for _ in range(2)]}
    assert by_id[41]["request_id"] == 41
    assert by_id[41]["function"] == "conformance-cpp"  # from EDGEFN_FUNCTION
    assert by_id[41]["version"] == "1.0.0"
    assert by_id[41]["trace_id"] == "trace-9"
    assert 0 < by_id[41]["deadline_ms_left"] <= 3000
    assert (by_id[42]["function"], by_id[42]["version"]) == ("other", "2.0.0")


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (op("throw", message="bad input"), "bad input"),
        (op("panic", message="deep down"), "deep down"),
        (op("throw_nonstd"), "not derived from std::exception"),
        (op("no-such-op"), "unknown op"),
    ],
    ids=["throw", "panic", "throw-42", "unknown-op"],
)
async def test_exceptions_are_error_frames(spawn: Spawn, request_body: bytes, message: str) -> None:
    worker = await spawn()
    worker.invoke(5, request_body)
    frame = await worker.answer()
    assert frame.kind is Kind.ERROR and frame.request_id == 5
    assert frame.text(Key.ERROR_CODE) == "function_error"
    assert message in frame.payload.decode()
    worker.invoke(6, b"alive")
    assert (await worker.answer()).payload == b"alive"


async def test_log_frames_carry_level_request_and_trace(spawn: Spawn) -> None:
    worker = await spawn()
    worker.invoke(7, op("log", message="hello from C++"), trace_id="t-7")
    log_frame = await worker.recv()
    assert log_frame.kind is Kind.LOG and log_frame.request_id == 7
    assert log_frame.payload == b"hello from C++"
    assert log_frame.text(Key.LOG_LEVEL) == "info"
    assert log_frame.text(Key.TRACE_ID) == "t-7"
    result = await worker.recv()
    assert result.kind is Kind.RESULT and json.loads(result.payload) == {"logged": True}


async def test_printing_goes_to_stderr_not_the_frames(spawn: Spawn) -> None:
    worker = await spawn()
    worker.invoke(1, op("stdout", message="PRINTED-LINE"))
    frame = await worker.answer()
    assert json.loads(frame.payload) == {"printed": True}
    worker.invoke(2, b"after")  # the stream still decodes: nothing was injected into it
    assert (await worker.answer()).payload == b"after"
    worker.send(protocol.encode(Frame(Kind.SHUTDOWN)))
    assert await worker.exit_code() == 0
    assert bytes(worker.stderr).count(b"PRINTED-LINE") == 2  # printf and std::cout


async def test_ping_is_answered_while_every_thread_is_busy(spawn: Spawn) -> None:
    worker = await spawn(concurrency=1)
    worker.invoke(1, op("sleep", ms=800))
    worker.send(protocol.encode(Frame(Kind.PING, request_id=77)))
    pong = await worker.recv()
    assert pong.kind is Kind.PONG and pong.request_id == 77
    assert (await worker.answer()).request_id == 1


async def test_request_that_expired_in_the_queue_is_not_run(spawn: Spawn) -> None:
    worker = await spawn(concurrency=1)
    worker.invoke(1, op("sleep", ms=500))
    worker.invoke(2, op("log", message="must not run"), deadline_ms=10)
    first = await worker.recv()
    assert first.kind is Kind.RESULT and first.request_id == 1
    second = await worker.recv()  # not a LOG frame: request 2 never ran
    assert second.kind is Kind.ERROR and second.request_id == 2
    assert second.text(Key.ERROR_CODE) == "deadline_exceeded"


async def test_segfault_costs_only_that_worker(spawn: Spawn) -> None:
    worker = await spawn()
    worker.invoke(1, op("segfault"))
    assert await worker.exit_code() == -signal.SIGSEGV
    fresh = await spawn()
    fresh.invoke(1, b"still serving")
    assert (await fresh.answer()).payload == b"still serving"


async def test_crash_op_aborts(spawn: Spawn) -> None:
    worker = await spawn()
    worker.invoke(1, op("crash"))
    assert await worker.exit_code() == -signal.SIGABRT


async def test_shutdown_drains_in_flight_work(spawn: Spawn) -> None:
    worker = await spawn()
    worker.invoke(1, op("sleep", ms=300))
    worker.invoke(2, b"queued too")
    worker.send(protocol.encode(Frame(Kind.SHUTDOWN)))
    answers = {(await worker.answer()).request_id for _ in range(2)}
    assert answers == {1, 2}
    assert await worker.exit_code() == 0


async def test_stdin_eof_makes_it_exit(spawn: Spawn) -> None:
    worker = await spawn()
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    assert await worker.exit_code() == 0


async def test_oversized_frame_is_a_protocol_violation(spawn: Spawn) -> None:
    worker = await spawn()
    worker.send(struct.pack(">I", protocol.MAX_FRAME + 1))
    assert await worker.exit_code() == 2
    assert b"exceeds" in bytes(worker.stderr)


async def test_undecodable_header_is_a_bad_request(spawn: Spawn) -> None:
    worker = await spawn()
    # A DEADLINE_MS entry must be 4 bytes; this one has 2.
    header = bytes([Key.DEADLINE_MS, 0, 2, 0, 1])
    body = struct.pack(">BBHQI", 1, Kind.INVOKE, 0, 9, len(header)) + header + b"x"
    worker.send(struct.pack(">I", len(body)) + body)
    frame = await worker.answer()
    assert frame.kind is Kind.ERROR and frame.request_id == 9
    assert frame.text(Key.ERROR_CODE) == "bad_request"


async def test_concurrency_env_defaults_when_unset(spawn: Spawn) -> None:
    worker = await spawn(concurrency=None)  # default: 4 threads
    for rid in range(1, 4):
        worker.invoke(rid, op("sleep", ms=1000))
    worker.invoke(9, b"fourth thread")
    assert (await worker.answer()).request_id == 9


# Runs in its own process: it becomes a child subreaper, so the orphaned worker is reparented to
# it and its exit status can be read. The worker's stdin stays open (this helper holds the write
# end), so only the parent-death signal -- not EOF -- can end it.
_PDEATHSIG_HELPER = r"""
import ctypes, os, subprocess, sys, time
exe = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl failed")
middle_src = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.argv[1]], stdout=subprocess.PIPE)\n"
    "p.stdout.read(4)\n"  # READY has begun: the worker has set its parent-death signal
    "print(p.pid, flush=True)\n"
    "time.sleep(60)\n"
)
r, w = os.pipe()
middle = subprocess.Popen([sys.executable, "-c", middle_src, exe], stdin=r, stdout=subprocess.PIPE)
os.close(r)
pid = int(middle.stdout.readline())
middle.kill()
middle.wait()
middle.stdout.close()
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        print("signal" if os.WIFSIGNALED(status) else "exit",
              os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        sys.exit(0)
    time.sleep(0.01)
os.kill(pid, 9)
os.waitpid(pid, 0)
print("survived")
"""


def test_worker_dies_with_its_parent(worker_exe: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PDEATHSIG_HELPER, str(worker_exe)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.split() == ["signal", str(int(signal.SIGKILL))]

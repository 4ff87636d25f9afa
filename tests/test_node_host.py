"""The Node.js host (runtimes/node/bootstrap.mjs), driven frame by frame without a pool.

Each test starts the real bootstrap under the real `node` with pipes, writes frames made by
`runtimes.protocol` to its stdin and decodes its stdout with `FrameDecoder`. A stdout that is not
a clean frame sequence fails the test at the next read (the decoder raises), so every test also
checks that nothing but frames reached stdout. Small handler modules are written to tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import runtimes
from runtimes.protocol import (
    MAX_FRAME,
    Flag,
    Frame,
    FrameDecoder,
    Key,
    Kind,
    ProtocolError,
    encode,
    encode_invoke,
)

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

BOOTSTRAP = Path(runtimes.__file__).resolve().parent / "node" / "bootstrap.mjs"
TESTS = Path(__file__).resolve().parent
CONFORMANCE = TESTS / "functions" / "conformance" / "node"
ETA = TESTS.parent / "examples" / "eta-node"

# Generous bounds for a loaded 2-core machine: they only stop a broken host from hanging a test.
FRAME_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 15.0


class NodeHost:
    """One bootstrap process: frames it sent arrive on a queue, stderr is collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.frames: asyncio.Queue[Frame | ProtocolError | None] = asyncio.Queue()
        self.stderr = bytearray()
        self.stdout_bytes = 0
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        decoder = FrameDecoder()
        try:
            while data := await self.proc.stdout.read(1 << 16):
                self.stdout_bytes += len(data)
                for frame in decoder.feed(data):
                    self.frames.put_nowait(frame)
        except ProtocolError as exc:
            self.frames.put_nowait(exc)
            return
        if decoder.buffered:
            self.frames.put_nowait(ProtocolError(f"{decoder.buffered} stray bytes at EOF"))
        self.frames.put_nowait(None)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while data := await self.proc.stderr.read(1 << 16):
            self.stderr += data

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    def invoke(self, request_id: int, payload: bytes, **kw: Any) -> None:
        kw.setdefault("deadline_ms", 5000)
        self.send(encode_invoke(request_id, payload, **kw))

    def op(self, request_id: int, **kw: Any) -> None:
        self.send(op_frame(request_id, **kw))

    async def frame(self) -> Frame | None:
        """The next frame, or None at EOF."""
        async with asyncio.timeout(FRAME_TIMEOUT_S):
            item = await self.frames.get()
        if isinstance(item, ProtocolError):
            raise AssertionError(f"stdout is not a clean frame stream: {item}")
        return item

    async def next_frame(self) -> Frame:
        frame = await self.frame()
        assert frame is not None, f"worker closed stdout; stderr:\n{self.stderr_text}"
        return frame

    async def answer(self, request_id: int) -> tuple[Frame, list[Frame]]:
        """Frames up to the RESULT/ERROR for request_id: (that answer, the frames before it)."""
        seen: list[Frame] = []
        while True:
            frame = await self.next_frame()
            if frame.kind in (Kind.RESULT, Kind.ERROR) and frame.request_id == request_id:
                return frame, seen
            seen.append(frame)

    async def call(self, request_id: int, payload: bytes, **kw: Any) -> Frame:
        self.invoke(request_id, payload, **kw)
        return (await self.answer(request_id))[0]

    async def call_op(self, request_id: int, **kw: Any) -> Frame:
        self.op(request_id, **kw)
        return (await self.answer(request_id))[0]

    async def wait(self) -> int:
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            code = await self.proc.wait()
            await asyncio.gather(*self._tasks)
        return code

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def op_frame(request_id: int, **kw: Any) -> bytes:
    """An INVOKE of a conformance op (docs/protocol.md), as JSON."""
    return encode_invoke(request_id, json.dumps(kw).encode(), deadline_ms=5000, json=True)


StartHost = Callable[..., Awaitable[NodeHost]]


@pytest.fixture
async def start_host() -> AsyncIterator[StartHost]:
    """Factory: start a bootstrap for an entry module; every host is killed at teardown."""
    hosts: list[NodeHost] = []

    async def start(
        entry: Path, handler: str | None = None, *, ready: bool = True, **env: str
    ) -> NodeHost:
        assert NODE is not None
        argv = [NODE, str(BOOTSTRAP), str(entry), *([handler] if handler else [])]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "EDGEFN_FUNCTION": "fn-under-test",
                "EDGEFN_VERSION": "0.0.1",
                "EDGEFN_FUNCTION_DIR": str(entry.parent),
                **env,
            },
        )
        host = NodeHost(proc)
        hosts.append(host)
        if ready:
            frame = await host.next_frame()
            assert frame.kind is Kind.READY, frame
        return host

    yield start
    for host in hosts:
        await host.close()


@pytest.fixture
async def conformance(start_host: StartHost) -> NodeHost:
    return await start_host(CONFORMANCE / "handler.js")


def module(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def body(frame: Frame) -> Any:
    return json.loads(frame.payload)


# ---- start-up ---------------------------------------------------------------------------


async def test_ready_names_the_node_runtime(start_host: StartHost) -> None:
    assert NODE is not None
    probe = await asyncio.create_subprocess_exec(NODE, "--version", stdout=subprocess.PIPE)
    version = (await probe.communicate())[0].decode().strip()
    host = await start_host(CONFORMANCE / "handler.js", ready=False)
    ready = await host.next_frame()
    assert ready.kind is Kind.READY
    assert ready.request_id == 0
    assert ready.text(Key.RUNTIME) == f"node/{version.lstrip('v')}"


async def test_printing_while_loading_goes_to_stderr_not_stdout(
    start_host: StartHost, tmp_path: Path
) -> None:
    entry = module(
        tmp_path,
        "loud.js",
        "console.log('loading now'); process.stdout.write('raw at load\\n');\n"
        "exports.handler = (e) => e;\n",
    )
    host = await start_host(entry, ready=False)
    assert (await host.next_frame()).kind is Kind.READY  # the very first bytes are READY
    assert "loading now" in host.stderr_text
    assert "raw at load" in host.stderr_text


async def test_missing_handler_exits_1_without_ready(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(tmp_path, "nohandler.js", "exports.other = () => 1;\n")
    host = await start_host(entry, ready=False)
    assert await host.wait() == 1
    assert await host.frame() is None
    assert host.stdout_bytes == 0
    assert "does not export a function named 'handler'" in host.stderr_text
    assert "other" in host.stderr_text


async def test_load_error_exits_1_with_the_reason(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(tmp_path, "broken.mjs", "throw new Error('config file missing');\n")
    host = await start_host(entry, ready=False)
    assert await host.wait() == 1
    assert host.stdout_bytes == 0
    assert "config file missing" in host.stderr_text
    assert str(entry) in host.stderr_text


async def test_syntax_error_exits_1(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(tmp_path, "syntax.js", "exports.handler = (e => ;\n")
    host = await start_host(entry, ready=False)
    assert await host.wait() == 1
    assert host.stdout_bytes == 0
    assert "SyntaxError" in host.stderr_text


# ---- payloads and results ------------------------------------------------------------


async def test_echo_is_byte_exact(conformance: NodeHost) -> None:
    for rid, payload in enumerate(
        (b"\x00", b"\x00\xff\x00\xfe", bytes(range(256)) * 4, b"{not json", b""), start=1
    ):
        result = await conformance.call(rid, payload)
        assert result.kind is Kind.RESULT
        assert result.payload == payload
        assert result.flags == 0
        assert result.text(Key.CONTENT_TYPE) == "application/octet-stream"


async def test_one_mib_echo(conformance: NodeHost) -> None:
    payload = os.urandom(1 << 20)
    result = await conformance.call(7, payload)
    assert result.kind is Kind.RESULT
    assert result.payload == payload
    # and the stream is still in step afterwards
    assert (await conformance.call(8, b"\xff" * 3)).payload == b"\xff" * 3


async def test_many_frames_in_one_write_are_all_answered(conformance: NodeHost) -> None:
    payloads = {rid: os.urandom(rid * 37) for rid in range(1, 65)}
    conformance.send(b"".join(encode_invoke(r, p, deadline_ms=5000) for r, p in payloads.items()))
    got: dict[int, bytes] = {}
    while len(got) < len(payloads):
        frame = await conformance.next_frame()
        assert frame.kind is Kind.RESULT
        got[frame.request_id] = frame.payload
    assert got == payloads


async def test_json_event_is_parsed_and_objects_come_back_as_json(
    start_host: StartHost, tmp_path: Path
) -> None:
    entry = module(
        tmp_path,
        "kinds.js",
        "exports.handler = (event) => ({ isBuffer: Buffer.isBuffer(event),\n"
        "  value: Buffer.isBuffer(event) ? event.toString('latin1') : event });\n",
    )
    host = await start_host(entry)
    flagged = await host.call(1, b'{"a": [1, "x"]}', json=True)
    assert flagged.kind is Kind.RESULT
    assert flagged.flags & Flag.JSON
    assert flagged.text(Key.CONTENT_TYPE) == "application/json"
    assert body(flagged) == {"isBuffer": False, "value": {"a": [1, "x"]}}
    by_type = await host.call(2, b"[1, 2]", content_type="Application/JSON; charset=utf-8")
    assert body(by_type) == {"isBuffer": False, "value": [1, 2]}
    raw = await host.call(3, b'{"a": 1}')
    assert body(raw) == {"isBuffer": True, "value": '{"a": 1}'}


async def test_invalid_json_is_bad_request(conformance: NodeHost) -> None:
    error = await conformance.call(1, b"{oops", json=True)
    assert error.kind is Kind.ERROR
    assert error.text(Key.ERROR_CODE) == "bad_request"
    assert b"not valid JSON" in error.payload
    assert (await conformance.call(2, b"still alive")).payload == b"still alive"


async def test_return_value_types(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(
        tmp_path,
        "returns.js",
        """
exports.handler = async (event) => {
  switch (event.toString()) {
    case 'string': return 'h\\u00e9llo';
    case 'undefined': return undefined;
    case 'uint8': return new Uint8Array([0, 1, 255]);
    case 'arraybuffer': return new Uint8Array([9, 8]).buffer;
    case 'null': return null;
    case 'number': return 42;
    case 'bigint': return { n: 1n };
  }
};
""",
    )
    host = await start_host(entry)
    text = await host.call(1, b"string")
    assert (text.payload, text.flags) == ("h\u00e9llo".encode(), 0)
    assert text.text(Key.CONTENT_TYPE) == "text/plain; charset=utf-8"
    empty = await host.call(2, b"undefined")
    assert (empty.kind, empty.payload, empty.flags) == (Kind.RESULT, b"", 0)
    raw = await host.call(3, b"uint8")
    assert (raw.payload, raw.text(Key.CONTENT_TYPE)) == (
        b"\x00\x01\xff",
        "application/octet-stream",
    )
    assert (await host.call(4, b"arraybuffer")).payload == b"\x09\x08"
    null = await host.call(5, b"null")
    assert (null.payload, bool(null.flags & Flag.JSON)) == (b"null", True)
    assert (await host.call(6, b"number")).payload == b"42"
    bad = await host.call(7, b"bigint")
    assert bad.kind is Kind.ERROR
    assert bad.text(Key.ERROR_CODE) == "function_error"
    assert b"JSON" in bad.payload


# ---- concurrency -----------------------------------------------------------------------


async def test_requests_run_concurrently_and_answer_out_of_order(conformance: NodeHost) -> None:
    # One write, so both are read together however slowly this machine schedules node.
    conformance.send(op_frame(1, op="sleep", ms=300) + op_frame(2, op="sleep", ms=10))
    first = await conformance.next_frame()
    second = await conformance.next_frame()
    assert (first.request_id, body(first)) == (2, {"slept": 10})
    assert (second.request_id, body(second)) == (1, {"slept": 300})


async def test_hang_blocks_the_whole_worker(conformance: NodeHost) -> None:
    # Both in one write: the 10 ms sleep is due long before the hang ends but cannot run.
    conformance.send(op_frame(1, op="sleep", ms=10) + op_frame(2, op="hang", ms=300))
    assert (await conformance.next_frame()).request_id == 2
    assert (await conformance.next_frame()).request_id == 1


async def test_u64_request_ids_round_trip(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(tmp_path, "rid.js", "exports.handler = (e, context) => context.requestId;\n")
    host = await start_host(entry)
    for rid in (2**64 - 1, 2**32, 2**32 - 1, 1):
        result = await host.call(rid, b"")
        assert result.request_id == rid
        assert result.payload == str(rid).encode()


# ---- errors ----------------------------------------------------------------------------


async def test_throw_and_panic_are_function_errors(conformance: NodeHost) -> None:
    thrown = await conformance.call_op(1, op="throw", message="no route")
    assert thrown.kind is Kind.ERROR
    assert thrown.text(Key.ERROR_CODE) == "function_error"
    assert thrown.payload == b"Error: no route"
    panic = await conformance.call_op(2, op="panic", message="deep failure")
    assert panic.kind is Kind.ERROR
    assert panic.text(Key.ERROR_CODE) == "function_error"
    assert panic.payload == b"TypeError: deep failure"
    assert (await conformance.call(3, b"fine")).payload == b"fine"
    assert "deep failure" in conformance.stderr_text  # the stack goes to the agent's log


async def test_sync_throw_rejection_and_odd_values(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(
        tmp_path,
        "errors.js",
        """
class QuotaError extends Error { constructor(m) { super(m); this.name = 'QuotaError'; } }
exports.handler = (event) => {
  switch (event.toString()) {
    case 'sync': throw new QuotaError('over quota');
    case 'reject': return Promise.reject(new RangeError('too far'));
    case 'string': throw 'plain string';
    case 'object': throw { code: 7 };
  }
};
""",
    )
    host = await start_host(entry)
    expected = {
        b"sync": b"QuotaError: over quota",
        b"reject": b"RangeError: too far",
        b"string": b"plain string",
        b"object": b'{"code":7}',
    }
    for rid, (payload, message) in enumerate(expected.items(), start=1):
        error = await host.call(rid, payload)
        assert (error.kind, error.text(Key.ERROR_CODE)) == (Kind.ERROR, "function_error")
        assert error.payload == message


async def test_stray_errors_outside_requests_keep_the_worker_running(
    start_host: StartHost, tmp_path: Path
) -> None:
    entry = module(
        tmp_path,
        "stray.js",
        """
exports.handler = async (event) => {
  const what = event.toString();
  if (what === 'reject-later') setTimeout(() => Promise.reject(new Error('late rejection')), 5);
  if (what === 'throw-later') setTimeout(() => { throw new Error('late throw'); }, 5);
  if (what === 'log-later') setTimeout(() => console.log('late line'), 5);
  return what;
};
""",
    )
    host = await start_host(entry)
    for rid, what in enumerate((b"reject-later", b"throw-later"), start=1):
        assert (await host.call(rid, what)).payload == what
    for _ in range(500):  # bounded wait for both late errors to reach stderr
        if "late rejection" in host.stderr_text and "late throw" in host.stderr_text:
            break
        await asyncio.sleep(0.01)
    assert "not tied to a request in flight" in host.stderr_text
    assert "late rejection" in host.stderr_text
    assert "late throw" in host.stderr_text
    # A line logged after its request was answered goes out with request id 0.
    assert (await host.call(3, b"log-later")).payload == b"log-later"
    late = await host.next_frame()
    assert (late.kind, late.request_id, late.payload) == (Kind.LOG, 0, b"late line")
    host.send(encode(Frame(Kind.PING, 9)))
    assert (await host.next_frame()).kind is Kind.PONG


async def test_crash_op_exits_3(conformance: NodeHost) -> None:
    conformance.op(1, op="crash")
    assert await conformance.wait() == 3


# ---- logging ---------------------------------------------------------------------------


async def test_log_op_sends_a_log_frame_for_the_request(conformance: NodeHost) -> None:
    conformance.invoke(5, b'{"op":"log","message":"route computed"}', json=True, trace_id="t-5")
    result, before = await conformance.answer(5)
    assert body(result) == {"logged": True}
    [log] = before
    assert (log.kind, log.request_id, log.payload) == (Kind.LOG, 5, b"route computed")
    assert log.text(Key.LOG_LEVEL) == "info"
    assert log.text(Key.TRACE_ID) == "t-5"


async def test_console_and_stdout_inside_a_handler_become_log_frames(
    start_host: StartHost, tmp_path: Path
) -> None:
    entry = module(
        tmp_path,
        "printing.js",
        """
exports.handler = async (event, context) => {
  console.log('log %s', 'formatted');
  console.info('info');
  console.debug('debug');
  console.warn('warn');
  console.error('error');
  process.stdout.write('raw write\\n');
  await new Promise((resolve) => setTimeout(resolve, 5));
  console.log('after await');
  context.log('ctx log');
  context.logger.debug('ctx debug');
  context.logger.warn('ctx warn');
  context.logger.error('ctx error');
  return 'done';
};
""",
    )
    host = await start_host(entry)
    host.invoke(4, b"x")
    result, before = await host.answer(4)
    assert result.payload == b"done"
    assert all(f.kind is Kind.LOG and f.request_id == 4 for f in before)
    assert [(f.text(Key.LOG_LEVEL), f.payload.decode()) for f in before] == [
        ("info", "log formatted"),
        ("info", "info"),
        ("debug", "debug"),
        ("warn", "warn"),
        ("error", "error"),
        ("info", "raw write"),
        ("info", "after await"),
        ("info", "ctx log"),
        ("debug", "ctx debug"),
        ("warn", "ctx warn"),
        ("error", "ctx error"),
    ]


async def test_concurrent_requests_keep_their_own_log_ids(
    start_host: StartHost, tmp_path: Path
) -> None:
    entry = module(
        tmp_path,
        "interleave.js",
        """
exports.handler = async (event) => {
  const me = event.toString();
  for (let i = 0; i < 3; i++) {
    await new Promise((resolve) => setTimeout(resolve, 2));
    console.log(me);
  }
  return me;
};
""",
    )
    host = await start_host(entry)
    for rid in range(1, 9):
        host.invoke(rid, f"req-{rid}".encode())
    answered = 0
    while answered < 8:
        frame = await host.next_frame()
        assert frame.payload == f"req-{frame.request_id}".encode()
        answered += frame.kind is Kind.RESULT


# ---- context ---------------------------------------------------------------------------


async def test_context_op_fields(conformance: NodeHost) -> None:
    conformance.invoke(
        11, b'{"op":"context"}', json=True, trace_id="trace-9", function="eta", version="2.0.0"
    )
    ctx = body((await conformance.answer(11))[0])
    assert ctx["request_id"] == 11
    assert (ctx["function"], ctx["version"], ctx["trace_id"]) == ("eta", "2.0.0", "trace-9")
    assert 0 < ctx["deadline_ms_left"] <= 5000
    # Without FUNCTION/VERSION headers the names come from the environment.
    ctx = body(await conformance.call_op(12, op="context"))
    assert (ctx["function"], ctx["version"], ctx["trace_id"]) == ("fn-under-test", "0.0.1", "")


async def test_lambda_context_shape(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(
        tmp_path,
        "ctx.js",
        """
exports.handler = async (event, context) => ({
  same: context.awsRequestId === context.requestId,
  waits: context.callbackWaitsForEmptyEventLoop,
  deadlineAhead: context.deadline - Date.now(),
  remaining: context.getRemainingTimeInMillis(),
  json: Object.keys(JSON.parse(JSON.stringify(context))).sort(),
});
""",
    )
    host = await start_host(entry)
    ctx = body(await host.call(1, b"", deadline_ms=2000))
    assert ctx["same"] is True
    assert ctx["waits"] is True
    assert 0 < ctx["deadlineAhead"] <= 2000
    assert 0 < ctx["remaining"] <= 2000
    assert ctx["json"] == sorted(
        [
            "awsRequestId",
            "callbackWaitsForEmptyEventLoop",
            "deadline",
            "functionName",
            "functionVersion",
            "requestId",
            "traceId",
        ]
    )


# ---- module shapes ---------------------------------------------------------------------


async def test_lambda_style_commonjs_handler(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(
        tmp_path,
        "lambda.js",
        """
exports.handler = async (event, context) => {
  return { statusCode: 200, body: JSON.stringify({ hello: event.name, fn: context.functionName }) };
};
""",
    )
    host = await start_host(entry)
    result = await host.call(1, b'{"name": "edge"}', content_type="application/json")
    assert body(result) == {"statusCode": 200, "body": '{"hello":"edge","fn":"fn-under-test"}'}


async def test_callback_style_handler(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(
        tmp_path,
        "callback.cjs",
        """
module.exports.handler = function (event, context, callback) {
  setTimeout(() => {
    if (event.fail) callback(new Error('nope'));
    else callback(null, { doubled: event.n * 2 });
  }, 5);
  return 'ignored: callback style answers through the callback';
};
""",
    )
    host = await start_host(entry)
    assert body(await host.call(1, b'{"n": 21}', json=True)) == {"doubled": 42}
    error = await host.call(2, b'{"fail": true}', json=True)
    assert (error.kind, error.payload) == (Kind.ERROR, b"Error: nope")


async def test_esm_handlers(start_host: StartHost, tmp_path: Path) -> None:
    named = module(tmp_path, "named.mjs", "export async function handler(e) { return 'mjs'; }\n")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "package.json").write_text('{"type": "module"}\n')
    typed = module(pkg, "index.js", "export const handler = () => 'type-module';\n")
    default = module(tmp_path, "default.mjs", "export default async (e) => 'default';\n")
    custom = module(tmp_path, "custom.mjs", "export const run = () => 'custom name';\n")
    cases: list[tuple[Path, str | None, bytes]] = [
        (named, None, b"mjs"),
        (typed, None, b"type-module"),
        (default, None, b"default"),
        (custom, "run", b"custom name"),
    ]
    for entry, name, expected in cases:
        host = await start_host(entry, name)
        assert (await host.call(1, b"")).payload == expected


async def test_top_level_await_in_esm_delays_ready(start_host: StartHost, tmp_path: Path) -> None:
    entry = module(
        tmp_path,
        "tla.mjs",
        "const value = await new Promise((r) => setTimeout(() => r('loaded'), 20));\n"
        "export const handler = () => value;\n",
    )
    host = await start_host(entry)
    assert (await host.call(1, b"")).payload == b"loaded"


# ---- control frames --------------------------------------------------------------------


async def test_ping_is_answered_with_pong(conformance: NodeHost) -> None:
    conformance.send(encode(Frame(Kind.PING, 77)))
    pong = await conformance.next_frame()
    assert (pong.kind, pong.request_id, pong.payload) == (Kind.PONG, 77, b"")


async def test_shutdown_drains_in_flight_then_exits_0(conformance: NodeHost) -> None:
    conformance.send(
        op_frame(1, op="sleep", ms=200)
        + encode(Frame(Kind.SHUTDOWN))
        + op_frame(2, op="sleep", ms=1)  # arrives after SHUTDOWN: refused, not run
    )
    refused = await conformance.next_frame()
    assert (refused.kind, refused.request_id) == (Kind.ERROR, 2)
    assert refused.text(Key.ERROR_CODE) == "bad_request"
    drained = await conformance.next_frame()
    assert (drained.kind, drained.request_id, body(drained)) == (Kind.RESULT, 1, {"slept": 200})
    assert await conformance.frame() is None
    assert await conformance.wait() == 0


async def test_shutdown_when_idle_exits_0(conformance: NodeHost) -> None:
    conformance.send(encode(Frame(Kind.SHUTDOWN)))
    assert await conformance.wait() == 0


async def test_stdin_eof_exits_0_without_waiting_for_in_flight_work(
    conformance: NodeHost,
) -> None:
    conformance.op(1, op="sleep", ms=60_000)  # far beyond EXIT_TIMEOUT_S
    assert conformance.proc.stdin is not None
    conformance.proc.stdin.close()
    assert await conformance.wait() == 0


def _frame(kind: int, *, version: int = 1, header: bytes = b"") -> bytes:
    fixed = struct.pack(">BBHQI", version, kind, 0, 1, len(header))
    return struct.pack(">I", 16 + len(header)) + fixed + header


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_frame(1, version=2), "version"),
        (_frame(99), "kind 99"),
        (_frame(2), "kind 2"),  # a RESULT is never sent to a worker
        (struct.pack(">I", MAX_FRAME + 1), "exceeds"),
        (struct.pack(">I", 3) + b"abc", "shorter"),
        (_frame(1, header=b"\x01\x00"), "truncated header"),
        (_frame(1, header=b"\x01\x00\x02\x00\x00"), "must be 4 bytes"),
        (_frame(1, header=b"\x02\x00\x09ab"), "runs past"),
    ],
)
async def test_malformed_frame_exits_2(conformance: NodeHost, data: bytes, reason: str) -> None:
    conformance.send(data)
    assert await conformance.wait() == 2
    assert "protocol error" in conformance.stderr_text
    assert reason in conformance.stderr_text


async def test_unknown_header_keys_are_skipped(conformance: NodeHost) -> None:
    header = b"\x01\x00\x04\x00\x00\x13\x88" + b"\x63\x00\x03abc"  # DEADLINE_MS + key 99
    payload = b"payload"
    length = 16 + len(header) + len(payload)
    frame = struct.pack(">IBBHQI", length, 1, Kind.INVOKE, 0, 5, len(header)) + header + payload
    conformance.send(frame)
    assert (await conformance.answer(5))[0].payload == payload


# ---- the manifests and the eta example -------------------------------------------------


def test_manifests_are_valid() -> None:
    from runtimes.manifest import load_manifest

    conf = load_manifest(CONFORMANCE / "edgefn.toml")
    assert (conf.name, conf.version, conf.runtime, conf.entry) == (
        "conformance-node",
        "1.0.0",
        "node",
        "handler.js",
    )
    assert (conf.timeout_ms, conf.pool.concurrency) == (5000, 16)
    eta = load_manifest(ETA / "edgefn.toml")
    assert (eta.name, eta.version, eta.runtime, eta.entry) == (
        "eta-node",
        "1.0.0",
        "node",
        "index.js",
    )


async def test_eta_example(start_host: StartHost) -> None:
    host = await start_host(ETA / "index.js")
    trip = b'{"distance_km": 12.5, "speed_kmh": 50, "traffic": "heavy"}'
    one = body(await host.call(1, trip, json=True))
    assert one["eta_min"] == 27.0  # 12.5 km at 50 km/h is 15 min, times 1.8 for heavy traffic
    assert "Heavy traffic" in one["tip"]
    legs = [
        {"distance_km": 3, "speed_kmh": 30, "traffic": "light"},
        {"distance_km": 20, "speed_kmh": 60, "traffic": "moderate"},
    ]
    many = body(await host.call(2, json.dumps(legs).encode(), json=True))
    assert many["eta_min"] == 32.0  # 6 min + 20 min * 1.3
    assert "slowdowns" in many["tip"]
    wrapped = body(await host.call(3, json.dumps({"legs": legs}).encode()))  # raw bytes work too
    assert wrapped == many


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"distance_km": 10, "speed_kmh": 0}', b"speed_kmh must be a number above 0"),
        (
            b'{"distance_km": "far", "speed_kmh": 50}',
            b'distance_km must be a number >= 0, got "far"',
        ),
        (b'{"distance_km": 1, "speed_kmh": 50, "traffic": "gridlock"}', b"traffic must be one of"),
        (b'[{"distance_km": 1, "speed_kmh": 5}, 7]', b"leg 2 must be an object"),
        (b"[]", b"at least one leg"),
        (b"not json", b"must be JSON"),
    ],
)
async def test_eta_example_rejects_bad_input(
    start_host: StartHost, payload: bytes, message: bytes
) -> None:
    host = await start_host(ETA / "index.js")
    error = await host.call(1, payload)
    assert (error.kind, error.text(Key.ERROR_CODE)) == (Kind.ERROR, "function_error")
    assert error.payload.startswith(b"ValidationError: ")
    assert message in error.payload

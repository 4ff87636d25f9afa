"""One worker process and the agent's side of the worker protocol.

The worker is spawned with pipes; its stdout is parsed by a raw `asyncio.SubprocessProtocol`
(no stream readers: measured ~2-3x cheaper per round trip) into frames, and each RESULT/ERROR
resolves the future of the request with the same id. Deadlines are loop timers, not
`asyncio.wait_for` tasks, because a timer is a fraction of the cost on the hot path.

Anything the worker does wrong -- undecodable bytes, an answer to a request it was never sent,
exiting -- fails every request it holds with `WorkerCrashed`, and the pool replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from runtimes import protocol
from runtimes.capabilities import (
    OPS,
    CapabilityCall,
    CapabilityError,
    CapabilityHandler,
    CapabilityNotFound,
    CapabilityTimeout,
    CapabilityUnavailable,
    Op,
)
from runtimes.errors import (
    FunctionError,
    InvocationTimeout,
    RequestRejected,
    RuntimeErrorBase,
    WorkerCrashed,
)
from runtimes.invocation import Invocation, Result
from runtimes.manifest import Manifest
from runtimes.protocol import Frame, Key, Kind

log = logging.getLogger("edgefn.worker")

# Lines of stderr kept per worker to explain why it died (shown in status and errors).
STDERR_TAIL_LINES = 20
# A worker that does not send READY within this time is killed: loading a function is local
# file I/O plus module init, seconds at most even on a slow gateway.
START_TIMEOUT_S = 20.0
# After the process exited, how long to wait for its pipes to drain before declaring it gone.
EXIT_PIPE_WAIT_S = 0.2
# A worker killed at start is reaped within this time (SIGKILL cannot be ignored; this only
# bounds a stuck kernel or a grandchild holding the pipes).
EXIT_REAP_S = 5.0
# After SHUTDOWN, how long a worker may take to exit before it is killed.
EXIT_GRACE_S = 2.0
# A building-block call ends this share of its parent's remaining time (at least the minimum)
# before the parent's deadline: the parent must still have time to hear `timeout` and answer,
# or the nested call's overrun would become the parent's overrun.
CALL_RESERVE_SHARE = 0.2
CALL_RESERVE_MIN_S = 0.05

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_worker_ids = itertools.count(1)
_JSON_FLAG = int(protocol.Flag.JSON)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Frame]
    timer: asyncio.TimerHandle | None
    started: float
    # The caller's request id (X-Request-Id): the wire's request id is the worker's own counter,
    # so LOG frames are matched back to the request through this.
    request_id: str = ""
    # Loop time by which the request must be answered, and the invocation itself: a CALL the
    # function makes for it inherits both (a nested call never outlives its parent).
    deadline: float = 0.0
    inv: Invocation | None = None


class _Pipes(asyncio.SubprocessProtocol):
    """Routes pipe events into the owning Worker; holds no state of its own."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._worker._on_stdout(data)
        else:
            self._worker._on_stderr(data)

    def process_exited(self) -> None:
        # stderr may still hold the lines that explain the exit: finish when the pipes close
        # (connection_lost), or shortly after if a grandchild keeps them open.
        asyncio.get_running_loop().call_later(EXIT_PIPE_WAIT_S, self._worker._on_exit)

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker._on_exit()


class Worker:
    """A running worker. Use `await Worker.spawn(...)`; it returns once READY arrived."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        label: str,
        on_exit: Callable[[Worker], None] | None = None,
        capabilities: CapabilityHandler | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        self.id = next(_worker_ids)
        self.argv = list(argv)
        self.label = label
        self.pid = 0
        self.in_flight = 0
        self.served = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self.idle_since = time.monotonic()
        self.runtime = ""
        self.exit_reason = ""
        self.closing = False
        self.killed = False
        # True from READY until the worker is closing, killed or gone. A plain attribute, not a
        # property: the pool reads it several times per request.
        self.ready = False
        self._finished = False
        self._env = dict(env)
        self._cwd = cwd
        self._on_exit_cb = on_exit
        self._capabilities = capabilities
        self._manifest = manifest
        # Building-block calls being answered, so a dying worker cancels them.
        self._calls: set[asyncio.Task[None]] = set()
        self._decoder = protocol.FrameDecoder()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._ready: asyncio.Future[None] | None = None
        self._exited: asyncio.Future[None] | None = None
        self._stderr_buf = bytearray()
        # Frames written in one loop iteration go out in one write (see `_write`).
        self._wbuf: list[bytes] = []
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = logging.getLogger(f"edgefn.fn.{label}")

    # ---- life cycle -------------------------------------------------------------------

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        label: str,
        on_exit: Callable[[Worker], None] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        capabilities: CapabilityHandler | None = None,
        manifest: Manifest | None = None,
    ) -> Worker:
        worker = cls(
            argv,
            env=env,
            cwd=cwd,
            label=label,
            on_exit=on_exit,
            capabilities=capabilities,
            manifest=manifest,
        )
        await worker._start(start_timeout_s)
        return worker

    async def _start(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ready = loop.create_future()
        self._exited = loop.create_future()
        self.started_at = time.monotonic()
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _Pipes(self),
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                cwd=self._cwd,
            )
        except OSError as exc:
            raise WorkerCrashed(f"cannot start {self.argv[0]}: {exc.strerror or exc}") from exc
        self._transport = transport
        self.pid = transport.get_pid()
        # uvloop's pipe transports do not subclass asyncio.WriteTransport but behave as one.
        self._stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except asyncio.CancelledError:
            self.kill("start was cancelled")  # never leave a half-started process behind
            raise
        except TimeoutError:
            self.kill(f"no READY within {timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), EXIT_REAP_S)
            raise WorkerCrashed(f"worker did not become ready within {timeout_s:g} s") from None
        except WorkerCrashed as exc:
            # Wait for the exit to be reaped: the last stderr lines say why the function failed
            # to load, and a transport left open would outlive its event loop.
            self.kill("failed at start")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), EXIT_REAP_S)
            raise WorkerCrashed(f"{exc.message}{self._tail_suffix()}") from None
        self.ready_at = time.monotonic()
        self.idle_since = self.ready_at
        self.ready = self.alive and not (self.closing or self.killed)

    @property
    def cold_start_s(self) -> float:
        return self.ready_at - self.started_at if self.ready_at else 0.0

    @property
    def alive(self) -> bool:
        return self._exited is not None and not self._exited.done()

    def mark_closing(self) -> None:
        """Take no new requests (the pool is retiring this worker)."""
        self.closing = True
        self.ready = False

    def kill(self, reason: str) -> None:
        """SIGKILL now; every in-flight request fails with WorkerCrashed(reason)."""
        if not self.exit_reason:
            self.exit_reason = reason
        self.killed = True
        self.ready = False
        self._fail_all(WorkerCrashed(f"worker {self.pid} killed: {reason}"))
        if self._transport is not None and self.alive:
            with contextlib.suppress(ProcessLookupError):
                self._transport.kill()

    async def shutdown(self, grace_s: float = EXIT_GRACE_S) -> None:
        """Ask the worker to finish in-flight work and exit; kill it after `grace_s`."""
        self.mark_closing()
        if not self.alive:
            return
        self._write(protocol.encode(Frame(Kind.SHUTDOWN)))
        assert self._exited is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
        except TimeoutError:
            self.kill(f"did not exit within {grace_s:g} s of SHUTDOWN")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), 1.0)

    async def wait_exit(self) -> None:
        if self._exited is not None:
            await asyncio.shield(self._exited)

    # ---- requests ---------------------------------------------------------------------

    def invoke(
        self,
        inv: Invocation,
        *,
        static: bytes,
        on_timeout: Callable[[Worker, Invocation], None] | None = None,
    ) -> asyncio.Future[Frame]:
        """Send INVOKE; the future resolves with the RESULT/ERROR frame, or raises."""
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[Frame] = loop.create_future()
        if not self.alive:
            fut.set_exception(WorkerCrashed(f"worker {self.pid} is gone: {self.exit_reason}"))
            return fut
        rid = next(self._ids)
        deadline_ms = int(inv.timeout_s * 1000)
        frame = protocol.encode_invoke(
            rid,
            inv.payload,
            deadline_ms=deadline_ms,
            trace_id=inv.trace_id,
            content_type=inv.content_type,
            json=inv.is_json,
            static=static,
        )
        timer = loop.call_later(inv.timeout_s, self._on_deadline, rid, inv, on_timeout)
        now = loop.time()
        self._pending[rid] = _Pending(fut, timer, now, inv.request_id, now + inv.timeout_s, inv)
        self.in_flight += 1
        self._write(frame)
        return fut

    def _on_deadline(
        self,
        rid: int,
        inv: Invocation,
        on_timeout: Callable[[Worker, Invocation], None] | None,
    ) -> None:
        pending = self._pending.pop(rid, None)
        if pending is None:
            return
        self.in_flight -= 1
        if not pending.future.done():
            pending.future.set_exception(
                InvocationTimeout(f"function did not answer within {inv.timeout_s:g} s")
            )
        # The handler may be spinning: the only safe way to get the slot back is a new worker.
        self.kill(f"request {inv.request_id} overran its {inv.timeout_s:g} s deadline")
        if on_timeout is not None:
            on_timeout(self, inv)

    async def ping(self, timeout_s: float = 2.0) -> float:
        """Round trip of a PING, in seconds; raises WorkerCrashed when it does not come back."""
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        fut: asyncio.Future[Frame] = loop.create_future()
        self._pending[rid] = _Pending(fut, None, loop.time())
        started = loop.time()
        self._write(protocol.encode(Frame(Kind.PING, rid)))
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise WorkerCrashed(f"worker {self.pid} did not answer a ping") from None
        return loop.time() - started

    def _write(self, data: bytes) -> None:
        # Coalesce: under load many requests are sent in the same loop iteration; one pipe
        # write for all of them saves a syscall per request (measured ~30 us each here).
        if not self._wbuf:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._wbuf.append(data)

    def _flush(self) -> None:
        data, self._wbuf = self._wbuf, []
        if self._stdin is None or self._stdin.is_closing():
            return
        self._stdin.write(data[0] if len(data) == 1 else b"".join(data))

    # ---- pipe events ------------------------------------------------------------------

    def _on_stdout(self, data: bytes) -> None:
        try:
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
        except protocol.ProtocolError as exc:
            self._log.error("worker %s broke the protocol: %s", self.pid, exc)
            self.kill(f"protocol violation: {exc}")

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.kind
        if kind is Kind.RESULT or kind is Kind.ERROR or kind is Kind.PONG:
            pending = self._pending.pop(frame.request_id, None)
            if pending is None:
                raise protocol.ProtocolError(f"answer for unknown request id {frame.request_id}")
            if pending.timer is not None:
                pending.timer.cancel()
                self.in_flight -= 1
                self.served += 1
                if self.in_flight == 0:
                    self.idle_since = time.monotonic()
            if not pending.future.done():
                pending.future.set_result(frame)
        elif kind is Kind.LOG:
            self._forward_log(frame)
        elif kind is Kind.CALL:
            self._on_call(frame)
        elif kind is Kind.READY:
            self.runtime = frame.text(Key.RUNTIME)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        else:
            raise protocol.ProtocolError(f"unexpected {kind.name} frame from worker")

    # ---- building-block calls (worker -> agent) ----------------------------------------

    def _on_call(self, frame: Frame) -> None:
        """Answer a CALL in a task: many may be in flight, answered in any order."""
        try:
            call = self._call_from_frame(frame)
        except CapabilityError as exc:
            self._answer_call(frame.request_id, exc)
            return
        task = asyncio.get_running_loop().create_task(self._run_call(frame.request_id, call))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _call_from_frame(self, frame: Frame) -> CapabilityCall:
        op = frame.text(Key.OP)
        if op not in OPS:
            raise CapabilityNotFound(f"unknown building-block operation {op!r}")
        if self._capabilities is None or self._manifest is None:
            raise CapabilityUnavailable("this agent offers no building blocks")
        parent = self._pending.get(frame.number(Key.PARENT_ID))
        if parent is None or parent.inv is None:
            # Its invocation was answered or timed out already: nothing may run on its behalf.
            raise CapabilityTimeout("the invocation that made this call is no longer running")
        assert self._loop is not None
        left = parent.deadline - self._loop.time()
        left -= max(CALL_RESERVE_MIN_S, left * CALL_RESERVE_SHARE)
        if left <= 0:
            raise CapabilityTimeout("the calling invocation's deadline has passed")
        inv = parent.inv
        return CapabilityCall(
            op=cast(Op, op),
            target=frame.text(Key.TARGET),
            payload=frame.payload,
            request_id=inv.request_id,
            deadline_s=left,
            chain=(*inv.chain, self._manifest.name),
            trace_id=inv.trace_id,
            content_type=frame.text(Key.CONTENT_TYPE),
        )

    async def _run_call(self, call_id: int, call: CapabilityCall) -> None:
        assert self._capabilities is not None and self._manifest is not None
        try:
            # The handler bounds nested work by call.deadline_s itself; this outer bound makes
            # sure the function hears back before its own deadline whatever the handler does.
            answer = await asyncio.wait_for(
                self._capabilities.call(self._manifest, call), call.deadline_s
            )
        except TimeoutError:
            self._answer_call(call_id, CapabilityTimeout("the call ran past the deadline"))
        except CapabilityError as exc:
            self._answer_call(call_id, exc)
        except RuntimeErrorBase as exc:
            # A nested invoke's own failure (function error, crash, overload): the callee's
            # message and code reach the caller, which decides what to do with it.
            self._answer_call(call_id, exc)
        else:
            self._answer_call(call_id, answer)

    def _answer_call(self, call_id: int, answer: bytes | RuntimeErrorBase) -> None:
        if not self.alive or self.killed:
            return
        if isinstance(answer, bytes):
            self._write(protocol.encode(Frame(Kind.CALL_RESULT, call_id, answer)))
            return
        code = answer.sdk_code if isinstance(answer, CapabilityError) else answer.code
        if isinstance(answer, InvocationTimeout):
            code = CapabilityTimeout.sdk_code
        frame = Frame(
            Kind.CALL_ERROR,
            call_id,
            answer.message.encode("utf-8"),
            {Key.ERROR_CODE: code},
        )
        self._write(protocol.encode(frame))

    def _forward_log(self, frame: Frame) -> None:
        level = _LEVELS.get(frame.text(Key.LOG_LEVEL, "info").lower(), logging.INFO)
        if not self._log.isEnabledFor(level):
            return
        message = frame.payload.decode("utf-8", "replace").rstrip("\n")
        extra: dict[str, Any] = {"worker_pid": self.pid}
        if frame.request_id:
            # The client's id while the request is in flight (log lines written during the
            # handler always are: frames arrive in order, before its RESULT); a line a detached
            # callback writes after the answer keeps the wire id, the only one left.
            pending = self._pending.get(frame.request_id)
            if pending is not None and pending.request_id:
                extra["request_id"] = pending.request_id
            else:
                extra["request_id"] = str(frame.request_id)
        trace = frame.text(Key.TRACE_ID)
        if trace:
            extra["trace_id"] = trace
        self._log.log(level, "%s", message, extra=extra)

    def _on_stderr(self, data: bytes) -> None:
        buf = self._stderr_buf
        buf += data
        # Bound the partial line: a worker printing megabytes without a newline must not grow it.
        if len(buf) > 64 * 1024 and b"\n" not in buf:
            buf += b"\n"
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(buf[:nl]).decode("utf-8", "replace").rstrip("\r")
            del buf[: nl + 1]
            if line:
                self.stderr_tail.append(line)
                self._log.warning("%s", line, extra={"worker_pid": self.pid, "stream": "stderr"})

    def _on_exit(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.ready = False
        if self._stderr_buf:
            self._on_stderr(b"\n")
        code = self._transport.get_returncode() if self._transport else None
        how = _describe_exit(code)
        if not self.exit_reason:
            self.exit_reason = how
        err = WorkerCrashed(f"worker {self.pid} {how}{self._tail_suffix()}")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerCrashed(f"worker {how} before it was ready"))
            self._ready.exception()  # mark retrieved: the spawner may already have given up
        self._fail_all(err)
        for task in list(self._calls):
            task.cancel()  # their answers have nobody to go to
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)
        if self._transport is not None:
            self._transport.close()
        if self._on_exit_cb is not None:
            self._on_exit_cb(self)

    def _fail_all(self, err: RuntimeErrorBase) -> None:
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if item.timer is not None:
                item.timer.cancel()
                self.in_flight -= 1
            if not item.future.done():
                item.future.set_exception(err)

    def _tail_suffix(self) -> str:
        # Stack frames are indented in Node, Go and C++ traces; the lines that say what went
        # wrong are not.
        lines = [line for line in self.stderr_tail if not line[:1].isspace()]
        if not lines:
            return ""
        return ": " + " | ".join(lines[-3:])


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def result_from_frame(frame: Frame, queued_s: float, run_s: float) -> Result:
    """Turn a worker's answer into a Result, or raise the function's error."""
    if frame.kind is Kind.ERROR:
        code = frame.text(Key.ERROR_CODE, "function_error") or "function_error"
        message = frame.payload.decode("utf-8", "replace") or "function failed"
        if code == RequestRejected.code:
            raise RequestRejected(message)
        raise FunctionError(message, code=code)
    ctype = frame.text(Key.CONTENT_TYPE)
    if not ctype:
        ctype = "application/json" if frame.flags & _JSON_FLAG else "application/octet-stream"
    return Result(frame.payload, ctype, queued_s, run_s)


def worker_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """Environment of a worker: a small allow-list of the agent's plus the function's own.

    Secrets in the agent's environment (tokens, credentials) must not leak into functions.
    """
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR")
    env = {k: base[k] for k in keep if k in base}
    env.setdefault("PATH", os.defpath)
    env.update(extra)
    return env

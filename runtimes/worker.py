"""One worker process and the agent's side of the worker protocol.

The worker is spawned with pipes; its stdout is parsed by a raw `asyncio.SubprocessProtocol`
(no stream readers: measured ~2-3x cheaper per round trip) into frames, and each RESULT/ERROR
resolves the future of the request with the same id. Deadlines are loop timers, not
`asyncio.wait_for` tasks, because a timer is a fraction of the cost on the hot path.

Anything the worker does wrong -- undecodable bytes, an answer to a request it was never sent,
exiting -- fails every request it holds with `WorkerCrashed`, and the pool replaces it.

Its parts with a job of their own live beside it: `worker_process` (environment allow-list,
pipes, start and exit bounds), `worker_calls` (building-block CALL frames) and `worker_output`
(answers into Results, LOG frames and stderr into log records).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from runtimes import protocol
from runtimes.capabilities import CapabilityHandler
from runtimes.errors import InvocationTimeout, RuntimeErrorBase, WorkerCrashed
from runtimes.invocation import Invocation
from runtimes.manifest import Manifest
from runtimes.protocol import Frame, Key, Kind
from runtimes.worker_calls import CALL_RESERVE_MIN_S, CALL_RESERVE_SHARE, WorkerCalls
from runtimes.worker_output import (
    STDERR_TAIL_LINES,
    forward_log,
    result_from_frame,
    stderr_lines,
    tail_suffix,
)
from runtimes.worker_process import (
    EXIT_GRACE_S,
    EXIT_PIPE_WAIT_S,
    EXIT_REAP_S,
    START_TIMEOUT_S,
    Pipes,
    describe_exit,
    worker_env,
)

# What other modules import from here: `Worker`, and the helpers and bounds that moved to
# `worker_calls`, `worker_output` and `worker_process` (re-exported so imports keep working).
__all__ = [
    "CALL_RESERVE_MIN_S",
    "CALL_RESERVE_SHARE",
    "EXIT_GRACE_S",
    "EXIT_PIPE_WAIT_S",
    "EXIT_REAP_S",
    "START_TIMEOUT_S",
    "STDERR_TAIL_LINES",
    "Worker",
    "result_from_frame",
    "worker_env",
]

log = logging.getLogger("edgefn.worker")

_worker_ids = itertools.count(1)


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
        # Optional frames the host said it takes (READY's FEATURES): a Go function built with
        # an older SDK would treat a NOTIFY as a protocol error, so it is never sent one.
        self.features: frozenset[str] = frozenset()
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
        self._calls = WorkerCalls(
            capabilities,
            manifest,
            send=self._write,
            may_answer=lambda: self.alive and not self.killed,
        )
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
                lambda: Pipes(self),
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
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._ready)
        except asyncio.CancelledError:
            self.kill("start was cancelled")  # never leave a half-started process behind
            raise
        except TimeoutError:
            self.kill(f"no READY within {timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_REAP_S):
                    await asyncio.shield(self._exited)
            raise WorkerCrashed(f"worker did not become ready within {timeout_s:g} s") from None
        except WorkerCrashed as exc:
            # Wait for the exit to be reaped: the last stderr lines say why the function failed
            # to load, and a transport left open would outlive its event loop.
            self.kill("failed at start")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_REAP_S):
                    await asyncio.shield(self._exited)
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
            async with asyncio.timeout(grace_s):
                await asyncio.shield(self._exited)
        except TimeoutError:
            self.kill(f"did not exit within {grace_s:g} s of SHUTDOWN")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(self._exited)

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
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            self._pending.pop(rid, None)
            raise WorkerCrashed(f"worker {self.pid} did not answer a ping") from None
        return loop.time() - started

    def notify(self, op: str, payload: bytes) -> bool:
        """Send a NOTIFY (no answer expected); False when the worker cannot take it (not ready,
        or its host did not announce `notify` in READY)."""
        if not self.ready or self.killed or "notify" not in self.features:
            return False
        frame = Frame(Kind.NOTIFY, 0, payload, {Key.OP: op}, protocol.Flag.JSON)
        self._write(protocol.encode(frame))
        return True

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
            self.features = frozenset(frame.text(Key.FEATURES).split(",")) - {""}
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        else:
            raise protocol.ProtocolError(f"unexpected {kind.name} frame from worker")

    # ---- building-block calls (worker -> agent) ----------------------------------------

    def _on_call(self, frame: Frame) -> None:
        """Hand a CALL to `WorkerCalls` with the invocation it was made for, if still pending."""
        parent = self._pending.get(frame.number(Key.PARENT_ID))
        assert self._loop is not None
        if parent is None:
            self._calls.on_call(frame, None, 0.0, self._loop.time())
        else:
            self._calls.on_call(frame, parent.inv, parent.deadline, self._loop.time())

    def _forward_log(self, frame: Frame) -> None:
        pending = self._pending.get(frame.request_id) if frame.request_id else None
        client_id = pending.request_id if pending is not None else ""
        forward_log(self._log, frame, self.pid, client_id)

    def _on_stderr(self, data: bytes) -> None:
        for line in stderr_lines(self._stderr_buf, data):
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
        how = describe_exit(code)
        if not self.exit_reason:
            self.exit_reason = how
        err = WorkerCrashed(f"worker {self.pid} {how}{self._tail_suffix()}")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerCrashed(f"worker {how} before it was ready"))
            self._ready.exception()  # mark retrieved: the spawner may already have given up
        self._fail_all(err)
        self._calls.cancel_all()  # their answers have nobody to go to
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
        return tail_suffix(self.stderr_tail)

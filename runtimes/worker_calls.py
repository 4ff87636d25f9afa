"""Building-block calls (worker -> agent): a function's CALL frames answered for its worker.

`build_call`, `answer_call` and `sdk_code` are the host-independent part, shared with the
in-process C++ host (`runtimes.cpp.inproc_calls`).

A function calls a building block by sending CALL with the wire id of the invocation it is
serving (`PARENT_ID`); the worker (`runtimes.worker`) hands the frame here with that parent's
invocation and deadline. The call becomes a `CapabilityCall` carrying the caller's request id,
chain and trace, runs in its own task (many may be in flight, answered in any order), and its
answer goes back as CALL_RESULT or CALL_ERROR.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

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
from runtimes.errors import InvocationTimeout, RuntimeErrorBase
from runtimes.invocation import Invocation
from runtimes.manifest import Manifest
from runtimes.protocol import Frame, Key, Kind

# A building-block call ends this share of its parent's remaining time (at least the minimum)
# before the parent's deadline: the parent must still have time to hear `timeout` and answer,
# or the nested call's overrun would become the parent's overrun.
CALL_RESERVE_SHARE = 0.2
CALL_RESERVE_MIN_S = 0.05


class WorkerCalls:
    """The building-block calls of one worker's functions, each answered in its own task."""

    def __init__(
        self,
        capabilities: CapabilityHandler | None,
        manifest: Manifest | None,
        *,
        send: Callable[[bytes], None],
        may_answer: Callable[[], bool],
    ) -> None:
        self._capabilities = capabilities
        self._manifest = manifest
        # `send` writes an encoded frame to the worker; `may_answer` says whether anybody is
        # still there to read it (the worker is alive and was not killed).
        self._send = send
        self._may_answer = may_answer
        # Building-block calls being answered, so a dying worker cancels them.
        self._tasks: set[asyncio.Task[None]] = set()

    def on_call(
        self, frame: Frame, parent: Invocation | None, parent_deadline: float, now: float
    ) -> None:
        """Answer a CALL in a task: many may be in flight, answered in any order.

        `parent` is the invocation the call is made for (None when it is no longer pending),
        `parent_deadline` the loop time by which it must be answered, `now` the loop time.
        """
        try:
            call = self._call_from_frame(frame, parent, parent_deadline, now)
        except CapabilityError as exc:
            self._answer(frame.request_id, exc)
            return
        task = asyncio.get_running_loop().create_task(self._run(frame.request_id, call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_all(self) -> None:
        """The worker is gone: the calls' answers have nobody to go to."""
        for task in list(self._tasks):
            task.cancel()

    def _call_from_frame(
        self, frame: Frame, parent: Invocation | None, parent_deadline: float, now: float
    ) -> CapabilityCall:
        return build_call(
            self._capabilities,
            self._manifest,
            op=frame.text(Key.OP),
            target=frame.text(Key.TARGET),
            payload=frame.payload,
            content_type=frame.text(Key.CONTENT_TYPE),
            parent=parent,
            left_s=parent_deadline - now,
        )

    async def _run(self, call_id: int, call: CapabilityCall) -> None:
        assert self._capabilities is not None and self._manifest is not None
        self._answer(call_id, await answer_call(self._capabilities, self._manifest, call))

    def _answer(self, call_id: int, answer: bytes | RuntimeErrorBase) -> None:
        if not self._may_answer():
            return
        self._send(encode_answer(call_id, answer))


def build_call(
    capabilities: CapabilityHandler | None,
    manifest: Manifest | None,
    *,
    op: str,
    target: str,
    payload: bytes,
    content_type: str,
    parent: Invocation | None,
    left_s: float,
) -> CapabilityCall:
    """The call a running invocation (`parent`, `left_s` seconds from its deadline) made.

    Shared by every host: the isolated workers' CALL frames and the in-process C++ host.
    Raises the CapabilityError the function should hear when the call cannot even start."""
    if op not in OPS:
        raise CapabilityNotFound(f"unknown building-block operation {op!r}")
    if capabilities is None or manifest is None:
        raise CapabilityUnavailable("this agent offers no building blocks")
    if parent is None:
        # Its invocation was answered or timed out already: nothing may run on its behalf.
        raise CapabilityTimeout("the invocation that made this call is no longer running")
    left = left_s - max(CALL_RESERVE_MIN_S, left_s * CALL_RESERVE_SHARE)
    if left <= 0:
        raise CapabilityTimeout("the calling invocation's deadline has passed")
    return CapabilityCall(
        op=cast(Op, op),
        target=target,
        payload=payload,
        request_id=parent.request_id,
        deadline_s=left,
        chain=(*parent.chain, manifest.name),
        trace_id=parent.trace_id,
        content_type=content_type,
    )


async def answer_call(
    capabilities: CapabilityHandler, manifest: Manifest, call: CapabilityCall
) -> bytes | RuntimeErrorBase:
    """The answer bytes, or the error the function hears (never raises for a refusal)."""
    try:
        # The handler bounds nested work by call.deadline_s itself; this outer bound makes
        # sure the function hears back before its own deadline whatever the handler does.
        async with asyncio.timeout(call.deadline_s):
            return await capabilities.call(manifest, call)
    except TimeoutError:
        return CapabilityTimeout("the call ran past the deadline")
    except RuntimeErrorBase as exc:
        # A refusal, or a nested invoke's own failure (function error, crash, overload): the
        # callee's message and code reach the caller, which decides what to do with it.
        return exc


def sdk_code(error: RuntimeErrorBase) -> str:
    """The code a function sees for `error` (CALL_ERROR's ERROR_CODE)."""
    if isinstance(error, InvocationTimeout):
        return CapabilityTimeout.sdk_code
    return error.sdk_code if isinstance(error, CapabilityError) else error.code


def encode_answer(call_id: int, answer: bytes | RuntimeErrorBase) -> bytes:
    """CALL_RESULT with the answer's bytes, or CALL_ERROR with the SDK's code for the error."""
    if isinstance(answer, bytes):
        return protocol.encode(Frame(Kind.CALL_RESULT, call_id, answer))
    frame = Frame(
        Kind.CALL_ERROR,
        call_id,
        answer.message.encode("utf-8"),
        {Key.ERROR_CODE: sdk_code(answer)},
    )
    return protocol.encode(frame)

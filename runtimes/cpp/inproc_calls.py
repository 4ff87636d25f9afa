"""Building-block calls of in-process C++ functions: from a pool thread to the agent's loop.

An in-process function runs on a thread of its executor's pool with the GIL released. When it
calls `ctx.invoke/publish/state/config/secret`, the host (`_host.cpp`, `edgefn_call.call`)
takes the GIL and calls the Python callable made here for that invocation. The callable hops
to the event loop (`run_coroutine_threadsafe`), where the same code as for isolated workers
(`runtimes.worker_calls.build_call` / `answer_call`) asks the agent's capability handler, and
blocks the pool thread (not the loop) until the answer. It returns `(code, bytes)`: code "" and
the answer, or the stable code and the message.

Inline functions (`inline = true`) run on the loop thread itself, where waiting for the loop
would deadlock: the host answers their calls `unavailable` without coming here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

from runtimes.capabilities import CapabilityError, CapabilityHandler, CapabilityTimeout
from runtimes.invocation import Invocation
from runtimes.manifest import Manifest
from runtimes.worker_calls import answer_call, build_call, sdk_code

# (op, target, payload, content type) -> (code or "", answer or message)
Caller = Callable[[str, str, bytes, str], tuple[str, bytes]]

# How long past the invocation's deadline a pool thread waits for the loop's answer: the loop
# answers `timeout` itself before the deadline (the call's reserve); this is only a backstop.
GRACE_S = 0.5


class InProcessCalls:
    """Makes the per-invocation callable the host calls; one per executor."""

    def __init__(self, capabilities: CapabilityHandler | None, manifest: Manifest) -> None:
        self._capabilities = capabilities
        self._manifest = manifest

    def caller(self, loop: asyncio.AbstractEventLoop, inv: Invocation, deadline: float) -> Caller:
        """The host's callback for `inv`, whose deadline is `deadline` in `loop` time."""

        def call(op: str, target: str, payload: bytes, content_type: str) -> tuple[str, bytes]:
            coro = self._answer(loop, inv, deadline, op, target, payload, content_type)
            try:
                fut = asyncio.run_coroutine_threadsafe(coro, loop)
            except RuntimeError:  # the loop is closed: the agent is going away
                coro.close()
                return "unavailable", b"the agent is shutting down"
            try:
                return fut.result(timeout=max(0.0, deadline - loop.time()) + GRACE_S)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                return CapabilityTimeout.sdk_code, b"no answer before the invocation's deadline"
            except concurrent.futures.CancelledError:
                return "unavailable", b"the call was cancelled (the agent is stopping)"

        return call

    async def _answer(
        self,
        loop: asyncio.AbstractEventLoop,
        inv: Invocation,
        deadline: float,
        op: str,
        target: str,
        payload: bytes,
        content_type: str,
    ) -> tuple[str, bytes]:
        try:
            call = build_call(
                self._capabilities,
                self._manifest,
                op=op,
                target=target,
                payload=payload,
                content_type=content_type,
                parent=inv,
                left_s=deadline - loop.time(),
            )
        except CapabilityError as exc:
            return exc.sdk_code, exc.message.encode("utf-8")
        assert self._capabilities is not None  # build_call refuses a call without a handler
        answer = await answer_call(self._capabilities, self._manifest, call)
        if isinstance(answer, bytes):
            return "", answer
        return sdk_code(answer), answer.message.encode("utf-8")

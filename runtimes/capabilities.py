"""Building blocks seen from `runtimes`: what a function's outgoing call is, and who answers it.

A worker sends a CALL frame (docs/protocol.md) while one of its invocations runs; the worker
object (`runtimes.worker`) turns it into a `CapabilityCall` carrying the caller's request id,
deadline and invocation chain, and hands it to the `CapabilityHandler` it was built with. The
handler lives in `edge_agent` (`edge_agent.capabilities.Broker`): `runtimes` must not import the
agent, so this module only names the contract.

The errors here are the five stable codes every SDK exposes (`not_permitted`, `not_found`,
`timeout`, `quota_exceeded`, `unavailable`). Their Python class codes are prefixed
(`capability_...`) because error codes are unique across the whole tree; `sdk_code` is what goes
on the wire in the CALL_ERROR frame's ERROR_CODE header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from runtimes.errors import RuntimeErrorBase
from runtimes.manifest import Manifest

Op = Literal["invoke", "publish", "state.get", "state.set", "state.delete", "config", "secret"]
OPS: frozenset[str] = frozenset(get_args(Op))


class CapabilityError(RuntimeErrorBase):
    """A building-block call failed; `sdk_code` is the code the function sees."""

    code = "capability_error"
    category = "function"
    status = 500
    sdk_code = "unavailable"


class NotPermitted(CapabilityError):
    """The manifest's [permissions] do not grant this call (or it would close a cycle)."""

    code = "capability_not_permitted"
    status = 403
    sdk_code = "not_permitted"


class CapabilityNotFound(CapabilityError):
    """The named function, state key or operation does not exist."""

    code = "capability_not_found"
    status = 404
    sdk_code = "not_found"


class CapabilityTimeout(CapabilityError):
    """The call could not finish within the caller's remaining deadline."""

    code = "capability_timeout"
    status = 504
    sdk_code = "timeout"


class QuotaExceeded(CapabilityError):
    """The function's state store would grow past `[permissions] state.max_bytes`."""

    code = "capability_quota_exceeded"
    status = 507
    sdk_code = "quota_exceeded"


class CapabilityUnavailable(CapabilityError):
    """The agent cannot serve the call now (no platform configured, store closed, ...)."""

    code = "capability_unavailable"
    status = 503
    sdk_code = "unavailable"


SDK_CODES: tuple[str, ...] = (
    "not_permitted",
    "not_found",
    "timeout",
    "quota_exceeded",
    "unavailable",
)


@dataclass(frozen=True, slots=True)
class CapabilityCall:
    """One call a function made while serving `request_id`."""

    op: Op
    target: str  # function name, topic, state key or secret name; "" for config
    payload: bytes
    request_id: str  # the caller's X-Request-Id: refusals are logged with it
    deadline_s: float  # seconds the caller's invocation has left when the call arrived
    chain: tuple[str, ...]  # functions on the invocation path, the caller last (cycle check)
    trace_id: str = ""
    content_type: str = ""  # of the payload (invoke: what the callee receives)


class CapabilityHandler(Protocol):
    """Answers building-block calls; raises `CapabilityError` subclasses for refusals."""

    async def call(self, manifest: Manifest, call: CapabilityCall) -> bytes:
        """The answer's payload bytes (invoke: the callee's result; state.get: the value)."""
        ...

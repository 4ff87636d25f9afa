"""Errors the agent itself raises; `runtimes.errors` has the runtime ones, in the same shape."""

from __future__ import annotations

from runtimes.errors import RuntimeErrorBase


class AgentError(RuntimeErrorBase):
    code = "agent_error"
    status = 500


class UnknownFunction(AgentError):
    code = "unknown_function"
    status = 404


class PayloadTooLarge(AgentError):
    code = "payload_too_large"
    status = 413


class BadRequest(AgentError):
    code = "bad_request"
    status = 400


class StartupError(AgentError):
    """The agent cannot start (data dir unwritable, port taken...): exit with a clear message."""

    code = "startup_failed"

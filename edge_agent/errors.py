"""The `edge_agent` subtree of the one error tree.

`AgentError` derives from `runtimes.errors.RuntimeErrorBase` rather than straight from the root
because the agent's errors are answered by the same local HTTP API as the runtime ones: they carry
an HTTP `status` and the API maps both alike.
"""

from __future__ import annotations

from runtimes.errors import RuntimeErrorBase


class AgentError(RuntimeErrorBase):
    """The root of the `edge_agent` subtree."""

    code = "agent_error"
    status = 500


class UnknownFunction(AgentError):
    code = "unknown_function"
    category = "request"
    status = 404


class PayloadTooLarge(AgentError):
    code = "payload_too_large"
    category = "request"
    status = 413


class StartupError(AgentError):
    """The agent cannot start (data dir unwritable, port taken...): exit with a clear message."""

    code = "startup_failed"
    category = "config"

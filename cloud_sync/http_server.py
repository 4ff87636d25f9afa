"""What edgefn's two aiohttp servers share: the agent's local API and the platform.

* The JSON error body for what no handler expected (`escaped_error_answer`): the agent's
  per-route `_guarded` wrapper and the platform's `json_errors` middleware both answer through
  it, so a client parses one shape (`{"error": {"code", "message"}}`) whatever refused it.
* `bound_port(runner)`: the port a server listens on after binding port 0, which both write
  into their state file for scripts and tests.
"""

from __future__ import annotations

import logging
import socket

from aiohttp import web

from hardware.errors import EdgefnError

# Stable codes for the statuses aiohttp answers on its own (no route, wrong method, a body over
# the limit): the agent's API and the platform answer those in the same JSON error body as their
# own errors, so a client parses one shape whatever refused it.
HTTP_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    500: "internal",
}


def escaped_error_answer(
    exc: Exception, *, server: str, log: logging.Logger, where: str
) -> tuple[int, str, str] | None:
    """(status, code, message) for an error that escaped a handler of `server` ("agent").

    aiohttp's own refusals (no route, wrong method) get the code of their status; its 2xx/3xx
    "exceptions" (redirects) answer None: the caller re-raises them. An edgefn error keeps its
    stable code and message, and its HTTP status where its subtree carries one (`runtimes`,
    `edge_agent`); without one it is a 500. Anything else is a bug: a 500 `internal`, with the
    detail only in the server's log (it may name paths or keys). Both are logged with their
    traceback, as `where` ("GET /v1/health").
    """
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        return exc.status, HTTP_STATUS_CODES.get(exc.status, "http_error"), exc.reason
    log.error("unhandled error on %s", where, exc_info=exc)
    if isinstance(exc, EdgefnError):
        status = getattr(exc, "status", 500)
        if not isinstance(status, int) or not 400 <= status <= 599:
            status = 500
        return status, exc.code, exc.message
    return 500, "internal", f"internal error (see the {server} log)"


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port `runner` listens on (0 when it is not listening on one)."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    server = getattr(runner, "server", None)
    sockets: list[socket.socket] = getattr(server, "sockets", []) if server else []
    return sockets[0].getsockname()[1] if sockets else 0

"""Limits on the API listener, for clients on a LAN that may be slow, broken or hostile.

aiohttp parses requests; this module only bounds what a connection may hold:

- **Header count and size**: aiohttp's parser limits (`max_headers`, `max_field_size`); going
  over them is answered 431 `headers_too_large` as JSON, like every other API error, instead of
  aiohttp's plain-text 400. Every other refusal of aiohttp's parser is answered as JSON too
  (`edge_agent.api.JsonErrorHandler`, the base of `LimitedHandler`).
- **Header read timeout**: a connection must deliver its first request's headers within
  `header_timeout_s` or it is closed. This is what cuts off slow-loris clients that trickle a
  header byte now and then (aiohttp's keep-alive timer is reset by every byte).
- **Connection cap**: at most `max_connections` at once. When full, the oldest connection still
  waiting for its headers is closed to make room: under a slow-loris flood new clients are served
  and the attacker's connections go first. When none is waiting for its first headers (all
  serve requests or idle between keep-alive requests, closed by aiohttp after 75 s), the
  newcomer gets 503 and is closed.

The body limit (413) is the API's own (`max_body_bytes`), and the per-token concurrency limit
(429) sits with the token check in `edge_agent.auth`.

The hook into aiohttp is `LimitedAppRunner`: an `AppRunner` whose server hands out
`LimitedHandler`s (an aiohttp `RequestHandler` subclass). It overrides the runner's
`_make_server`, aiohttp's one place to choose the protocol factory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from edge_agent.api import JsonErrorHandler

log = logging.getLogger("edgefn.listener")


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_connections: int = 256
    header_timeout_s: float = 10.0
    max_headers: int = 64
    max_header_bytes: int = 8190  # per header line; aiohttp's default


# The error codes this module answers with itself (the OpenAPI test reads them).
HEADERS_TOO_LARGE = "headers_too_large"
CODES = frozenset({HEADERS_TOO_LARGE, "unavailable"})

_BUSY_BODY = json.dumps(
    {"error": {"code": "unavailable", "message": "too many connections, retry later"}}
).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class LimitedHandler(JsonErrorHandler):
    """One connection: a header deadline until its first request, and JSON 431s."""

    _limited_server: LimitedServer
    _deadline: asyncio.TimerHandle | None = None
    opened_at: float = 0.0
    waiting_for_headers = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.opened_at = time.monotonic()
        server = self._limited_server
        if not server.admit(self):
            self.waiting_for_headers = False
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._deadline = self._loop.call_later(server.limits.header_timeout_s, self._too_slow)

    def headers_complete(self) -> None:
        if self.waiting_for_headers:
            self.waiting_for_headers = False
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.waiting_for_headers and self.transport is not None:
            log.info(
                "closing a connection from %s: no complete request headers in %g s",
                _peer(self),
                self._limited_server.limits.header_timeout_s,
            )
            self.transport.close()

    def evict(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._limited_server.release(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400 and _headers_too_large(exc):
            body = {
                "error": {
                    "code": HEADERS_TOO_LARGE,
                    "message": "request headers exceed the limit "
                    f"({self._limited_server.limits.max_headers} headers, "
                    f"{self._limited_server.limits.max_header_bytes} bytes per line)",
                }
            }
            resp = web.json_response(body, status=431)
            resp.force_close()
            return resp
        return super().handle_error(request, status, exc, message)


def _headers_too_large(exc: BaseException | None) -> bool:
    if isinstance(exc, LineTooLong):
        return True
    return isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower()


def _peer(handler: web_protocol.RequestHandler) -> str:
    peer = handler.transport.get_extra_info("peername") if handler.transport else None
    return str(peer[0]) if isinstance(peer, tuple) else "?"


class LimitedServer(web.Server):
    """aiohttp's Server, handing out LimitedHandlers and counting them."""

    def __init__(self, *args: Any, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._open: dict[LimitedHandler, None] = {}  # insertion order = age
        factory = self.request_factory

        def request_factory(message: Any, payload: Any, protocol: Any, *rest: Any) -> Any:
            if isinstance(protocol, LimitedHandler):
                protocol.headers_complete()
            return factory(message, payload, protocol, *rest)

        self.request_factory = request_factory

    def __call__(self) -> LimitedHandler:
        kwargs = dict(self._kwargs)
        kwargs.setdefault("max_headers", self.limits.max_headers)
        kwargs.setdefault("max_field_size", self.limits.max_header_bytes)
        kwargs.setdefault("max_line_size", self.limits.max_header_bytes)
        handler = LimitedHandler(self, loop=self._loop, **kwargs)
        handler._limited_server = self
        return handler

    def admit(self, handler: LimitedHandler) -> bool:
        if len(self._open) >= self.limits.max_connections:
            idle = next((h for h in self._open if h.waiting_for_headers), None)
            if idle is None:
                log.warning(
                    "refusing a connection from %s: %d connections open",
                    _peer(handler),
                    len(self._open),
                )
                return False
            self._open.pop(idle)
            idle.evict()
        self._open[handler] = None
        return True

    def release(self, handler: LimitedHandler) -> None:
        self._open.pop(handler, None)


class LimitedAppRunner(web.AppRunner):
    """An AppRunner whose server is a LimitedServer (see the module docstring)."""

    def __init__(self, app: web.Application, *, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup, freezes it
        return LimitedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            limits=self._limits,
            **plain._kwargs,
        )

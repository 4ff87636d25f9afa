"""Limits on the API listener, for clients on a LAN that may be slow, broken or hostile.

aiohttp parses requests; this module only bounds what a connection may hold:

- **Header count and size**: aiohttp's parser limits (`max_headers`, `max_field_size`); going
  over them is answered 431 `headers_too_large` as JSON, like every other API error, instead of
  aiohttp's plain-text 400. Every other refusal of aiohttp's parser is answered as JSON too
  (`edge_agent.api.JsonErrorHandler`, the base of `LimitedHandler`).
- **Header read timeout**: every request's headers must arrive within `header_timeout_s` of
  its first byte (of the connection opening, for the first request) or the connection is
  closed. This is what cuts off slow-loris clients that trickle a header byte now and then, on
  the first request and on every later one of a keep-alive connection.
- **Idle timeout**: a keep-alive connection that sends nothing for `idle_timeout_s` after a
  response is closed. aiohttp's own keep-alive timer (75 s by default) would let an idle client
  hold a connection slot far longer than a LAN client needs between requests.
- **Connection cap**: at most `max_connections` at once. When full, the oldest connection still
  waiting for headers is closed to make room: under a slow-loris flood new clients are served
  and the attacker's connections go first. When none is waiting for headers (all serve requests
  or idle between keep-alive requests, closed after `idle_timeout_s`), the newcomer gets 503 and
  is closed.

The body limit (413) is the API's own (`max_body_bytes`), and the per-token concurrency limit
(429) sits with the token check in `edge_agent.auth`.

With `fast_api`, every connection starts on `edge_agent.fastpath.FastProtocol`, which serves
`POST /v1/functions/{name}/invoke` itself under the same limits (it is admitted, timed and
evicted like a `LimitedHandler`) and hands any other request's connection to a
`LimitedHandler`.

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

from edge_agent.api import Api, JsonErrorHandler
from edge_agent.fastpath import FastProtocol

log = logging.getLogger("edgefn.listener")


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_connections: int = 256
    header_timeout_s: float = 10.0
    # Long enough for a client calling every few seconds to reuse its connection, short enough
    # that idle clients give their slots back soon (aiohttp's default is 75 s).
    idle_timeout_s: float = 15.0
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
    """One connection: a header deadline for every request, an idle deadline between them.

    States: `waiting_for_headers` (deadline header_timeout_s), serving (no deadline: the API's
    own timeouts bound a request), idle after a keep-alive response (deadline idle_timeout_s;
    the first byte of the next request starts its header deadline).
    """

    _limited_server: LimitedServer
    _deadline: asyncio.TimerHandle | None = None
    opened_at: float = 0.0
    waiting_for_headers = True
    idle = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.opened_at = time.monotonic()
        server = self._limited_server
        if not server.admit(self):
            self.waiting_for_headers = False
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._arm(server.limits.header_timeout_s, self._too_slow)

    def _arm(self, delay: float, callback: Any) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self.idle and data:
            # The next request on a keep-alive connection: its headers get the same deadline
            # as the first request's.
            self.idle = False
            self.waiting_for_headers = True
            self._arm(self._limited_server.limits.header_timeout_s, self._too_slow)
        super().data_received(data)

    def headers_complete(self) -> None:
        self.waiting_for_headers = False
        self.idle = False
        self._disarm()

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._request_done()

    def _request_done(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._messages:
            # A pipelined request already parsed: it is served next, no idle time.
            return
        self.idle = True
        self._arm(self._limited_server.limits.idle_timeout_s, self._idle_too_long)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.waiting_for_headers and self.transport is not None:
            log.info(
                "closing a connection from %s: no complete request headers in %g s",
                _peer(self),
                self._limited_server.limits.header_timeout_s,
            )
            self.transport.close()

    def _idle_too_long(self) -> None:
        self._deadline = None
        if self.idle and self.transport is not None:
            log.debug(
                "closing a keep-alive connection from %s: idle for %g s",
                _peer(self),
                self._limited_server.limits.idle_timeout_s,
            )
            self.transport.close()

    def evict(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
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

    def __init__(
        self, *args: Any, limits: ListenerLimits, fast_api: Api | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.fast_api = fast_api  # edge_agent.fastpath serves its invoke route
        self.busy_answer = _BUSY
        # LimitedHandlers and FastProtocols; insertion order = age.
        self._open: dict[Any, None] = {}
        factory = self.request_factory

        def request_factory(message: Any, payload: Any, protocol: Any, *rest: Any) -> Any:
            if isinstance(protocol, LimitedHandler):
                protocol.headers_complete()
            return factory(message, payload, protocol, *rest)

        self.request_factory = request_factory

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        """The protocol of a new connection: the fast invoke path in front when it is on."""
        if self.fast_api is not None:
            return FastProtocol(self, self.fast_api)
        return self.make_handler()

    def make_handler(self) -> LimitedHandler:
        kwargs = dict(self._kwargs)
        kwargs.setdefault("max_headers", self.limits.max_headers)
        kwargs.setdefault("max_field_size", self.limits.max_header_bytes)
        kwargs.setdefault("max_line_size", self.limits.max_header_bytes)
        # aiohttp's own timer as a backstop; ours (idle_timeout_s) closes idle connections first.
        kwargs.setdefault("keepalive_timeout", self.limits.idle_timeout_s + 1.0)
        handler = LimitedHandler(self, loop=self._loop, **kwargs)
        handler._limited_server = self
        return handler

    def admit(self, handler: Any) -> bool:
        if len(self._open) >= self.limits.max_connections:
            idle = next((h for h in self._open if h.waiting_for_headers), None)
            if idle is None:
                log.warning("refusing a connection: %d connections open", len(self._open))
                return False
            self._open.pop(idle)
            idle.evict()
        self._open[handler] = None
        return True

    def release(self, handler: Any) -> None:
        self._open.pop(handler, None)


class LimitedAppRunner(web.AppRunner):
    """An AppRunner whose server is a LimitedServer (see the module docstring)."""

    def __init__(
        self,
        app: web.Application,
        *,
        limits: ListenerLimits,
        fast_api: Api | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits
        self._fast_api = fast_api

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup, freezes it
        return LimitedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            limits=self._limits,
            fast_api=self._fast_api,
            **plain._kwargs,
        )

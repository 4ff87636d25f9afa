"""The local HTTP API (`/v1/...`): raw bytes in, raw bytes out, errors as JSON with a stable code.

Start reading the invocation path here: `invoke()` -> `Router.invoke` -> executor. The
OpenAPI document served at `/v1/openapi.json` is `edge_agent/openapi.json`; keep both in step.

Errors leave as JSON with a stable code without an aiohttp middleware: each handler is wrapped
by `_guarded`, and a last catch-all route (`_no_route`) answers paths and methods that match no
route (404/405). What aiohttp refuses before any handler runs (a malformed request line, headers
over its limits) is answered by its protocol's `handle_error`; `ApiRunner` swaps in a handler
that writes the same JSON body. Why no middleware: a middleware makes aiohttp add its own
current-app middleware and two more coroutine frames to every request; measured on the 2-core
dev VM with wrk (c=32), the middleware cost ~20 us of agent CPU per request, about 15 % of a
cache hit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from edge_agent.errors import PayloadTooLarge
from edge_agent.functions import FunctionSet
from edge_agent.metrics import Metrics
from edge_agent.router import Router
from runtimes.errors import RuntimeErrorBase

log = logging.getLogger("edgefn.api")

_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
# Client-supplied request ids longer than this are replaced: they end up in logs and headers.
MAX_CLIENT_ID = 128

# Hostile or broken LAN clients must not hold connections (each costs a file descriptor and a
# task). A client gets this long from connecting to send a complete request head: a real
# client sends it in one packet, a slow-loris one byte at a time never finishes.
HEADER_TIMEOUT_S = 10.0
# An idle keep-alive connection (no request in flight) is closed after this long. Short
# beside aiohttp's default (3630 s in the handler): a LAN client that comes back reconnects
# in a millisecond. It also bounds a slow head on a kept-alive connection (aiohttp re-arms
# this timer after every response).
KEEPALIVE_TIMEOUT_S = 15.0
# A client that goes away mid-request is the client's business: one debug line, no traceback.
CLIENT_GONE = (ConnectionResetError, BrokenPipeError)


class RequestIds:
    """Cheap unique ids: a per-boot random prefix and a counter (uuid4 costs more per call)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"

    def from_client(self, value: str | None) -> str:
        if value and len(value) <= MAX_CLIENT_ID and _SAFE_ID.issuperset(value):
            return value
        return f"{self._prefix}-{next(self._counter):x}"  # = new(), without the extra call


def error_response(
    status: int, code: str, message: str, request_id: str = "", **extra: Any
) -> web.Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message, **extra}}
    if request_id:
        body["error"]["request_id"] = request_id
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.json_response(body, status=status, headers=headers)


class Api:
    def __init__(
        self,
        router: Router,
        functions: FunctionSet,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        health: Callable[[], dict[str, Any]],
    ) -> None:
        self._router = router
        self._functions = functions
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._health = health
        self._ids = RequestIds()
        self._openapi: bytes | None = None

    def app(self) -> web.Application:
        # client_max_size is our own limit plus slack; the 413 with a JSON body comes from us.
        app = web.Application(client_max_size=self._max_body + 1)
        app.router.add_post("/v1/functions/{name}/invoke", _guarded(self.invoke))
        app.router.add_get("/v1/functions", _guarded(self.list_functions))
        app.router.add_get("/v1/functions/{name}", _guarded(self.get_function))
        app.router.add_get("/v1/health", _guarded(self.health))
        app.router.add_get("/v1/openapi.json", _guarded(self.openapi))
        app.router.add_get("/metrics", _guarded(self.prometheus))
        app.router.add_delete("/v1/cache/{name}", _guarded(self.purge_cache))
        # Last: aiohttp tries resources in order, so this only sees what nothing else matched.
        app.router.add_route("*", "/{tail:.*}", _no_route)
        return app

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = self._ids.from_client(request.headers.get("X-Request-Id"))
        name = request.match_info["name"]
        length = request.content_length
        if length is not None and length > self._max_body:
            self._metrics.observe(name, 0.0, PayloadTooLarge.code)
            return error_response(
                413,
                PayloadTooLarge.code,
                f"payload of {length} bytes exceeds the {self._max_body}-byte maximum",
                rid,
            )
        try:
            payload = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                PayloadTooLarge.code,
                f"payload exceeds the {self._max_body}-byte maximum",
                rid,
            )
        headers = request.headers
        try:
            routed = await self._router.invoke(
                name,
                payload,
                request_id=rid,
                trace_id=headers.get("X-Trace-Id", ""),
                content_type=headers.get("Content-Type", ""),
                headers=headers,
                # No query string: skip parsing one into a MultiDict (the key treats both alike).
                query=request.query if request.query_string else (),
                no_cache="no-cache" in headers.get("Cache-Control", ""),
            )
        except RuntimeErrorBase as exc:
            log.info("%s failed: %s (%s)", name, exc.message, exc.code, extra={"request_id": rid})
            return error_response(exc.status, exc.code, exc.message, rid, function=name)
        result = routed.result
        # A CIMultiDict built in one call: web.Response would convert a dict into one anyway.
        out = CIMultiDict(
            (
                ("Content-Type", result.content_type),
                ("X-Request-Id", rid),
                ("X-Edgefn-Version", routed.version),
                ("X-Edgefn-Served-By", routed.served_by),
                ("X-Edgefn-Cache", routed.cache),
                ("X-Edgefn-Duration-Ms", f"{(time.perf_counter() - started) * 1000:.3f}"),
            )
        )
        return web.Response(body=result.payload, headers=out)

    async def purge_cache(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        cache = self._router.cache
        if cache is None:
            return error_response(503, "unavailable", "the result cache is not open")
        purged = await cache.purge(name)
        return web.json_response({"function": name, "purged": purged})

    async def list_functions(self, request: web.Request) -> web.Response:
        return web.json_response({"functions": self._functions.describe()})

    async def get_function(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        for item in self._functions.describe():
            if item["name"] == name:
                return web.json_response(item)
        return error_response(404, "unknown_function", f"no function named {name!r} is installed")

    async def health(self, request: web.Request) -> web.Response:
        body = self._health()
        status = 200 if body.get("status") == "ok" else 503
        return web.json_response(body, status=status)

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = resources.files("edge_agent").joinpath("openapi.json").read_bytes()
        return web.Response(body=self._openapi, content_type="application/json")

    async def prometheus(self, request: web.Request) -> web.Response:
        text = self._metrics.render(self._gauges)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    def _gauges(self) -> Iterable[tuple[str, str, dict[str, str], float]]:
        for name, fn in sorted(self._functions.loaded.items()):
            st = fn.executor.status()
            labels = {"function": name, "version": fn.manifest.version}
            yield ("edgefn_pool_instances", "Worker instances running.", labels, st.instances)
            yield ("edgefn_pool_in_flight", "Requests being executed.", labels, st.in_flight)
            yield ("edgefn_pool_queued", "Requests waiting for a slot.", labels, st.queued)
            rss, cpu = st.rss_mb, st.cpu_percent
            yield ("edgefn_workers_rss_mb", "Resident memory of the workers, MB.", labels, rss)
            yield ("edgefn_workers_cpu_percent", "CPU of the workers, % of one core.", labels, cpu)
            healthy = 1.0 if st.health == "healthy" else 0.0
            yield ("edgefn_function_healthy", "1 when the function is healthy.", labels, healthy)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    500: "internal",
}


def _guarded(handler: Handler) -> Handler:
    """Every error leaves as JSON with a stable code, including aiohttp's own HTTP errors.

    A wrapper per route instead of a middleware: see the module docstring for why.
    """

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
        except CLIENT_GONE as exc:
            log.debug("client went away during %s %s: %s", request.method, request.path, exc)
            return error_response(400, "bad_request", "client disconnected")  # never delivered
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal", "internal error (see the agent log)")

    return guarded


async def _no_route(request: web.Request) -> web.StreamResponse:
    """What aiohttp answers for an unknown path (404) or method (405), as JSON."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue  # this catch-all itself
        _match, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        return error_response(405, _HTTP_CODES[405], "Method Not Allowed")
    return error_response(404, _HTTP_CODES[404], "Not Found")


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own refusals as JSON error bodies.

    aiohttp answers requests it cannot parse (400 for a header line over 8190 bytes, too many
    headers, a bad request line) in `handle_error` with plain text, before any route or
    `_guarded` wrapper runs. The documented contract is a JSON body with a stable code.
    """

    __slots__ = ("_header_timer",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = self._loop.call_later(
            HEADER_TIMEOUT_S, self._header_deadline
        )

    def _header_deadline(self) -> None:
        self._header_timer = None
        # `_request_count` counts request heads parsed on this connection (aiohttp's own).
        if self.transport is not None and self._request_count == 0:
            log.debug("closing a connection that sent no request head in %g s", HEADER_TIMEOUT_S)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # The base logs the error and refuses when a response is already under way; its
        # plain-text answer is replaced by ours.
        super().handle_error(request, status, exc, message)
        reason = message if status != 500 and message else "internal error (see the agent log)"
        resp = error_response(status, _HTTP_CODES.get(status, "http_error"), reason)
        resp.force_close()  # as aiohttp does: the connection's state is unknown after this
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer HTTP-level parse errors as JSON, close a
    connection that sends no request head within `HEADER_TIMEOUT_S` and an idle keep-alive one
    after `KEEPALIVE_TIMEOUT_S`."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT_S)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same object, our subclass: only `__call__` (the per-connection handler) differs,
        # and copying the server's construction would track aiohttp's private arguments.
        server.__class__ = _JsonErrorServer
        return server

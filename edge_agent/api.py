"""The local HTTP API (`/v1/...`): raw bytes in, raw bytes out, errors as JSON with a stable code.

Start reading the invocation path here: `invoke()` -> `Router.invoke` -> executor. The
OpenAPI document served at `/v1/openapi.json` is `edge_agent/openapi.json`; keep both in step.

Errors leave as JSON with a stable code without an aiohttp middleware: each handler is wrapped
by `_guarded`, and a last catch-all route (`_no_route`) answers paths and methods that match no
route (404/405). What aiohttp refuses before any handler runs (a malformed request line, headers
over its limits) is answered by its protocol's `handle_error`: `JsonErrorHandler` writes the
same JSON body, and `edge_agent.listener` (the runner the agent serves with) builds on it.
Why no middleware: a middleware makes aiohttp add its own
current-app middleware and two more coroutine frames to every request; measured on the 2-core
dev VM with wrk (c=32), the middleware cost ~20 us of agent CPU per request, about 15 % of a
cache hit.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from cloud_sync.http_server import HTTP_STATUS_CODES, escaped_error_answer
from edge_agent.auth import LOCAL, Authenticator, AuthFailure, Principal
from edge_agent.errors import PayloadTooLarge
from edge_agent.functions import FunctionSet
from edge_agent.metrics import Metrics
from edge_agent.router import Router
from edge_agent.tokens import ADMIN
from runtimes.errors import RuntimeErrorBase

log = logging.getLogger("edgefn.api")

_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
# Client-supplied request ids longer than this are replaced: they end up in logs and headers.
MAX_CLIENT_ID = 128

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


# (status, headers, body): an answer independent of the HTTP layer that writes it.
Answer = tuple[int, list[tuple[str, str]], bytes]
JSON_TYPE = "application/json; charset=utf-8"


def error_answer(
    status: int, code: str, message: str, request_id: str = "", **extra: Any
) -> Answer:
    """The JSON error body every API error has, as an `Answer`."""
    body: dict[str, Any] = {"error": {"code": code, "message": message, **extra}}
    if request_id:
        body["error"]["request_id"] = request_id
    headers = [("Content-Type", JSON_TYPE)]
    if request_id:
        headers.append(("X-Request-Id", request_id))
    return status, headers, json.dumps(body).encode()


def _response(answer: Answer) -> web.Response:
    status, headers, body = answer
    # A CIMultiDict built in one call: web.Response would convert a list into one anyway.
    return web.Response(status=status, body=body, headers=CIMultiDict(headers))


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
        auth: Authenticator | None = None,
    ) -> None:
        self._router = router
        self._functions = functions
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._health = health
        self._ids = RequestIds()
        self._openapi: bytes | None = None
        self._auth = auth  # None: no checking (the loopback default)

    def app(self) -> web.Application:
        # client_max_size is our own limit plus slack; the 413 with a JSON body comes from us.
        app = web.Application(client_max_size=self._max_body + 1)
        # The second argument is what a caller needs when checking is on (see _checked).
        route = self._route
        app.router.add_post("/v1/functions/{name}/invoke", route(self.invoke, "invoke"))
        app.router.add_get("/v1/functions", route(self.list_functions, "token"))
        app.router.add_get("/v1/functions/{name}", route(self.get_function, "token"))
        app.router.add_get("/v1/health", route(self.health, "optional"))
        app.router.add_get("/v1/openapi.json", route(self.openapi, "public"))
        app.router.add_get("/metrics", route(self.prometheus, ADMIN))
        app.router.add_delete("/v1/cache/{name}", route(self.purge_cache, ADMIN))
        # Last: aiohttp tries resources in order, so this only sees what nothing else matched.
        app.router.add_route("*", "/{tail:.*}", _no_route)
        return app

    def _route(self, handler: Handler, need: str) -> Handler:
        """`handler` behind the one auth check (edge_agent.auth); with checking off, bare.

        need: "public" (no check), "optional" (anonymous allowed, admins see more), "token"
        (any valid token), "invoke" (scope invoke:NAME), or a scope such as "admin".
        """
        auth = self._auth
        if auth is None or need == "public":
            return _guarded(handler)  # nothing added to the path when checking is off

        async def checked(request: web.Request) -> web.StreamResponse:
            if need == "invoke":
                scope: str | None = "invoke:" + request.match_info["name"]
            else:
                scope = None if need in ("token", "optional") else need
            try:
                principal = auth.check(
                    request.headers.get("Authorization"),
                    request.remote,
                    scope,
                    optional=need == "optional",
                    transport=request.transport,
                )
                auth.enter(principal)  # per-token concurrency (429)
            except AuthFailure as exc:
                resp = error_response(exc.status, exc.code, exc.message)
                if exc.status == 401:  # RFC 6750: say how to authenticate
                    resp.headers["WWW-Authenticate"] = 'Bearer realm="edgefn"'
                return resp
            request[PRINCIPAL] = principal
            try:
                return await handler(request)
            finally:
                auth.leave(principal)

        return _guarded(checked)

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = self._ids.from_client(request.headers.get("X-Request-Id"))
        name = request.match_info["name"]
        length = request.content_length
        if length is not None and length > self._max_body:
            return _response(self.too_large(name, rid, length))
        try:
            payload = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _response(self.too_large(name, rid, None))
        answer = await self.answer_invoke(
            name,
            payload,
            request.headers,
            # No query string: skip parsing one into a MultiDict (the key treats both alike).
            request.query if request.query_string else (),
            request.get(PRINCIPAL),  # None when checking is off (edge_agent.router)
            rid,
            started,
        )
        return _response(answer)

    # -- the invocation itself, shared with the fast path (edge_agent.fastpath) ---------------

    @property
    def ids(self) -> RequestIds:
        return self._ids

    @property
    def auth(self) -> Authenticator | None:
        return self._auth

    @property
    def max_body(self) -> int:
        return self._max_body

    def too_large(self, name: str, rid: str, length: int | None) -> Answer:
        """The 413 answer (and its metric) for a body over `max_body_bytes`."""
        self._metrics.observe(name, 0.0, PayloadTooLarge.code)
        size = f"of {length} bytes " if length is not None else ""
        return error_answer(
            413,
            PayloadTooLarge.code,
            f"payload {size}exceeds the {self._max_body}-byte maximum",
            rid,
        )

    async def answer_invoke(
        self,
        name: str,
        payload: bytes,
        headers: Mapping[str, str],
        query: Any,
        caller: Principal | None,
        rid: str,
        started: float,
    ) -> Answer:
        """One invocation through the router: (status, headers, body), errors as JSON."""
        try:
            routed = await self._router.invoke(
                name,
                payload,
                request_id=rid,
                trace_id=headers.get("X-Trace-Id", ""),
                content_type=headers.get("Content-Type", ""),
                headers=headers,
                query=query,
                no_cache="no-cache" in headers.get("Cache-Control", ""),
                caller=caller,
            )
        except RuntimeErrorBase as exc:
            log.info("%s failed: %s (%s)", name, exc.message, exc.code, extra={"request_id": rid})
            return error_answer(exc.status, exc.code, exc.message, rid, function=name)
        result = routed.result
        return (
            200,
            [
                ("Content-Type", result.content_type),
                ("X-Request-Id", rid),
                ("X-Edgefn-Version", routed.version),
                ("X-Edgefn-Served-By", routed.served_by),
                ("X-Edgefn-Cache", routed.cache),
                ("X-Edgefn-Duration-Ms", f"{(time.perf_counter() - started) * 1000:.3f}"),
            ],
            result.payload,
        )

    async def purge_cache(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        cache = self._router.cache
        if cache is None:
            return error_response(503, "unavailable", "the result cache is not open")
        purged = await cache.purge(name)
        return web.json_response({"function": name, "purged": purged})

    def _described(self, request: web.Request) -> list[dict[str, Any]]:
        items = self._functions.describe()
        if request.get(PRINCIPAL, LOCAL).is_admin:
            return items
        # Without admin: what a caller needs to invoke, not pids, errors or pool state.
        return [{k: i[k] for k in _PUBLIC_FUNCTION_FIELDS if k in i} for i in items]

    async def list_functions(self, request: web.Request) -> web.Response:
        return web.json_response({"functions": self._described(request)})

    async def get_function(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        for item in self._described(request):
            if item["name"] == name:
                return web.json_response(item)
        return error_response(404, "unknown_function", f"no function named {name!r} is installed")

    async def health(self, request: web.Request) -> web.Response:
        body = self._health()
        status = 200 if body.get("status") == "ok" else 503
        if not request.get(PRINCIPAL, LOCAL).is_admin:
            body = {"status": body.get("status")}  # liveness only: details need admin
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
PRINCIPAL = web.RequestKey("edgefn.principal", Principal)
_PUBLIC_FUNCTION_FIELDS = ("name", "version", "runtime")


def _guarded(handler: Handler) -> Handler:
    """Every error leaves as JSON with a stable code, including aiohttp's own HTTP errors.

    A wrapper per route instead of a middleware: see the module docstring for why.
    """

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except CLIENT_GONE as exc:
            log.debug("client went away during %s %s: %s", request.method, request.path, exc)
            return error_response(400, "bad_request", "client disconnected")  # never delivered
        except Exception as exc:
            # No handler expected it; an edgefn error keeps its stable code (and status).
            where = f"{request.method} {request.path}"
            answer = escaped_error_answer(exc, server="agent", log=log, where=where)
            if answer is None:
                raise
            return error_response(*answer)

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
        return error_response(405, HTTP_STATUS_CODES[405], "Method Not Allowed")
    return error_response(404, HTTP_STATUS_CODES[404], "Not Found")


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own refusals as JSON error bodies.

    aiohttp answers requests it cannot parse (400 for a header line over 8190 bytes, too many
    headers, a bad request line) in `handle_error` with plain text, before any route or
    `_guarded` wrapper runs. The documented contract is a JSON body with a stable code.
    """

    __slots__ = ()

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
        resp = error_response(status, HTTP_STATUS_CODES.get(status, "http_error"), reason)
        resp.force_close()  # as aiohttp does: the connection's state is unknown after this
        return resp

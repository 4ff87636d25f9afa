"""A Dapr-compatible HTTP endpoint, so function code written against Dapr's HTTP API runs as is.

A function opts in with a `[dapr]` table in its manifest (`enabled = true`). When it starts, the
agent gives its workers `DAPR_HTTP_PORT`, `DAPR_HTTP_ENDPOINT` and `DAPR_API_TOKEN` (the variables
Dapr's SDKs read): one listener per agent on 127.0.0.1, one random token per start of a
function, revoked when that start stops. The token says which function is calling, so every
request goes through the same capability broker and `[permissions]` as the SDKs' building
blocks (`edge_agent.capabilities`), and is refused `401` without it. The subset
(docs/building-blocks.md, "Dapr"):

    GET    /v1.0/healthz, /v1.0/healthz/outbound           204 (no token, as in Dapr)
    GET    /v1.0/metadata                                   {"id": the function's name}
    *      /v1.0/invoke/{app}/method/{method}               invoke function {app}: the body in,
                                                            its result out (the method name is
                                                            not delivered: one entry point)
    POST   /v1.0/publish/{pubsub}/{topic}                   publish (204)
    POST   /v1.0/state/{store}        [{"key","value"}...]  state.set each (204); values kept as
                                                            their JSON text, as Dapr does
    GET    /v1.0/state/{store}/{key}                        the value (200) or 204 when unset
    POST   /v1.0/state/{store}/bulk   {"keys":[...]}        [{"key","data"}] (unset: no data)
    DELETE /v1.0/state/{store}/{key}                        204
    GET    /v1.0/secrets/{store}/{name}                     {name: value}

Any store or pub/sub component name is accepted: a function has one state store and one way to
publish. Errors are Dapr-shaped (`{"errorCode", "message"}`), with the building block's status.
A Dapr request carries no parent invocation, so it runs with the function's own `timeout_ms`
as its deadline and as the head of a new invocation chain.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
from typing import Any

from aiohttp import web

from cloud_sync.http_server import bound_port
from runtimes.capabilities import (
    CapabilityCall,
    CapabilityError,
    CapabilityHandler,
    CapabilityNotFound,
    Op,
)
from runtimes.errors import ManifestError, RuntimeErrorBase
from runtimes.manifest import Manifest

log = logging.getLogger("edgefn.dapr")

TOKEN_HEADER = "dapr-api-token"
MAX_BODY_BYTES = 1 << 20  # a building-block argument, not a file transfer
# The building-block errors as Dapr's error codes.
_DAPR_CODES = {
    "not_permitted": "ERR_PERMISSION_DENIED",
    "not_found": "ERR_NOT_FOUND",
    "timeout": "ERR_TIMEOUT",
    "quota_exceeded": "ERR_STATE_QUOTA",
    "unavailable": "ERR_UNAVAILABLE",
}


def dapr_enabled(manifest: Manifest) -> bool:
    """Whether the manifest's `[dapr]` table turns the endpoint on; refuses a malformed table."""
    table = manifest.extra.get("dapr")
    if table is None:
        return False
    where = f"{manifest.name}@{manifest.version} [dapr]"
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: must be a table")
    unknown = set(table) - {"enabled"}
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)} (known: enabled)")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ManifestError(f"{where}: enabled must be true or false")
    return enabled


def _dapr_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errorCode": code, "message": message}, status=status)


class DaprEndpoint:
    """The listener and its tokens; `grant` starts it on first use, `close` stops it."""

    def __init__(self, capabilities: CapabilityHandler, *, host: str = "127.0.0.1") -> None:
        self._capabilities = capabilities
        self._host = host
        self._tokens: dict[str, Manifest] = {}
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self.port = 0

    async def grant(self, manifest: Manifest) -> tuple[str, dict[str, str]]:
        """A fresh token for one start of a function, and the environment its workers get."""
        if self._runner is None:
            await self._start()
        token = secrets.token_hex(32)
        self._tokens[token] = manifest
        env = {
            "DAPR_HTTP_PORT": str(self.port),
            "DAPR_HTTP_ENDPOINT": f"http://{self._host}:{self.port}",
            "DAPR_API_TOKEN": token,
        }
        return token, env

    def revoke(self, token: str) -> None:
        """That start of the function stopped: its token stops working."""
        self._tokens.pop(token, None)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._tokens.clear()

    async def _start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/v1.0/healthz", self._healthz)
        app.router.add_get("/v1.0/healthz/outbound", self._healthz)
        app.router.add_get("/v1.0/metadata", self._metadata)
        app.router.add_route("*", "/v1.0/invoke/{app}/method/{method:.*}", self._invoke)
        app.router.add_post("/v1.0/publish/{pubsub}/{topic:.+}", self._publish)
        app.router.add_post("/v1.0/state/{store}", self._state_save)
        app.router.add_post("/v1.0/state/{store}/bulk", self._state_bulk)
        app.router.add_get("/v1.0/state/{store}/{key:.+}", self._state_get)
        app.router.add_delete("/v1.0/state/{store}/{key:.+}", self._state_delete)
        app.router.add_get("/v1.0/secrets/{store}/{name}", self._secret)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, 0)
        await site.start()
        self.port = bound_port(runner)
        self._runner = runner
        log.info("Dapr-compatible endpoint on %s:%d", self._host, self.port)

    # -- plumbing ---------------------------------------------------------------------------

    def _caller(self, request: web.Request) -> Manifest | None:
        token = request.headers.get(TOKEN_HEADER, "")
        return self._tokens.get(token) if token else None

    async def _call(
        self, request: web.Request, m: Manifest, op: Op, target: str, payload: bytes = b""
    ) -> bytes:
        rid = request.headers.get("X-Request-Id") or f"dapr-{self._prefix}-{next(self._ids):x}"
        call = CapabilityCall(
            op=op,
            target=target,
            payload=payload,
            request_id=rid,
            deadline_s=m.timeout_ms / 1000,
            chain=(m.name,),
            trace_id=request.headers.get("traceparent", ""),
            content_type=request.headers.get("Content-Type", "") if op == "invoke" else "",
        )
        return await self._capabilities.call(m, call)

    @staticmethod
    def _failed(exc: RuntimeErrorBase) -> web.Response:
        if isinstance(exc, CapabilityError):
            code = _DAPR_CODES.get(exc.sdk_code, "ERR_UNAVAILABLE")
            return _dapr_error(exc.status, code, exc.message)
        # A nested invoke's own failure: Dapr reports the callee's status as a 500.
        return _dapr_error(500, "ERR_DIRECT_INVOKE", f"{exc.code}: {exc.message}")

    async def _guard(self, request: web.Request, work: Any) -> web.StreamResponse:
        m = self._caller(request)
        if m is None:
            return _dapr_error(401, "ERR_UNAUTHORIZED", f"missing or unknown {TOKEN_HEADER}")
        try:
            out: web.StreamResponse = await work(m)
            return out
        except RuntimeErrorBase as exc:
            return self._failed(exc)

    # -- routes -----------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            return web.json_response({"id": m.name, "runtimeVersion": "edgefn", "extended": {}})

        return await self._guard(request, work)

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            body = await request.read()
            out = await self._call(request, m, "invoke", request.match_info["app"], body)
            return web.Response(body=out, content_type="application/octet-stream")

        return await self._guard(request, work)

    async def _publish(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            body = await request.read()
            await self._call(request, m, "publish", request.match_info["topic"], body)
            return web.Response(status=204)

        return await self._guard(request, work)

    async def _state_save(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            items = _json_body(await request.read())
            if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("key"), str) and "value" in i
                for i in items
            ):
                return _dapr_error(400, "ERR_MALFORMED_REQUEST", 'expected [{"key","value"}...]')
            for item in items:
                value = json.dumps(item["value"], separators=(",", ":")).encode()
                await self._call(request, m, "state.set", item["key"], value)
            return web.Response(status=204)

        return await self._guard(request, work)

    async def _state_get(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            try:
                value = await self._call(request, m, "state.get", request.match_info["key"])
            except CapabilityNotFound:
                return web.Response(status=204)  # Dapr: an unset key is no content
            return web.Response(body=value, content_type="application/json")

        return await self._guard(request, work)

    async def _state_bulk(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            doc = _json_body(await request.read())
            keys = doc.get("keys") if isinstance(doc, dict) else None
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                return _dapr_error(400, "ERR_MALFORMED_REQUEST", 'expected {"keys": [...]}')
            out: list[dict[str, Any]] = []
            for key in keys:
                try:
                    raw = await self._call(request, m, "state.get", key)
                except CapabilityNotFound:
                    out.append({"key": key})
                    continue
                out.append({"key": key, "data": _json_or_text(raw)})
            return web.json_response(out)

        return await self._guard(request, work)

    async def _state_delete(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            await self._call(request, m, "state.delete", request.match_info["key"])
            return web.Response(status=204)

        return await self._guard(request, work)

    async def _secret(self, request: web.Request) -> web.StreamResponse:
        async def work(m: Manifest) -> web.Response:
            name = request.match_info["name"]
            value = await self._call(request, m, "secret", name)
            return web.json_response({name: value.decode("utf-8", "replace")})

        return await self._guard(request, work)


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")

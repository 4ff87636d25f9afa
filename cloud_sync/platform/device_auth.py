"""Who is calling: the operator, an enrolled device (token or client certificate), or nobody.

`DeviceAuth(request) -> "operator" | device id | None` is synchronous, because the route sets
call it inline; the database lookup it needs happens before, in `middleware` (an aiohttp
middleware the server installs), which looks the presented credential up in a worker thread and
caches the answer here. So:

* a token issued through one replica works on every replica at once: a credential this process
  has not seen is a cache miss, and a miss always asks the database (`FleetStore.device_for_token`,
  a unique index on the token's sha256);
* a revocation through another replica takes effect here within `CACHE_TTL_S` (answers expire);
  through this replica at once (`refresh()` after enrol/revoke empties the cache);
* unknown credentials are remembered only `NEGATIVE_TTL_S`, and the cache is bounded, so a client
  spraying random tokens costs one indexed lookup per token and no unbounded memory.

Called without the middleware (a unit test, another app), a miss is looked up inline: correct,
but blocking; the platform's event loop never takes that path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_request import BaseRequest

from cloud_sync.platform.auth import AuthResult, check_bearer
from cloud_sync.platform.fleet_store import FleetStore, token_hash

OPERATOR = "operator"
CACHE_TTL_S = 5.0
NEGATIVE_TTL_S = 1.0
MAX_CACHE = 10_000

_Key = tuple[str, str, int | None]  # ("token", sha256, None) | ("cert", cn, serial)


class DeviceAuth:
    """`authorize(request)`: "operator", a device id, or None. Synchronous; see the module doc."""

    def __init__(self, operator_token: str, store: FleetStore) -> None:
        self._operator = operator_token
        self._store = store
        self._cache: dict[_Key, tuple[str | None, float]] = {}

    def refresh(self) -> None:
        """Forget every cached answer (after an enrol or revoke through this replica)."""
        self._cache.clear()

    def result(self, request: BaseRequest) -> tuple[AuthResult, str]:
        """`authorize` for route sets that take (AuthResult, identity): 401 vs 403 semantics."""
        who = self(request)
        if who is not None:
            return AuthResult.OK, who
        if request.headers.get("Authorization"):
            return AuthResult.WRONG, ""
        return AuthResult.MISSING, ""

    def __call__(self, request: BaseRequest) -> str | None:
        header = request.headers.get("Authorization")
        if check_bearer(header, self._operator) is AuthResult.OK:
            return OPERATOR
        for key in self._keys(request):
            who = self._cached(key)
            if who is _MISS:
                who = self._lookup(key)
                self._remember(key, who)
            if who is not None:
                return str(who)
        return None

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Look up, off the event loop, what `__call__` will need for this request."""
        if check_bearer(request.headers.get("Authorization"), self._operator) is not AuthResult.OK:
            for key in self._keys(request):
                if self._cached(key) is _MISS:
                    self._remember(key, await asyncio.to_thread(self._lookup, key))
        return await handler(request)

    # -- the cache ------------------------------------------------------------------------------

    def _keys(self, request: BaseRequest) -> list[_Key]:
        keys: list[_Key] = []
        header = request.headers.get("Authorization")
        if header:
            scheme, _, presented = header.strip().partition(" ")
            if scheme.lower() == "bearer" and presented.strip():
                keys.append(("token", token_hash(presented.strip()), None))
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        if cert:  # only present when TLS verified it against the platform CA
            cn = next(
                (v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None
            )
            serial = cert.get("serialNumber")
            if cn is not None:
                keys.append(("cert", str(cn), int(serial, 16) if serial is not None else None))
        return keys

    def _cached(self, key: _Key) -> object:
        entry = self._cache.get(key)
        if entry is None or entry[1] <= time.monotonic():
            return _MISS
        return entry[0]

    def _remember(self, key: _Key, who: str | None) -> None:
        now = time.monotonic()
        if len(self._cache) >= MAX_CACHE:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= MAX_CACHE:
                self._cache.clear()
        self._cache[key] = (who, now + (CACHE_TTL_S if who is not None else NEGATIVE_TTL_S))

    def _lookup(self, key: _Key) -> str | None:
        kind, value, serial = key
        if kind == "token":
            return self._store.device_for_token(value)
        return value if self._store.certificate_ok(value, serial) else None


_MISS = object()

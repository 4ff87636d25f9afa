"""Who may call the local API: the one authentication and authorization check.

`Authenticator.check` is the only place a request's credentials are judged. `edge_agent.api`
calls it from one spot (its route wrapper) and any other entry into the API (a raw fast invoke
path) must call the same method, so there is one rule and one error vocabulary:

- no `Authorization: Bearer ...`, an unknown, revoked or expired token -> 401 `unauthorized`
- a valid token without the scope the route needs                        -> 403 `forbidden`
- a token with `token_concurrency` requests already in flight            -> 429 `too_many_requests`

Failures are logged with the peer address and, when known, the token id: never the token.

The token file (`edge_agent.tokens`) is re-read when it changes; a poll every
`RELOAD_INTERVAL_S` keeps a revocation effective within the promised 2 s without inotify
(which is Linux-only and does not see atomic replacement into a watched name reliably).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import AgentError
from edge_agent.tokens import ADMIN, TokenError, TokenRecord, TokenStore, hash_token
from runtimes import tasks

log = logging.getLogger("edgefn.auth")

# Revocations must take effect within 2 s (issue 14); half a second leaves room for a slow disk.
RELOAD_INTERVAL_S = 0.5
_UNLOADED = object()  # the file's stamp before the first read


class AuthFailure(AgentError):
    """The request may not proceed; a subclass says why (401, 403 or 429). Never raised itself."""

    code = "auth_failure"
    category = "auth"
    status = 401


class Unauthorized(AuthFailure):
    code = "unauthorized"
    status = 401


class Forbidden(AuthFailure):
    code = "forbidden"
    status = 403


class TooManyRequests(AuthFailure):
    """The token already has its limit of requests in flight (`token_concurrency`)."""

    code = "too_many_requests"
    status = 429


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller as the API sees it."""

    token_id: str | None
    record: TokenRecord | None  # None: checking is off (loopback default) or anonymous

    def allows(self, scope: str) -> bool:
        if self is LOCAL:
            return True  # auth = none: whoever reaches 127.0.0.1 is trusted, as before
        return self.record is not None and self.record.allows(scope)

    @property
    def is_admin(self) -> bool:
        return self.allows(ADMIN)


# Auth off: everything allowed. Anonymous: a caller without a (valid) token on a public route.
LOCAL = Principal(token_id=None, record=None)
ANONYMOUS = Principal(token_id="", record=None)


class Authenticator:
    """Bearer-token checking against the token file, kept current by a reload task."""

    def __init__(
        self,
        tokens_file: Path,
        *,
        reload_interval_s: float = RELOAD_INTERVAL_S,
        token_concurrency: int = 0,
        mode: str = "token",
    ) -> None:
        self._store = TokenStore(tokens_file)
        # "token": bearer tokens; "mtls": client certificates (verified by TLS against the
        # client CA) whose subject CN has a grant in the same file.
        self.mtls = mode == "mtls"
        self._by_cn: dict[str, TokenRecord] = {}
        # Requests in flight per token id; 0 = no limit. One LAN client (or a leaked token)
        # must not take every worker from the others.
        self._limit = token_concurrency
        self._in_flight: dict[str, int] = {}
        self._by_hash: dict[str, TokenRecord] = {}
        self._stamp: object = _UNLOADED
        self._interval = reload_interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._reload)
        if not (self._by_cn if self.mtls else self._by_hash):
            log.warning(
                "token checking is on and no token exists yet: every call is refused until "
                "one is made with `edge-agent token create --data-dir ... --scope invoke:NAME`"
            )
        self._task = asyncio.create_task(self._watch(), name="token reload")

    async def close(self) -> None:
        await tasks.stop(self._task)

    def check(
        self,
        authorization: str | None,
        peer: str | None,
        scope: str | None,
        *,
        optional: bool = False,
        transport: Any = None,
    ) -> Principal:
        """The caller for `Authorization` header value `authorization`, allowed `scope`.

        `scope` None: any valid token will do. `optional`: a missing or bad token makes the
        caller ANONYMOUS instead of failing (public routes that show more to admins).
        `transport`: the connection, whose client certificate identifies the caller in mtls
        mode. Raises Unauthorized or Forbidden.
        """
        record = self._lookup_cert(transport) if self.mtls else self._lookup(authorization)
        if isinstance(record, str):
            if optional:
                return ANONYMOUS
            log.warning("refused a request from %s: %s", peer or "?", record)
            raise Unauthorized(record)
        if scope is not None and not record.allows(scope):
            if optional:
                return ANONYMOUS
            log.warning(
                "refused a request from %s: token %s lacks scope %s", peer or "?", record.id, scope
            )
            raise Forbidden(f"this token does not have the {scope!r} scope")
        return Principal(token_id=record.id, record=record)

    def enter(self, principal: Principal) -> None:
        """Count a request of `principal` in flight; TooManyRequests over the token's limit.

        Every enter() that returns is paired with one leave(), in a finally.
        """
        token_id = principal.token_id
        if not token_id or self._limit <= 0:
            return
        count = self._in_flight.get(token_id, 0)
        if count >= self._limit:
            log.warning("refused a request: token %s has %d requests in flight", token_id, count)
            raise TooManyRequests(
                f"this token already has {count} requests in flight (the limit); retry later"
            )
        self._in_flight[token_id] = count + 1

    def leave(self, principal: Principal) -> None:
        token_id = principal.token_id
        if not token_id or self._limit <= 0:
            return
        count = self._in_flight.get(token_id, 0) - 1
        if count > 0:
            self._in_flight[token_id] = count
        else:
            self._in_flight.pop(token_id, None)

    def _lookup_cert(self, transport: Any) -> TokenRecord | str:
        """The grant for the client certificate's subject CN, or why there is none."""
        cert = transport.get_extra_info("peercert") if transport is not None else None
        cn = _common_name(cert)
        if cn is None:
            return "no client certificate (auth = mtls)"
        record = self._by_cn.get(cn)
        if record is None:
            return f"no grant for client certificate CN={cn!r}"
        if record.expired(time.time()):
            return f"the grant {record.id} for CN={cn!r} has expired"
        return record

    def _lookup(self, authorization: str | None) -> TokenRecord | str:
        """The token's record, or why there is none (a message safe to log and to send)."""
        if not authorization:
            return "no token: send Authorization: Bearer TOKEN"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed Authorization header: send Authorization: Bearer TOKEN"
        # A dict lookup by hash: timing reveals nothing about the token, only about its hash.
        record = self._by_hash.get(hash_token(token.strip()))
        if record is None:
            return "unknown or revoked token"
        if record.expired(time.time()):
            return f"token {record.id} has expired"
        return record

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.to_thread(self._reload)
            except Exception:
                log.exception("token file reload failed; keeping the previous tokens")

    def _reload(self) -> None:
        """Re-read the file when its identity or mtime changed (blocking: runs in a thread)."""
        try:
            st = os.stat(self._store.path)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        first = self._stamp is _UNLOADED
        self._stamp = stamp
        try:
            records = self._store.read()
        except TokenError as exc:
            # Not the previous records: a damaged file must not keep revoked tokens alive, so
            # nothing is accepted until the file is readable again.
            log.error("%s: refusing every token until it is fixed", exc.message)
            self._by_hash = {}
            self._by_cn = {}
            return
        self._by_hash = {r.sha256: r for r in records if r.client_cn is None}
        self._by_cn = {r.client_cn: r for r in records if r.client_cn is not None}
        if not first:
            log.info(
                "tokens reloaded: %d tokens, %d certificate grants",
                len(self._by_hash),
                len(self._by_cn),
            )


def _common_name(cert: Any) -> str | None:
    """The subject CN of a certificate as `ssl` returns it from getpeercert()."""
    if not isinstance(cert, dict):
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None

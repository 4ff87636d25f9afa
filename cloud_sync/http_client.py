"""One HTTP client for talking to edgefn's own servers: the agent's local API and the platform.

Every client in the code base (the two CLIs, the registry client, the sync client's HTTP
transport, the cloud invoker) goes through here, so each of these is decided once:

* TLS: an `Endpoint` carries either a CA file (operators: the platform's `pki/ca.crt`) or a
  ready `ssl.SSLContext` (devices: the mTLS context from their credentials); with neither,
  `https` URLs are checked against the system's CAs.
* the bearer token (`Authorization: Bearer ...`) when there is one;
* timeouts: sync calls apply `timeout_s` to the connect and to each socket read, so a slow but
  moving download keeps going; async calls give the connection `connect_timeout_s` and the
  whole request `timeout_s`;
* errors: transport trouble becomes `Unreachable` (`RequestTimeout` when it was the clock), an
  answer of 4xx/5xx becomes `RemoteError` carrying the HTTP status and, when the server is ours,
  the stable code and message of its JSON error body (`cloud_sync.errors.error_of`), and an
  answer that should be JSON and is not becomes `BadAnswer`.

`request()` hands back every answer, whatever its status, for callers that interpret statuses
themselves (the cloud invoker's breaker, the registry's 404 and 416); `call()` is the common
case: raise for a refusal, return the decoded JSON.

Two faces: `SyncHttpClient` (urllib, for the CLIs and the blocking registry download) and
`AsyncHttpClient` (aiohttp, for the agent; one pooled session, created on first use, closed with
`close()`).

Failover between platform replicas: an `Endpoint` may name `fallback_urls`; both clients then
try the next URL when one fails and stay with the one that answered (`cloud_sync.http_failover`).
"""

from __future__ import annotations

import http.client
import json as jsonlib
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from cloud_sync.errors import Category, CloudSyncError, describe_http_error, error_of
from cloud_sync.http_failover import Sticky, fails_over

# A CLI call or a metadata request answers in well under a second on any working link; 30 s
# leaves room for a busy platform without letting a wedged one hang a command.
DEFAULT_TIMEOUT_S = 30.0
# Connecting is fast on any working link; a long connect means the host is unreachable.
CONNECT_TIMEOUT_S = 10.0
# What `request()` keeps of a body by default: error bodies and JSON documents are small.
MAX_BODY_BYTES = 16 << 20

Body = bytes | IO[bytes] | None


class HttpClientError(CloudSyncError):
    """The root of what talking HTTP to an edgefn server can raise."""

    code = "http_error"
    category: Category = "transport"


class Unreachable(HttpClientError):
    """No answer: connection refused, DNS, TLS handshake, reset, or timeout."""

    code = "http_unreachable"


class RequestTimeout(Unreachable):
    """The server did not answer within the timeout."""

    code = "http_timeout"


class BadAnswer(HttpClientError):
    """The server answered, but not what the API promises (not JSON, oversized)."""

    code = "http_bad_answer"


class RemoteError(HttpClientError):
    """The server refused: HTTP 4xx/5xx. `code` is the server's stable code when it is ours.

    `message` is one line naming the server's message, its code and the HTTP status
    (`cloud_sync.errors.describe_http_error`), which is what CLIs print.
    """

    code = "http_refused"

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        err = error_of(body)
        super().__init__(describe_http_error(status, body), code=err[0] if err else None)
        self.status = status
        self.body = body
        self.headers: Mapping[str, str] = headers or {}
        self.remote = err  # (code, message) of the server's error body, or None
        if status in (401, 403):
            self.category = "auth"
        elif status < 500:
            self.category = "request"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete answer: status, headers (case-insensitive lookups via `header`), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def header(self, name: str, default: str = "") -> str:
        lower = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lower:
                return value
        return default

    def error(self) -> tuple[str, str] | None:
        """(code, message) of an edgefn JSON error body, None when the body is not one."""
        return error_of(self.body)

    def raise_for_status(self) -> HttpResponse:
        if self.status >= 300:
            raise RemoteError(self.status, self.body, self.headers)
        return self

    def json(self) -> Any:
        try:
            return jsonlib.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise BadAnswer(
                f"answered garbage (HTTP {self.status}, not JSON: {self.body[:60]!r})"
            ) from None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to reach one server. `name` says who it is in messages ("the agent")."""

    base_url: str
    token: str = ""
    cafile: Path | None = None
    ssl_context: ssl.SSLContext | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    name: str = "the server"
    # Other URLs of the same service (platform replicas), tried in order when this one fails.
    fallback_urls: tuple[str, ...] = ()
    # The context built from `cafile`, once (loading a CA file reads the disk).
    _tls: list[ssl.SSLContext] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        urls = tuple(u.rstrip("/") for u in self.fallback_urls)
        object.__setattr__(self, "fallback_urls", tuple(u for u in urls if u != self.base_url))

    def alternatives(self) -> list[Endpoint]:
        """This endpoint, then one per fallback URL (same token, TLS and timeouts)."""
        if not self.fallback_urls:
            return [self]
        out = [self]
        for url in self.fallback_urls:
            other = replace(self, base_url=url, fallback_urls=())
            other._tls.extend(self._tls)
            out.append(other)
        return out

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if extra:
            out.update(extra)
        return out

    def tls(self) -> ssl.SSLContext | None:
        """The TLS context for https (None: plain http, or the system's default CAs)."""
        if self.ssl_context is not None:
            return self.ssl_context
        if self.cafile is None or not self.base_url.startswith("https:"):
            return None
        if not self._tls:
            try:
                self._tls.append(ssl.create_default_context(cafile=str(self.cafile)))
            except (OSError, ssl.SSLError) as exc:
                raise Unreachable(
                    f"cannot use the CA file {self.cafile} for {self.name}: {exc}",
                    code="http_bad_ca",
                ) from exc
        return self._tls[0]

    def unreachable(self, url: str, reason: object) -> Unreachable:
        return Unreachable(f"cannot reach {self.name} at {url}: {reason}")


def _encode(json: Any, data: Body, headers: dict[str, str]) -> Body:
    if json is None:
        return data
    headers.setdefault("Content-Type", "application/json")
    return jsonlib.dumps(json).encode()


# ---- blocking ------------------------------------------------------------------------------------


class SyncHttpClient:
    """Blocking calls with urllib. Each call opens its own connection (CLIs make a handful)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._sticky = Sticky(endpoint.alternatives())

    @property
    def current(self) -> Endpoint:
        """The endpoint requests start at (the one that answered last)."""
        return self._sticky.endpoints[self._sticky.current]

    @contextmanager
    def open(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Body = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """The answer as a stream, for downloads. A 4xx/5xx raises RemoteError (body read).

        With fallback URLs, failing over happens before the body streams (a stream cut midway
        is the caller's to resume, e.g. with a range request)."""
        order = self._sticky.order()
        answer: RemoteError | None = None  # an answer beats "no answer" when all fail
        last: Unreachable | None = None
        for n, (index, ep) in enumerate(order):
            if data is not None and not isinstance(data, bytes) and n > 0:
                break  # a streamed body was consumed by the first attempt
            try:
                resp = self._open_one(ep, method, path, json, data, headers, timeout_s)
            except Unreachable as exc:
                last = exc
                continue
            except RemoteError as exc:
                if fails_over(method, exc.status):
                    answer = exc
                    continue
                raise
            self._sticky.current = index
            with resp:
                yield resp
            return
        if answer is not None:
            raise answer
        assert last is not None
        raise last

    def _open_one(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        json: Any,
        data: Body,
        headers: Mapping[str, str] | None,
        timeout_s: float | None,
    ) -> http.client.HTTPResponse:
        hdrs = ep.headers(headers)
        payload = _encode(json, data, hdrs)
        url = ep.url(path)
        req = urllib.request.Request(url, data=payload, headers=hdrs, method=method)
        timeout = timeout_s if timeout_s is not None else ep.timeout_s
        try:
            resp: http.client.HTTPResponse = urllib.request.urlopen(
                req, timeout=timeout, context=ep.tls()
            )
        except urllib.error.HTTPError as exc:
            with exc:
                body = _read_error_body(exc)
            raise RemoteError(exc.code, body, dict(exc.headers.items())) from None
        except TimeoutError as exc:
            raise RequestTimeout(f"{ep.name} at {url} did not answer within {timeout:g} s") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise RequestTimeout(
                    f"{ep.name} at {url} did not answer within {timeout:g} s"
                ) from exc
            raise ep.unreachable(url, reason) from exc
        return resp

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Body = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> HttpResponse:
        """The whole answer, whatever its status (4xx/5xx come back, not raised)."""
        url = self.endpoint.url(path)
        try:
            with self.open(
                method, path, json=json, data=data, headers=headers, timeout_s=timeout_s
            ) as resp:
                body = resp.read(max_bytes + 1)
                status, hdrs = resp.status, dict(resp.headers.items())
        except RemoteError as exc:
            return HttpResponse(exc.status, exc.headers, exc.body)
        except (OSError, http.client.HTTPException) as exc:  # cut while reading the body
            raise self.endpoint.unreachable(url, exc) from exc
        if len(body) > max_bytes:
            raise BadAnswer(f"{self.endpoint.name} at {url} sent more than {max_bytes} bytes")
        return HttpResponse(status, hdrs, body)

    def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: Body = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON) of a 2xx answer; RemoteError for a refusal."""
        resp = self.request(
            method, path, json=json, data=data, headers=headers, timeout_s=timeout_s
        ).raise_for_status()
        try:
            return resp.status, resp.json()
        except BadAnswer as exc:
            raise BadAnswer(f"{self.endpoint.name} at {self.endpoint.url(path)} {exc}") from None


def _read_error_body(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read(64 * 1024)
    except (OSError, http.client.HTTPException):
        return b""


# ---- asyncio -------------------------------------------------------------------------------------


class AsyncHttpClient:
    """aiohttp calls for the agent: one pooled session per client, opened on first use."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._session: Any = None  # aiohttp.ClientSession, imported lazily (CLI start-up)
        self._sticky = Sticky(endpoint.alternatives())

    @property
    def current(self) -> Endpoint:
        """The endpoint requests start at (the one that answered last)."""
        return self._sticky.endpoints[self._sticky.current]

    def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            tls = self.endpoint.tls()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls if tls is not None else True),
                headers=self.endpoint.headers(),
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> HttpResponse:
        """The whole answer, whatever its status; Unreachable/RequestTimeout when there is none.

        With fallback URLs: the next URL on no answer or a failover status (`fails_over`)."""
        order = self._sticky.order()
        if len(order) == 1:
            return await self._request_one(self.endpoint, method, path, json, data, headers,
                                           timeout_s)  # fmt: skip
        answer: HttpResponse | None = None
        last: Unreachable | None = None
        for index, ep in order:
            try:
                resp = await self._request_one(ep, method, path, json, data, headers, timeout_s)
            except Unreachable as exc:
                last = exc
                continue
            if fails_over(method, resp.status):
                answer = resp
                continue
            self._sticky.current = index
            return resp
        if answer is not None:
            return answer
        assert last is not None
        raise last

    async def _request_one(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        json: Any,
        data: bytes | None,
        headers: Mapping[str, str] | None,
        timeout_s: float | None,
    ) -> HttpResponse:
        import aiohttp

        total = timeout_s if timeout_s is not None else ep.timeout_s
        timeout = aiohttp.ClientTimeout(total=total, connect=min(ep.connect_timeout_s, total))
        url = ep.url(path)
        hdrs = dict(headers or {})
        payload = _encode(json, data, hdrs)
        try:
            async with self._client().request(
                method, url, data=payload, headers=hdrs, timeout=timeout
            ) as resp:
                body = await resp.read()
                return HttpResponse(resp.status, dict(resp.headers.items()), body)
        except TimeoutError as exc:
            raise RequestTimeout(f"{ep.name} at {url} did not answer within {total:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ep.unreachable(url, exc) from exc

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """The decoded JSON of a 2xx answer; RemoteError for a refusal."""
        resp = await self.request(method, path, json=json, headers=headers, timeout_s=timeout_s)
        resp.raise_for_status()
        try:
            return resp.json()
        except BadAnswer as exc:
            raise BadAnswer(f"{self.endpoint.name} at {self.endpoint.url(path)} {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            # Let the connector close its transports (aiohttp's documented graceful close).
            import asyncio

            await asyncio.sleep(0)

"""The fast path for `POST /v1/functions/{name}/invoke`: a raw asyncio.Protocol in front of aiohttp.

Why: per request, aiohttp's Request/Response objects, router and writer cost more CPU than
everything the agent itself does for an invocation (issue 12's figures: a warm invoke cost twice
a do-nothing aiohttp handler). This protocol serves the one hot route itself and hands every
other connection to aiohttp untouched, so the rest of the API keeps aiohttp's behaviour.

Flow per connection (`FastProtocol`, made by `edge_agent.listener.LimitedServer`):
  1. Bytes are buffered. At each request boundary the first bytes decide: anything but
     `POST /v1/functions/` goes to aiohttp for the rest of the connection, with every byte
     received so far (`_switch`: the transport gets a `LimitedHandler`, which parses from the
     start of that request; answers already written stay in order).
  2. The head must arrive within the header deadline (slow clients are cut off, as in
     aiohttp's path) and parse strictly (`edge_agent.http1`); the path must be exactly the
     invoke route, else the connection switches to aiohttp too (its 404/405, as JSON).
  3. The body: Content-Length or chunked, bounded by the API's `max_body_bytes` (413 and
     close), with `100 Continue` when the client asked for it.
  4. The same token check as every other route (`Authenticator.check/enter/leave`, as
     `Api._route` does), then `Api.answer_invoke` (the router; identical answers and headers),
     written as one buffer: a precomputed status line, the headers, `Content-Length`.
  5. Keep-alive: the next request is parsed from what is buffered (pipelining keeps its order:
     one request is served at a time; reading pauses when the buffer grows past a bound).
Errors are the API's JSON errors with their stable codes; a malformed request is answered and
the connection closed, never a crash or a hang.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

from multidict import CIMultiDict, MultiDict

from cloud_sync.http_server import escaped_error_answer
from edge_agent.api import Answer, Api, error_answer
from edge_agent.auth import AuthFailure, Principal
from edge_agent.http1 import ChunkedDecoder, Head, HttpError, parse_head

if TYPE_CHECKING:
    from edge_agent.listener import LimitedServer

log = logging.getLogger("edgefn.fastpath")

PREFIX = b"POST /v1/functions/"
_ROUTE = re.compile(r"^/v1/functions/([^/%{}]+)/invoke$")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# Beyond this much unread input (pipelined requests behind one in progress), stop reading.
_READ_AHEAD = 256 * 1024


class _Date:
    """The Date header, formatted once per second instead of per response."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        t = int(time.time())
        if t != cls.second:
            cls.second, cls.value = t, f"Date: {formatdate(t, usegmt=True)}\r\n".encode()
        return cls.value


class FastProtocol(asyncio.Protocol):
    """One client connection (see the module docstring); admitted like a LimitedHandler."""

    def __init__(self, server: LimitedServer, api: Api) -> None:
        self._server = server
        self._api = api
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: Head | None = None
        self._chunks: ChunkedDecoder | None = None
        self._continued = False
        self._busy = False  # a request is being answered
        self._paused_reading = False
        self._write_ready = asyncio.Event()
        self._write_ready.set()
        self._deadline: asyncio.TimerHandle | None = None
        self._switched = False
        self.opened_at = time.monotonic()
        self.waiting_for_headers = True  # LimitedServer evicts these first when full
        self.idle = False
        self._peer = "?"

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else "?"
        if not self._server.admit(self):
            self.waiting_for_headers = False
            self.transport.write(self._server.busy_answer)
            self.transport.close()
            return
        self._arm(self._limits.header_timeout_s, self._too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._server.release(self)
        self.transport = None
        self._write_ready.set()

    def pause_writing(self) -> None:
        self._write_ready.clear()

    def resume_writing(self) -> None:
        self._write_ready.set()

    def evict(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.idle:
            # The next request of a keep-alive connection: its own header deadline.
            self.idle = False
            self.waiting_for_headers = True
            self._arm(self._limits.header_timeout_s, self._too_slow)
        if self._busy:
            if len(self._buf) > _READ_AHEAD and not self._paused_reading and self.transport:
                self.transport.pause_reading()
                self._paused_reading = True
            return
        self._advance()

    # -- timers -------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.waiting_for_headers and self.transport is not None:
            log.info(
                "closing a connection from %s: no complete request headers in %g s",
                self._peer,
                self._limits.header_timeout_s,
            )
            self.transport.close()

    def _idle_too_long(self) -> None:
        self._deadline = None
        if self.idle and self.transport is not None:
            self.transport.close()

    # -- parsing ------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Make progress on the buffered input: a head, a body, then an answer."""
        if self.transport is None or self._switched or self._busy:
            return
        try:
            if self._head is None and not self._read_head():
                return
            payload = self._read_body()
        except HttpError as exc:
            self._refuse(exc)
            return
        if payload is None:
            return
        head, self._head, self._chunks, self._continued = self._head, None, None, False
        assert head is not None
        self._busy = True
        self._loop.create_task(self._serve(head, payload))

    def _read_head(self) -> bool:
        buf = self._buf
        # Tolerate the empty lines a client may send between requests (RFC 9112 2.2).
        while buf[:2] == b"\r\n":
            del buf[:2]
        if not buf:
            return False
        if not PREFIX.startswith(bytes(buf[: len(PREFIX)])):
            self._switch()  # not the invoke route: aiohttp parses it from its first byte
            return False
        end = buf.find(b"\r\n\r\n")
        limit = (self._limits.max_headers + 1) * (self._limits.max_header_bytes + 2) + 2
        if end < 0:
            if len(buf) > limit:
                raise HttpError(431, "headers_too_large", self._too_large_message())
            return False
        if end + 4 > limit:
            raise HttpError(431, "headers_too_large", self._too_large_message())
        head = parse_head(
            bytes(buf[: end + 4]),
            max_headers=self._limits.max_headers,
            max_line=self._limits.max_header_bytes,
        )
        if head.method != "POST" or _ROUTE.match(head.path) is None:
            self._switch()  # aiohttp answers it (404, 405) from the start of this request
            return False
        del buf[: end + 4]
        self.waiting_for_headers = False
        self._disarm()
        if head.chunked:
            self._chunks = ChunkedDecoder(self._api.max_body)
        self._head = head
        return True

    def _too_large_message(self) -> str:
        return (
            f"request headers exceed the limit ({self._limits.max_headers} headers, "
            f"{self._limits.max_header_bytes} bytes per line)"
        )

    def _read_body(self) -> bytes | None:
        head = self._head
        assert head is not None and self.transport is not None
        if self._chunks is not None:
            used = self._chunks.feed(self._buf)
            del self._buf[:used]
            if not self._chunks.done:
                self._continue(head)
                return None
            return bytes(self._chunks.body)
        length = head.content_length or 0
        if length > self._api.max_body:
            raise HttpError(413, "payload_too_large", "")  # answered by _refuse with the metric
        if len(self._buf) < length:
            self._continue(head)
            return None
        payload = bytes(self._buf[:length])
        del self._buf[:length]
        return payload

    def _continue(self, head: Head) -> None:
        if head.expect_continue and not self._continued and self.transport is not None:
            self._continued = True
            self.transport.write(_CONTINUE)

    # -- answering ----------------------------------------------------------------------------

    async def _serve(self, head: Head, payload: bytes) -> None:
        started = time.perf_counter()
        api = self._api
        headers = CIMultiDict(head.headers)
        rid = api.ids.from_client(headers.get("X-Request-Id"))
        match = _ROUTE.match(head.path)
        assert match is not None
        name = match.group(1)
        extra: list[tuple[str, str]] = []
        principal: Principal | None = None
        auth = api.auth
        try:
            if auth is not None:
                try:
                    principal = auth.check(
                        headers.get("Authorization"),
                        self._peer,
                        "invoke:" + name,
                        transport=self.transport,
                    )
                    auth.enter(principal)  # per-token concurrency (429)
                except AuthFailure as exc:
                    principal = None
                    answer = error_answer(exc.status, exc.code, exc.message)
                    if exc.status == 401:  # RFC 6750: say how to authenticate
                        extra.append(("WWW-Authenticate", 'Bearer realm="edgefn"'))
                    self._write(answer, extra, head.keep_alive, head.http11)
                    return
            query = MultiDict(parse_qsl(head.query, keep_blank_values=True)) if head.query else ()
            try:
                answer = await api.answer_invoke(
                    name, payload, headers, query, principal, rid, started
                )
            except Exception as exc:  # what `_guarded` does for the aiohttp routes
                where = f"POST {head.path}"
                escaped = escaped_error_answer(exc, server="agent", log=log, where=where)
                status, code, message = escaped or (500, "internal", "internal error")
                answer = error_answer(status, code, message, rid)
            self._write(answer, extra, head.keep_alive, head.http11)
        finally:
            if principal is not None and auth is not None:
                auth.leave(principal)
            await self._done(head.keep_alive)

    def _write(
        self, answer: Answer, extra: list[tuple[str, str]], keep_alive: bool, http11: bool
    ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        status, headers, body = answer
        out = bytearray(_STATUS.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode())
        for k, v in headers if not extra else (*headers, *extra):
            if _BAD_VALUE.search(v):  # a value from a function may not split the head
                v = _BAD_VALUE.sub(" ", v)
            out += f"{k}: {v}\r\n".encode("latin-1", "replace")
        out += b"Content-Length: %d\r\n" % len(body)
        out += _Date.now()
        if not keep_alive:
            out += b"Connection: close\r\n"
        elif not http11:
            out += b"Connection: keep-alive\r\n"
        out += b"\r\n"
        out += body
        transport.write(out)
        if not keep_alive:
            transport.close()

    async def _done(self, keep_alive: bool) -> None:
        if not self._write_ready.is_set():
            await self._write_ready.wait()  # the client reads slowly: do not pile up answers
        self._busy = False
        transport = self.transport
        if transport is None or transport.is_closing() or not keep_alive:
            return
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        if self._buf:
            self.waiting_for_headers = True
            self._arm(self._limits.header_timeout_s, self._too_slow)
            self._advance()
        else:
            self.idle = True
            self.waiting_for_headers = False
            self._arm(self._limits.idle_timeout_s, self._idle_too_long)

    def _refuse(self, exc: HttpError) -> None:
        """A request we will not serve: its JSON error, then close (its framing is unknown)."""
        name = ""
        if self._head is not None and (m := _ROUTE.match(self._head.path)):
            name = m.group(1)
        if exc.status == 413 and name:
            declared = self._head.content_length if self._head else None
            answer = self._api.too_large(name, "", declared)
        else:
            answer = error_answer(exc.status, exc.code, exc.message)
        self._head, self._chunks = None, None
        self._write(answer, [], keep_alive=False, http11=True)
        if self.transport is not None:
            self.transport.close()

    def _switch(self) -> None:
        """Give this connection to aiohttp (its own protocol), from the current request on."""
        transport = self.transport
        assert transport is not None
        self._switched = True
        self._disarm()
        self._server.release(self)
        handler = self._server.make_handler()
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._buf and not transport.is_closing():
            data, self._buf = bytes(self._buf), bytearray()
            handler.data_received(data)

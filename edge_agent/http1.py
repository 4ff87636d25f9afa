"""HTTP/1.1 request framing for the fast invoke path: a strict head parser and a chunked decoder.

Pure functions over bytes, no I/O, so they can be fuzzed directly (tests/test_http1.py) and the
protocol in `edge_agent.fastpath` stays about connections, not syntax. Strict on purpose: what
RFC 9112 lets a server reject is rejected (obs-fold, whitespace before a colon, bare LF line
ends, both Content-Length and Transfer-Encoding, conflicting Content-Lengths, transfer codings
other than a final `chunked`, HTTP/1.1 without Host), because leniency there is how request
smuggling starts.
Every refusal is an `HttpError` with the status and stable code the API answers with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edge_agent.errors import AgentError

# RFC 9110 token characters (methods, header names).
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")  # origin-form, visible ASCII only
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs except HTAB
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?$")
MAX_CHUNK_LINE = 1024


class HttpError(AgentError):
    """A request the server refuses: `status`, stable `code` (the answer's), and a message."""

    code = "http_request_refused"  # the class's own; each refusal carries the answer's code
    category = "request"
    status = 400

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.status = status


@dataclass(slots=True)
class Head:
    method: str
    path: str
    query: str
    http11: bool
    headers: list[tuple[str, str]]  # as sent (names in their case), in order
    lower: dict[str, str] = field(default_factory=dict)  # lower-case name -> value (joined)
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    expect_continue: bool = False


def parse_head(raw: bytes, *, max_headers: int, max_line: int) -> Head:
    """The request line and header fields of `raw` (which ends with the blank line)."""
    if not raw.endswith(b"\r\n\r\n"):
        raise HttpError(400, "bad_request", "request head must end with CRLF CRLF")
    lines = raw[:-4].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise HttpError(400, "bad_request", "bare CR or LF in the request head")
    request_line = lines[0]
    if len(request_line) > max_line:
        raise HttpError(431, "headers_too_large", "request line exceeds the limit")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "bad_request", "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError(400, "bad_request", "malformed method")
    if not _TARGET.match(target):
        raise HttpError(400, "bad_request", "request target must be an absolute path")
    if version == b"HTTP/1.1":
        http11 = True
    elif version == b"HTTP/1.0":
        http11 = False
    else:
        raise HttpError(505, "http_version_not_supported", "only HTTP/1.0 and 1.1 are served")
    fields = lines[1:]
    if len(fields) > max_headers:
        raise HttpError(431, "headers_too_large", f"more than {max_headers} header fields")
    headers: list[tuple[str, str]] = []
    lower: dict[str, str] = {}
    lengths: set[bytes] = set()
    for line in fields:
        if len(line) > max_line:
            raise HttpError(431, "headers_too_large", "a header line exceeds the limit")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise HttpError(400, "bad_request", "malformed header field (or obs-fold)")
        value = value.strip(b" \t")
        if _FIELD_VALUE_BAD.search(value):
            raise HttpError(400, "bad_request", "control character in a header value")
        n, v = name.decode("ascii"), value.decode("latin-1")
        ln = n.lower()
        headers.append((n, v))
        if ln == "content-length":
            lengths.update(x.strip(b" \t") for x in value.split(b","))
        lower[ln] = f"{lower[ln]}, {v}" if ln in lower else v
    if http11 and "host" not in lower:
        raise HttpError(400, "bad_request", "missing Host header (required in HTTP/1.1)")
    path, _, query = target.decode("ascii").partition("?")
    head = Head(method.decode("ascii"), path, query, http11, headers, lower)
    te = lower.get("transfer-encoding")
    if te is not None:
        if lengths:
            raise HttpError(400, "bad_request", "both Content-Length and Transfer-Encoding")
        codings = [c.strip().lower() for c in te.split(",")]
        if codings != ["chunked"]:
            raise HttpError(501, "not_implemented", f"transfer coding {te!r} is not supported")
        if not http11:
            raise HttpError(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        head.chunked = True
    elif lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise HttpError(400, "bad_request", "invalid or conflicting Content-Length")
        head.content_length = int(next(iter(lengths)))
    conn = {t.strip().lower() for t in lower.get("connection", "").split(",")}
    head.keep_alive = "close" not in conn if http11 else "keep-alive" in conn
    expect = lower.get("expect")
    if expect is not None:
        if expect.lower() != "100-continue":
            raise HttpError(417, "expectation_failed", f"cannot meet Expect: {expect}")
        head.expect_continue = http11
    return head


class ChunkedDecoder:
    """Decodes a chunked body incrementally; `feed` returns how many bytes it consumed."""

    def __init__(self, max_body: int) -> None:
        self._max = max_body
        self.body = bytearray()
        self.done = False
        self._need = 0  # data bytes left in the current chunk
        self._state = "size"  # size | data | data_crlf | trailers

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume from `data`; stops at the end of the body (the rest is the next request)."""
        view = memoryview(data)
        pos = 0
        while pos < len(view) and not self.done:
            if self._state == "data":
                take = min(self._need, len(view) - pos)
                self.body += view[pos : pos + take]
                pos += take
                self._need -= take
                if self._need == 0:
                    self._state = "data_crlf"
                continue
            if self._state == "data_crlf":
                if len(view) - pos < 2:
                    break
                if bytes(view[pos : pos + 2]) != b"\r\n":
                    raise HttpError(400, "bad_request", "chunk data not followed by CRLF")
                pos += 2
                self._state = "size"
                continue
            end = bytes(view[pos : pos + MAX_CHUNK_LINE + 2]).find(b"\r\n")
            if end < 0:
                if len(view) - pos > MAX_CHUNK_LINE:
                    raise HttpError(400, "bad_request", "chunk line too long")
                break  # wait for the rest of the line
            line = bytes(view[pos : pos + end])
            pos += end + 2
            if self._state == "size":
                m = _CHUNK_SIZE.match(line)
                if m is None:
                    raise HttpError(400, "bad_request", "malformed chunk size")
                size = int(m.group(1), 16)
                if len(self.body) + size > self._max:
                    raise HttpError(413, "payload_too_large", "chunked body exceeds the maximum")
                if size == 0:
                    self._state = "trailers"
                else:
                    self._need, self._state = size, "data"
            elif line == b"":  # the blank line after the (ignored) trailer fields
                self.done = True
            elif b":" not in line:
                raise HttpError(400, "bad_request", "malformed trailer field")
        return pos

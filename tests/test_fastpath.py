"""The fast invoke path (edge_agent.fastpath) with raw sockets against the agent's real runner.

A Node echo function behind the real FunctionSet/Router/Api, the listener of the agent
(`LimitedAppRunner` with `fast_api`) on loopback. Covers what issue 12 asks of the new path:
keep-alive and pipelining (in order, also across a switch to aiohttp for another route),
chunked bodies, `Expect: 100-continue`, HTTP/1.0, the body limit, slow heads, and refusals of
malformed requests with a JSON 4xx (never a crash or a hang: after every hostile input a good
request is still answered). Every read is bounded by BOUND_S; nothing is timed.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from edge_agent.api import Api
from edge_agent.functions import FunctionSet
from edge_agent.listener import LimitedAppRunner, ListenerLimits
from edge_agent.metrics import Metrics
from edge_agent.router import Router

BOUND_S = 10.0
MAX_BODY = 4096
R = b"POST /v1/functions/echo/invoke HTTP/1.1\r\nHost: a\r\n"  # a request head's start
ECHO = "exports.handler = async (event, context) => event;\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def port(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[int]:
    root = tmp_path_factory.mktemp("fastpath")
    fn = root / "echo"
    fn.mkdir()
    (fn / "handler.js").write_text(ECHO)
    (fn / "edgefn.toml").write_text(
        'name = "echo"\nversion = "1.0.0"\nruntime = "node"\nentry = "handler.js"\n'
        "[pool]\nmin_instances = 1\nconcurrency = 4\n"
    )
    functions = FunctionSet(root, require_signed=False, sandbox=None)
    await functions.sync()
    assert "echo" in functions.loaded, functions.problems
    metrics = Metrics()
    api = Api(Router(functions, metrics), functions, metrics, max_body_bytes=MAX_BODY, health=dict)
    limits = ListenerLimits(header_timeout_s=0.5, idle_timeout_s=2.0, max_headers=16)
    runner = LimitedAppRunner(
        api.app(), limits=limits, fast_api=api, access_log=None, handle_signals=False
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
        await functions.close(drain_s=1.0)


pytestmark = pytest.mark.asyncio(loop_scope="module")


def invoke(body: bytes, *, extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST /v1/functions/echo/invoke HTTP/{version}\r\nHost: a\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), BOUND_S)
    return status, headers, body


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def still_serves(port: int) -> None:
    reader, writer = await connect(port)
    try:
        writer.write(invoke(b"alive"))
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"alive")
    finally:
        writer.close()


async def test_keep_alive_invokes_then_another_route_on_the_same_connection(port: int) -> None:
    reader, writer = await connect(port)
    try:
        for i in range(3):
            writer.write(invoke(f"n{i}".encode(), extra=f"X-Request-Id: req-{i}\r\n"))
            status, headers, body = await read_response(reader)
            assert (status, body) == (200, f"n{i}".encode())
            assert headers["x-request-id"] == f"req-{i}"
            assert headers["x-edgefn-version"] == "1.0.0" and "x-edgefn-duration-ms" in headers
            assert "date" in headers and "connection" not in headers
        # Another route: the connection moves to aiohttp, which answers it (JSON 404 here).
        writer.write(b"GET /v1/nothing-here HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        writer.write(invoke(b"after"))  # aiohttp now serves invokes on it too, the same way
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"after")
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order_across_a_switch(port: int) -> None:
    reader, writer = await connect(port)
    try:
        writer.write(
            invoke(b"first") + invoke(b"second")
            + b"GET /v1/openapi.json HTTP/1.1\r\nHost: a\r\n\r\n" + invoke(b"third")
        )  # fmt: skip
        answers = [await read_response(reader) for _ in range(4)]
        assert [a[2] for a in (answers[0], answers[1], answers[3])] == [
            b"first",
            b"second",
            b"third",
        ]
        assert answers[2][0] == 200 and json.loads(answers[2][2])["openapi"]
    finally:
        writer.close()


async def test_chunked_body_and_expect_continue(port: int) -> None:
    reader, writer = await connect(port)
    try:
        writer.write(
            R + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
        )
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"hello world")
        writer.write(R + b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"body")
    finally:
        writer.close()


async def test_http10_closes_unless_kept_alive(port: int) -> None:
    reader, writer = await connect(port)
    try:
        writer.write(invoke(b"old", version="1.0"))
        status, headers, body = await read_response(reader)
        assert (status, body) == (200, b"old") and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
    finally:
        writer.close()
    reader, writer = await connect(port)
    try:
        writer.write(invoke(b"k1", extra="Connection: keep-alive\r\n", version="1.0"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"
        writer.write(invoke(b"k2", extra="Connection: keep-alive\r\n", version="1.0"))
        assert (await read_response(reader))[2] == b"k2"
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (R + b"Content-Length: 99999\r\n\r\n", 413,
         "payload_too_large"),
        (R + b"Transfer-Encoding: chunked\r\n\r\n"
         b"zz\r\n", 400, "bad_request"),
        (R + b"Transfer-Encoding: chunked\r\n\r\n"
         b"2000\r\n", 413, "payload_too_large"),
        (R + b"Content-Length: 1\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 400, "bad_request"),
        (R + b"Content-Length: 1, 2\r\n\r\n", 400,
         "bad_request"),
        (R + b"Bad Header: x\r\n\r\n", 400,
         "bad_request"),
        (R + b" folded: x\r\n\r\n", 400, "bad_request"),
        (b"POST /v1/functions/echo/invoke HTTP/2.0\r\n\r\n", 505,
         "http_version_not_supported"),
        (R + b"Expect: 200-ok\r\n\r\n", 417,
         "expectation_failed"),
        (R + b"Transfer-Encoding: gzip\r\n\r\n", 501,
         "not_implemented"),
        (b"POST /v1/functions/echo/invoke HTTP/1.1\r\n" + b"X-A: b\r\n" * 17 + b"\r\n", 431,
         "headers_too_large"),
        (b"POST /v1/functions/echo/invoke HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
         431, "headers_too_large"),
        (b"POST /v1/functions/echo/invoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400,
         "bad_request"),  # HTTP/1.1 without Host
    ],
)  # fmt: skip
async def test_malformed_requests_get_a_json_4xx_and_the_server_lives(
    port: int, raw: bytes, status: int, code: str
) -> None:
    reader, writer = await connect(port)
    try:
        writer.write(raw)
        got, headers, body = await read_response(reader)
        assert got == status and json.loads(body)["error"]["code"] == code
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
    finally:
        writer.close()
    await still_serves(port)


async def test_a_slow_invoke_head_and_an_early_close_mid_body(port: int) -> None:
    reader, writer = await connect(port)
    try:
        writer.write(b"POST /v1/functions/echo/invoke HTTP/1.1\r\nContent-Le")
        assert await asyncio.wait_for(reader.read(), BOUND_S) == b""  # cut at the deadline
    finally:
        writer.close()
    reader, writer = await connect(port)
    writer.write(R + b"Content-Length: 100\r\n\r\nab")
    await writer.drain()
    writer.close()  # gone with 98 bytes owed
    await still_serves(port)


async def test_random_mutations_of_a_request_never_crash_or_hang(port: int) -> None:
    """Bounded fuzz: 150 mutated requests, each on its own connection; every one is answered
    (any status) or closed within the bound, and the server still serves afterwards."""
    rng = random.Random(1212)
    good = invoke(b'{"a": 1}', extra="Content-Type: application/json\r\n")
    alphabet = b"\r\n :\t\x00\xff0-9aZ;,/%?"
    for _ in range(150):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            op, at = rng.random(), rng.randrange(len(data))
            if op < 0.4:
                data[at] = rng.choice(alphabet)
            elif op < 0.7:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        reader, writer = await connect(port)
        try:
            writer.write(bytes(data))
            writer.write_eof()
            out = await asyncio.wait_for(reader.read(), BOUND_S)
            assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]
        finally:
            writer.close()
    await still_serves(port)

"""Hostile LAN clients (issue 11 item 7), with raw sockets against the real API server on
loopback: a client that disconnects mid-body costs one debug line, not a traceback; one that
sends its request head slowly, or idles on a kept-alive connection, is disconnected.

The server runs in the test's loop behind the agent's own runner (`edge_agent.listener`) with
its timeouts shrunk; every read is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from edge_agent.api import Api
from edge_agent.functions import FunctionSet
from edge_agent.listener import LimitedAppRunner, ListenerLimits
from edge_agent.metrics import Metrics
from edge_agent.router import Router

BOUND_S = 10.0  # upper bound on every wait: a bound, never a timing assertion


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    functions = FunctionSet(tmp_path, require_signed=False, sandbox=None)
    metrics = Metrics()
    api = Api(Router(functions, metrics), functions, metrics, max_body_bytes=1 << 20, health=dict)
    limits = ListenerLimits(header_timeout_s=0.3, idle_timeout_s=0.3)
    runner = LimitedAppRunner(api.app(), limits=limits, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes; fails if it does not close in BOUND_S."""
    return await asyncio.wait_for(reader.read(), BOUND_S)


async def test_disconnect_mid_body_logs_one_debug_line(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgefn.api")
    for _ in range(3):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/functions/x/invoke HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nab"
        )
        await writer.drain()
        await asyncio.sleep(0.05)  # let the server start reading the body
        writer.transport.abort()
    for _ in range(200):  # bounded: up to 200 x 0.02 s
        if sum("client went away" in r.getMessage() for r in caplog.records) == 3:
            break
        await asyncio.sleep(0.02)
    gone = [r for r in caplog.records if "client went away" in r.getMessage()]
    assert len(gone) == 3 and all(r.levelno == logging.DEBUG for r in gone)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_slow_request_head_is_cut_off(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHo")  # never finishes the head
        await writer.drain()
        assert await closed_by_server(reader) == b""  # closed, nothing answered
    finally:
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert head.startswith(b"HTTP/1.1 ") and b"connection: close" not in head.lower()
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                b":"
            )[1]
        )
        await asyncio.wait_for(reader.readexactly(length), BOUND_S)
        # Kept alive, then idle: the server closes it.
        assert await closed_by_server(reader) == b""
    finally:
        writer.close()

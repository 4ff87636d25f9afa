"""Limits on the LAN listener (edge_agent.listener) and per-token concurrency (edge_agent.auth)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import FUNCTIONS, Response, http, install_dev_function, start_agent

CONFORMANCE_NODE = FUNCTIONS / "conformance" / "node"


def make_token(data_dir: Path, scope: str) -> str:
    argv = ["token", "create", "--data-dir", str(data_dir), "--scope", scope]
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout.strip().splitlines()[-1]


def _in_flight(url: str, token: str) -> float:
    """The function's requests in flight, from /metrics (read with an admin token)."""
    resp = http("GET", f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    return sum(
        float(line.split()[-1])
        for line in resp.body.decode().splitlines()
        if line.startswith("edgefn_pool_in_flight")
    )


@pytest.mark.slow
def test_per_token_concurrency_is_429_for_that_token_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    busy = make_token(data, "invoke:conformance-node")
    other = make_token(data, "invoke:conformance-node")
    admin = make_token(data, "admin")
    agent = start_agent(
        data, "--auth", "token", "--token-concurrency", "2", "--worker-user", "root"
    )
    url = f"{agent.url}/v1/functions/conformance-node/invoke"
    slow = json.dumps({"op": "sleep", "ms": 3000}).encode()
    results: list[Response] = []

    def call(token: str) -> None:
        headers = {"Authorization": f"Bearer {token}", "Cache-Control": "no-cache"}
        results.append(http("POST", url, slow, headers))

    threads = [threading.Thread(target=call, args=(busy,)) for _ in range(2)]
    try:
        # Warm the worker first, so the slow calls are in flight at once even on a busy machine.
        warm = agent.invoke("conformance-node", b"w", {"Authorization": f"Bearer {other}"})
        assert warm.status == 200, warm.body
        for t in threads:
            t.start()
        # Once both are in flight (seen by an admin token, which has its own count), a third
        # call with the same token is refused. Bounded wait.
        deadline = time.monotonic() + 10
        while _in_flight(agent.url, admin) < 2:
            assert any(t.is_alive() for t in threads), results
            assert time.monotonic() < deadline, "the slow calls never ran together"
            time.sleep(0.02)
        third = agent.invoke("conformance-node", b"x", {"Authorization": f"Bearer {busy}"})
        assert third.status == 429, (third.status, third.body)
        assert third.json()["error"]["code"] == "too_many_requests"
        # Another token is not held back by the busy one.
        assert (
            agent.invoke("conformance-node", b"y", {"Authorization": f"Bearer {other}"}).body
            == b"y"
        )
        for t in threads:
            t.join(30)
        assert [r.status for r in results] == [200, 200]
        # The slots are given back.
        again = agent.invoke("conformance-node", b"z", {"Authorization": f"Bearer {busy}"})
        assert again.status == 200
    finally:
        agent.stop()


@pytest.mark.slow
def test_oversized_headers_are_431_and_bodies_413(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "data", "--max-headers", "20", "--max-body-bytes", "100")
    try:
        many = {f"X-H{i}": "v" for i in range(40)}
        resp = agent.invoke("anything", b"", many)
        assert resp.status == 431 and resp.json()["error"]["code"] == "headers_too_large"
        long = agent.invoke("anything", b"", {"X-Long": "v" * 10000})
        assert long.status == 431 and long.json()["error"]["code"] == "headers_too_large"
        big = agent.invoke("anything", b"x" * 101)
        assert big.status == 413 and big.json()["error"]["code"] == "payload_too_large"
        assert agent.get("/v1/health").status == 200  # still serving
    finally:
        agent.stop()


@pytest.mark.slow
def test_slow_loris_connections_are_cut_off_while_others_are_served(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "data", "--max-connections", "50", "--header-timeout", "1")
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    loris: list[socket.socket] = []
    try:
        # 200 clients that start a request and never finish its headers.
        for _ in range(200):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            loris.append(s)
        # Real clients are served meanwhile: the oldest slow connections make room for them.
        for _ in range(20):
            assert agent.get("/v1/health").status == 200
        # Every slow connection is closed by the agent (evicted or past the header timeout),
        # however long it keeps trickling. Bounded wait.
        open_ones = set(loris)
        deadline = time.monotonic() + 30
        while open_ones and time.monotonic() < deadline:
            for s in list(open_ones):
                try:
                    s.sendall(b"X-Trickle: 1\r\n")
                    s.settimeout(0.01)
                    if s.recv(1024) == b"":
                        open_ones.discard(s)
                except TimeoutError:
                    pass
                except OSError:  # reset by the agent
                    open_ones.discard(s)
            time.sleep(0.2)
        assert not open_ones, f"{len(open_ones)} slow connections still open"
        assert agent.get("/v1/health").status == 200
        agent.wait_log(r"no complete request headers in 1 s")
    finally:
        for s in loris:
            s.close()
        agent.stop()


def _request_and_read(s: socket.socket) -> bytes:
    """One keep-alive GET /v1/health on a raw socket; returns the response's status line."""
    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, "connection closed before the response"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(4096)
        assert chunk, "connection closed inside the body"
        body += chunk
    return head.split(b"\r\n", 1)[0]


def _closed_by_peer(s: socket.socket, within_s: float, trickle: bytes = b"") -> bool:
    """Whether the agent closes `s` within a bound (sending `trickle` now and then meanwhile)."""
    deadline = time.monotonic() + within_s
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if trickle:
                s.sendall(trickle)
            if s.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset by the agent
            return True
    return False


@pytest.mark.slow
def test_idle_keep_alive_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    # aiohttp alone keeps an idle keep-alive connection 75 s: the 20 s bound fails without ours.
    agent = start_agent(tmp_path / "data", "--idle-timeout", "1", "--header-timeout", "60")
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            assert _request_and_read(s).endswith(b"200 OK")
            assert _request_and_read(s).endswith(b"200 OK")  # the connection is reused
            assert _closed_by_peer(s, within_s=20)
        assert agent.get("/v1/health").status == 200
    finally:
        agent.stop()


@pytest.mark.slow
def test_header_timeout_applies_to_every_request_on_a_connection(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "data", "--header-timeout", "1", "--idle-timeout", "60")
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            assert _request_and_read(s).endswith(b"200 OK")
            # A second request whose headers trickle in and never end: cut off like the first.
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            assert _closed_by_peer(s, within_s=20, trickle=b"X-Trickle: 1\r\n")
        agent.wait_log(r"no complete request headers in 1 s")
        assert agent.get("/v1/health").status == 200
    finally:
        agent.stop()

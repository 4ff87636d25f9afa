"""Errors no handler expected still leave the agent's API and the platform as JSON error bodies.

An edgefn error that escapes a handler keeps its stable code (and its HTTP status where its
subtree carries one); anything else is a 500 `internal` whose detail stays in the log. Both
servers run for real on loopback (aiohttp's test server); the failing part is the one thing each
test supplies: the agent's health source, or one extra platform route.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cloud_sync.platform.server import create_app
from cloud_sync.platform.settings import PlatformSettings
from cloud_sync.platform.store import StoreError
from edge_agent.api import Api
from edge_agent.functions import FunctionSet
from edge_agent.metrics import Metrics
from edge_agent.router import Router
from hardware.errors import CgroupError
from runtimes.errors import Overloaded

# server -> (the path whose handler fails, the logger that must carry the detail)
SERVERS = {"agent": ("/v1/health", "edgefn.api"), "platform": ("/v1/test-boom", "edgefn.platform")}

FAILURES = [
    # A runtimes error carries its status: it is kept.
    pytest.param(Overloaded("the wait queue is full"), 429, "overloaded", id="with-status"),
    # A hardware or cloud_sync error has none: 500, but with its own code and message.
    pytest.param(CgroupError("the cgroup vanished"), 500, "cgroup_error", id="hardware"),
    pytest.param(StoreError("the registry disk is gone"), 500, "store_error", id="cloud-sync"),
]


async def _serve(aiohttp_client: Any, tmp_path: Path, server: str, exc: Exception) -> Any:
    """A real server of that kind whose one handler raises `exc`."""
    if server == "agent":

        def health() -> dict[str, Any]:
            raise exc

        functions = FunctionSet(tmp_path / "functions", require_signed=False, sandbox=None)
        metrics = Metrics()
        router = Router(functions, metrics)
        app = Api(router, functions, metrics, max_body_bytes=1024, health=health).app()
    else:
        app = create_app(PlatformSettings(data_dir=tmp_path / "plat"))

        async def boom(request: web.Request) -> web.Response:
            raise exc

        app.router.add_get(SERVERS["platform"][0], boom)
    return await aiohttp_client(app)


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(("exc", "status", "code"), FAILURES)
async def test_an_escaping_edgefn_error_keeps_its_code(
    aiohttp_client: Any, tmp_path: Path, server: str, exc: Exception, status: int, code: str
) -> None:
    client = await _serve(aiohttp_client, tmp_path, server, exc)
    resp = await client.get(SERVERS[server][0])
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"] == {"code": code, "message": str(exc)}


@pytest.mark.parametrize("server", SERVERS)
async def test_a_foreign_error_is_internal_with_the_detail_only_in_the_log(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, server: str
) -> None:
    client = await _serve(aiohttp_client, tmp_path, server, KeyError("private detail"))
    path, logger = SERVERS[server]
    with caplog.at_level(logging.ERROR, logger=logger):
        resp = await client.get(path)
    assert resp.status == 500
    err = (await resp.json())["error"]
    assert err["code"] == "internal" and "private" not in err["message"]
    assert "private detail" in caplog.text


async def test_platform_answers_aiohttp_refusals_as_json(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client = await _serve(aiohttp_client, tmp_path, "platform", KeyError("unused"))
    missing = await client.get("/v1/no-such-route")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong = await client.delete("/v1/health")
    assert wrong.status == 405
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"
    # What handlers answer themselves is untouched.
    assert (await client.get("/v1/health")).status == 200

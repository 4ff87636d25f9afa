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

FAILURES: list[tuple[Exception, int, str]] = [
    # A runtimes error carries its status: it is kept.
    (Overloaded("the wait queue is full"), 429, "overloaded"),
    # A hardware error has no status: 500, but with its own code and message.
    (CgroupError("the cgroup vanished"), 500, "cgroup_error"),
]


async def _agent(aiohttp_client: Any, tmp_path: Path, exc: Exception) -> Any:
    def health() -> dict[str, Any]:
        raise exc

    functions = FunctionSet(tmp_path / "functions", require_signed=False, sandbox=None)
    metrics = Metrics()
    api = Api(Router(functions, metrics), functions, metrics, max_body_bytes=1024, health=health)
    return await aiohttp_client(api.app())


@pytest.mark.parametrize(("exc", "status", "code"), FAILURES, ids=lambda v: str(v))
async def test_agent_keeps_the_code_of_an_escaping_edgefn_error(
    aiohttp_client: Any, tmp_path: Path, exc: Exception, status: int, code: str
) -> None:
    client = await _agent(aiohttp_client, tmp_path, exc)
    resp = await client.get("/v1/health")
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err == {"code": code, "message": str(exc)}


async def test_agent_answers_a_foreign_error_as_internal_without_its_detail(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await _agent(aiohttp_client, tmp_path, ValueError("secret path /etc/x"))
    with caplog.at_level(logging.ERROR, logger="edgefn.api"):
        resp = await client.get("/v1/health")
    assert resp.status == 500
    err = (await resp.json())["error"]
    assert err["code"] == "internal" and "secret" not in err["message"]
    assert "secret path /etc/x" in caplog.text  # the detail is in the log


async def _platform(aiohttp_client: Any, tmp_path: Path, exc: Exception) -> Any:
    app = create_app(PlatformSettings(data_dir=tmp_path / "plat"))

    async def boom(request: web.Request) -> web.Response:
        raise exc

    app.router.add_get("/v1/test-boom", boom)
    return await aiohttp_client(app)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [*FAILURES, (StoreError("the registry disk is gone"), 500, "store_error")],
    ids=lambda v: str(v),
)
async def test_platform_keeps_the_code_of_an_escaping_edgefn_error(
    aiohttp_client: Any, tmp_path: Path, exc: Exception, status: int, code: str
) -> None:
    client = await _platform(aiohttp_client, tmp_path, exc)
    resp = await client.get("/v1/test-boom")
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"] == {"code": code, "message": str(exc)}


async def test_platform_errors_of_its_own_and_of_aiohttp_are_json(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await _platform(aiohttp_client, tmp_path, KeyError("private detail"))
    with caplog.at_level(logging.ERROR, logger="edgefn.platform"):
        resp = await client.get("/v1/test-boom")
    assert resp.status == 500
    err = (await resp.json())["error"]
    assert err["code"] == "internal" and "private" not in err["message"]
    assert "private detail" in caplog.text
    missing = await client.get("/v1/no-such-route")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong = await client.delete("/v1/health")
    assert wrong.status == 405
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"
    # What handlers answer themselves is untouched.
    assert (await client.get("/v1/health")).status == 200

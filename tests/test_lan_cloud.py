"""No confused deputy: LAN calls forwarded to a real platform (cloud routing) need the function's
scope, and the platform's cloud-exec log names the local token (its id, never the secret)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.cloud_invoke import CloudInvoker
from edge_agent.auth import ANONYMOUS, Principal
from edge_agent.functions import FunctionSet
from edge_agent.metrics import Metrics
from edge_agent.router import Router
from edge_agent.tokens import TokenRecord
from runtimes.errors import RuntimeErrorBase
from tests.harness import FUNCTIONS, AgentProcess, start_agent
from tests.registry_helpers import Platform, build, cli, ok, publish, start_platform

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("lan-cloud")
    key = root / "publisher.key"
    ok(cli("keys", "create", "--out", key))
    src = root / "where"
    shutil.copytree(FUNCTIONS / "where", src)
    platform = start_platform(root / "cloud")
    publish(platform, build(src, key, root / "where.efb"))
    yield platform
    platform.stop()


def create_token(data_dir: Path, *scope: str) -> tuple[str, str]:
    """(token id, token) from `edge-agent token create`."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "token",
            "create",
            "--data-dir",
            str(data_dir),
            *scope,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.search(r"created token (\w+):", proc.stdout)
    assert found, proc.stdout
    return found.group(1), proc.stdout.strip().splitlines()[-1]


def cloud_agent(tmp_path: Path, cloud: Platform, *extra: str) -> AgentProcess:
    """An agent whose copy of `where` routes every call to the platform."""
    data = tmp_path / "device"
    fn = data / "functions" / "where"
    shutil.copytree(FUNCTIONS / "where", fn)
    with (fn / "edgefn.toml").open("a") as f:
        f.write('\n[routing]\npolicy = "cloud"\n')
    return start_agent(data, "--cloud", cloud.url, "--cloud-token", cloud.token, *extra)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_forwarded_calls_need_the_scope_and_name_the_local_token(
    cloud: Platform, tmp_path: Path
) -> None:
    # Made before the agent starts, so it knows them from its first request.
    other_id, other = create_token(tmp_path / "device", "--scope", "invoke:something-else")
    right_id, right = create_token(tmp_path / "device", "--scope", "invoke:where")
    agent = cloud_agent(tmp_path, cloud, "--auth", "token")
    try:
        start = len(cloud.lines)
        assert agent.invoke("where", b"anon").status == 401
        denied = agent.invoke("where", b"other", bearer(other))
        assert denied.status == 403, denied.body
        # Only the caller with the scope gets the call run with the device's credentials.
        resp = agent.invoke("where", b"lan", bearer(right))
        assert resp.status == 200 and resp.headers["X-Edgefn-Served-By"] == "cloud", resp.body
        assert resp.body == b"echo:lan"
        calls = cloud.wait_log("cloud call where@1.0.0", start)
        assert len(calls) == 1 and f"local caller {right_id} " in calls[0], calls
        assert not any(other_id in line for line in cloud.lines[start:])
        assert right not in cloud.log_text()  # the id, never the token
    finally:
        agent.stop()


def test_without_local_auth_no_caller_is_named(cloud: Platform, tmp_path: Path) -> None:
    agent = cloud_agent(tmp_path, cloud)
    try:
        start = len(cloud.lines)
        assert agent.invoke("where", b"loopback").status == 200
        calls = cloud.wait_log("cloud call where@1.0.0", start)
        assert "local caller - " in calls[0], calls
    finally:
        agent.stop()


async def _route_with(caller: Principal | None, cloud: Platform, tmp_path: Path) -> str:
    """The error code the router ends with for `caller` calling a function only the cloud has."""
    invoker = CloudInvoker(cloud.url, token=cloud.token)
    functions = FunctionSet(tmp_path / "none", require_signed=False, sandbox=None)
    router = Router(functions, Metrics(), cloud=invoker, default_policy="cloud")
    try:
        await router.invoke("nowhere", b"", request_id="r1", caller=caller)
    except RuntimeErrorBase as exc:
        return exc.code
    finally:
        await invoker.close()
    return "ok"


def test_router_refuses_the_cloud_step_to_a_caller_without_the_scope(
    cloud: Platform, tmp_path: Path
) -> None:
    # A path to the router other than the API's checked route must not lend the device's rights.
    record = TokenRecord("abcd1234", "0" * 64, ("invoke:else",), 0.0)
    refused = asyncio.run(_route_with(Principal("abcd1234", record), cloud, tmp_path))
    assert refused == "cloud_forbidden"  # the device's token is valid: only the router says no
    assert asyncio.run(_route_with(ANONYMOUS, cloud, tmp_path)) == "cloud_forbidden"
    # The agent itself (no caller) and a caller with the scope reach the platform, which has
    # no function "nowhere".
    allowed = Principal("abcd1234", TokenRecord("abcd1234", "0" * 64, ("invoke:*",), 0.0))
    assert asyncio.run(_route_with(None, cloud, tmp_path)) == "cloud_unknown_function"
    assert asyncio.run(_route_with(allowed, cloud, tmp_path)) == "cloud_unknown_function"

"""The Dapr-compatible endpoint through a real agent and real Node workers.

The function is plain Dapr application code: it reads DAPR_HTTP_PORT and DAPR_API_TOKEN from
its environment and speaks Dapr's HTTP API with `fetch` (what Dapr's SDKs do over HTTP), with
no edgefn SDK call. Covers: service invocation, state save/get/bulk/delete (an unset key is
204), publish outside the permitted topics refused, a wrong token refused, a function without
`[dapr]` gets no endpoint, and a token stops working when its function version is replaced."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge_agent.agent import Agent
from edge_agent.settings import Settings
from runtimes.sandbox import Sandbox
from tests.test_building_blocks import make_fn

pytestmark = pytest.mark.slow

DAPR_APP = r"""
// A Dapr HTTP-API app: {"steps": [{"method","path","body"?,"token"?}...]} -> each status + body.
const base = `http://127.0.0.1:${process.env.DAPR_HTTP_PORT}`;
exports.handler = async (event) => {
  const env = process.env;
  if (event.env) return { port: env.DAPR_HTTP_PORT || null, token: !!env.DAPR_API_TOKEN };
  const out = [];
  for (const s of event.steps) {
    const headers = { 'dapr-api-token': s.token ?? env.DAPR_API_TOKEN };
    headers['content-type'] = 'application/json';
    const res = await fetch(base + s.path, {
      method: s.method, headers, body: s.body === undefined ? undefined : JSON.stringify(s.body),
    });
    out.push({ status: res.status, body: await res.text() });
  }
  return out;
};
"""


def make_dapr_fn(data: Path, name: str, permissions: str, version: str = "1.0.0") -> None:
    d = data / "functions" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "handler.js").write_text(DAPR_APP)
    (d / "edgefn.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nruntime = "node"\nentry = "handler.js"\n'
        f"timeout_ms = 5000\n\n[pool]\nmin_instances = 1\n\n[dapr]\nenabled = true\n\n"
        f"[permissions]\n{permissions}\n"
    )


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    data = tmp_path / "d"
    make_dapr_fn(data, "dapr-app", 'invoke = ["eta"]\npublish = ["traffic/#"]\n'
                 'state = { max_bytes = 4096 }\nsecrets = ["api-key"]')  # fmt: skip
    make_fn(data, "eta")  # the Node conformance function: echoes what it gets
    a = Agent(Settings(data_dir=data, port=0))
    await a.open(sandbox=Sandbox())
    await a.functions.sync()
    assert {"dapr-app", "eta"} <= set(a.functions.loaded), a.functions.problems
    yield a
    await a.stop()


async def steps(agent: Agent, name: str, *items: dict[str, Any]) -> list[dict[str, Any]]:
    routed = await agent.router.invoke(
        name, json.dumps({"steps": list(items)}).encode(), request_id="dapr-t",
        content_type="application/json",
    )  # fmt: skip
    return list(json.loads(routed.result.payload))


async def test_dapr_http_api_invoke_state_and_publish(agent: Agent) -> None:
    out = await steps(
        agent,
        "dapr-app",
        {"method": "POST", "path": "/v1.0/invoke/eta/method/anything", "body": "ping"},
        {"method": "POST", "path": "/v1.0/state/statestore",
         "body": [{"key": "pos", "value": {"lat": 52.5}}, {"key": "n", "value": 3}]},
        {"method": "GET", "path": "/v1.0/state/statestore/pos"},
        {"method": "POST", "path": "/v1.0/state/statestore/bulk", "body": {"keys": ["n", "x"]}},
        {"method": "DELETE", "path": "/v1.0/state/statestore/pos"},
        {"method": "GET", "path": "/v1.0/state/statestore/pos"},
        {"method": "GET", "path": "/v1.0/metadata"},
        {"method": "GET", "path": "/v1.0/healthz"},
    )  # fmt: skip
    assert out[0] == {"status": 200, "body": "ping"}  # the JSON string reached the callee
    assert out[1]["status"] == 204
    assert out[2]["status"] == 200 and json.loads(out[2]["body"]) == {"lat": 52.5}
    assert json.loads(out[3]["body"]) == [{"key": "n", "data": 3}, {"key": "x"}]
    assert out[4]["status"] == 204 and out[5] == {"status": 204, "body": ""}
    assert json.loads(out[6]["body"])["id"] == "dapr-app"
    assert out[7]["status"] == 204


async def test_dapr_requests_sit_behind_the_same_permissions_and_token(agent: Agent) -> None:
    out = await steps(
        agent,
        "dapr-app",
        {"method": "POST", "path": "/v1.0/publish/pubsub/weather/rain", "body": {"mm": 3}},
        {"method": "POST", "path": "/v1.0/invoke/dapr-app/method/x", "body": "loop"},
        {"method": "GET", "path": "/v1.0/state/statestore/k", "token": "0" * 64},
        {"method": "POST", "path": "/v1.0/publish/pubsub/traffic/jam", "body": {"at": 1}},
        {"method": "POST", "path": "/v1.0/state/statestore", "body": {"not": "a list"}},
        {"method": "GET", "path": "/v1.0/secrets/local/db-password"},
        {"method": "GET", "path": "/v1.0/secrets/local/api-key"},
    )  # fmt: skip
    assert out[0]["status"] == 403
    assert json.loads(out[0]["body"])["errorCode"] == "ERR_PERMISSION_DENIED"
    assert out[1]["status"] == 403 and "cycle" in json.loads(out[1]["body"])["message"]
    assert out[2]["status"] == 401 and "ERR_UNAUTHORIZED" in out[2]["body"]
    # Permitted topic, but the agent is not joined to a platform: said, not dropped.
    assert out[3]["status"] == 503 and "ERR_UNAVAILABLE" in out[3]["body"]
    assert out[4]["status"] == 400 and "ERR_MALFORMED_REQUEST" in out[4]["body"]
    # Secrets: a name the manifest does not list is refused; a listed one not delivered yet
    # is not found (the secret store's own tests deliver and rotate them).
    assert out[5]["status"] == 403 and "ERR_PERMISSION_DENIED" in out[5]["body"]
    assert out[6]["status"] == 404 and "ERR_NOT_FOUND" in out[6]["body"]


async def test_only_dapr_functions_get_an_endpoint_and_old_tokens_stop(
    agent: Agent, tmp_path: Path
) -> None:
    data = agent.settings.data_dir
    shutil.copytree(data / "functions" / "eta", data / "functions" / "plain")
    toml = data / "functions" / "plain" / "edgefn.toml"
    toml.write_text(toml.read_text().replace('name = "eta"', 'name = "plain"'))
    await agent.functions.sync()
    routed = await agent.router.invoke(
        "dapr-app", b'{"env": true}', request_id="e", content_type="application/json"
    )
    env = json.loads(routed.result.payload)
    assert env["port"] and env["token"] is True
    dapr = agent.functions._dapr
    assert dapr is not None
    old_token = next(iter(dapr._tokens))
    url = f"http://127.0.0.1:{env['port']}/v1.0/metadata"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"dapr-api-token": old_token}) as r:
            assert r.status == 200
        # A new version replaces the old one: the old start's token no longer works.
        make_dapr_fn(data, "dapr-app", 'invoke = ["eta"]', version="1.1.0")
        await agent.functions.sync()
        assert agent.functions.loaded["dapr-app"].manifest.version == "1.1.0"
        for _ in range(100):  # the old version drains, then its token is revoked (bounded)
            if old_token not in dapr._tokens:
                break
            await asyncio.sleep(0.1)
        async with s.get(url, headers={"dapr-api-token": old_token}) as r:
            assert r.status == 401
    assert "plain" in agent.functions.loaded
    assert not agent.functions.loaded["plain"].dapr_token

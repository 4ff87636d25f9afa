"""The agent's HTTP contract against a real `edge-agent run`: metrics text, error bodies, OpenAPI.

One agent process with two Node functions serves the whole module: two functions are what made
the pool gauges interleave, and starting Node workers is the expensive part.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_sync.http_server import HTTP_STATUS_CODES
from edge_agent import listener as listener_module
from tests.harness import (
    FUNCTIONS,
    AgentProcess,
    install_dev_function,
    start_agent,
    write_manifest,
)

CONFORMANCE_NODE = FUNCTIONS / "conformance" / "node"
NAMES = ("conf-a", "conf-b")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    data = tmp_path_factory.mktemp("agent-http") / "data"
    for name in NAMES:
        dest = install_dev_function(CONFORMANCE_NODE, data, name)
        write_manifest(
            dest, name=name, version="1.0.0", runtime="node", entry="handler.js", timeout_ms=5000
        )
    proc = start_agent(data)
    yield proc
    proc.stop()


def _raw_request(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library would send these) and read the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:  # bounded: the agent closes the connection after a parse error
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def test_metrics_is_valid_prometheus_text_with_each_family_once(agent: AgentProcess) -> None:
    for name in NAMES:
        assert agent.invoke(name, b"x").status == 200
    text = agent.get("/metrics").body.decode()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    # The parser starts a new family whenever the sample name changes: an interleaved family
    # (pool gauges emitted function by function) shows up here more than once.
    assert len(names) == len(set(names)), names
    by_name = {f.name: f for f in families}
    instances = {s.labels["function"]: s.value for s in by_name["edgefn_pool_instances"].samples}
    assert instances == {"conf-a": 1.0, "conf-b": 1.0}
    healthy = by_name["edgefn_function_healthy"]
    assert healthy.type == "gauge"
    assert {s.labels["function"] for s in healthy.samples} == set(NAMES)
    assert by_name["edgefn_invocation_duration_seconds"].type == "histogram"


def test_malformed_json_to_a_json_function_is_400_bad_request(agent: AgentProcess) -> None:
    resp = agent.invoke("conf-a", b'{"op": "echo", broken', {"Content-Type": "application/json"})
    assert resp.status == 400, resp.body
    err = resp.json()["error"]
    assert err["code"] == "bad_request"
    assert err["function"] == "conf-a"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(b"X-Huge: " + b"a" * 20000 + b"\r\n", id="header-over-8190-bytes"),
        pytest.param(b"".join(b"X-H%d: v\r\n" % i for i in range(500)), id="too-many-headers"),
    ],
)
def test_http_parse_errors_are_json_error_bodies(agent: AgentProcess, headers: bytes) -> None:
    request = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"
    status, head, body = _raw_request(agent.url, request)
    # 431, the status for exactly this (RFC 6585), with the JSON body (edge_agent.listener).
    assert status == 431
    assert head["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["code"] == "headers_too_large"
    assert err["message"]
    # The agent is still serving.
    assert agent.get("/v1/health").status == 200


# ---- the OpenAPI document against what exists ------------------------------------------------

# Errors that never reach the local HTTP API, with the reason. A new error class must be either
# listed in openapi.json or here: that is what keeps the two from drifting.
NOT_HTTP = {
    "bad_manifest": "a function that does not load is reported as unknown_function / in status",
    "missing_toolchain": "the same: load problems, not invocation answers",
    "bad_bundle": "install and build time (edge-agent install, edge-cloud fn build)",
    "build_failed": "build time",
    "install_failed": "edge-agent install / rollback, a CLI",
    "warm_failed": "the same: the installer's warm check",
    "startup_failed": "the agent does not start at all",
    "agent_error": "an abstract base, never raised itself",
    "routing_failed": "the class's own name: an instance answers with its last failure's code",
    "protocol_violation": "the worker is killed: its requests answer worker_crashed",
    "cache_incompatible": "the cache goes degraded (a miss) and rebuilds its file",
    "cache_unusable": "the same: a degraded cache answers misses, not errors",
    "wal_unavailable": "a store that cannot open: the agent does not start, or the cache degrades",
    "auth_failure": "an abstract base: unauthorized, forbidden or too_many_requests answer",
    "bad_config": "the agent does not start: edge-agent run exits 4 with the file and key",
    "token_error": "edge-agent token commands, a CLI",
    "client_error": "the LAN client (edge_agent.client) could not find or reach an agent",
    # Building blocks: answered to the calling function in a CALL_ERROR frame (with the short
    # sdk_code), never to an HTTP client.
    "capability_error": "an abstract base of the building-block errors",
    "capability_not_permitted": "a CALL_ERROR to the function (not_permitted)",
    "capability_not_found": "a CALL_ERROR to the function (not_found)",
    "capability_timeout": "a CALL_ERROR to the function (timeout)",
    "capability_quota_exceeded": "a CALL_ERROR to the function (quota_exceeded)",
    "capability_unavailable": "a CALL_ERROR to the function (unavailable)",
}


def _error_classes() -> list[type]:
    """Every error class of the one runtimes tree, once every agent and runtimes module is loaded.

    All of them, not only those on the HTTP path: which classes exist must not depend on which
    other tests ran first in the same process.
    """
    for pkg in ("runtimes", "edge_agent"):
        root = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{pkg}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    from runtimes.errors import RuntimeErrorBase

    seen: list[type] = []
    todo: list[type] = [RuntimeErrorBase]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def _literal_codes() -> set[str]:
    """`code="..."` overrides in the modules an invocation passes through."""
    root = Path(__file__).resolve().parent.parent
    modules = [
        "edge_agent/api.py",
        "edge_agent/router.py",
        "edge_agent/routing.py",
        "cloud_sync/cloud_invoke.py",
        "runtimes/pool.py",
        "runtimes/worker.py",
        "runtimes/cpp/inproc.py",
    ]
    found: set[str] = set()
    for rel in modules:
        found |= set(re.findall(r'code="([a-z_]+)"', (root / rel).read_text()))
    return found


def _host_codes() -> set[str]:
    """The codes docs/protocol.md says a worker host sends."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    sentence = doc.split("Error codes a host sends:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_]+)` \(", sentence))


def test_openapi_error_codes_match_the_errors_that_exist(agent: AgentProcess) -> None:
    doc = agent.get("/v1/openapi.json").json()
    documented = set(
        doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    )
    class_codes = {cls.code for cls in _error_classes()}
    assert {"cloud_unavailable", "cloud_circuit_open", "bad_request"} <= class_codes
    produced = (
        (class_codes - set(NOT_HTTP))
        | _literal_codes()
        | _host_codes()
        | set(HTTP_STATUS_CODES.values())
        | listener_module.CODES
        | {"http_error", "internal"}
    )
    assert produced - documented == set(), "errors the API can answer but openapi.json lacks"
    assert documented - produced == set(), "codes openapi.json lists that nothing produces"
    assert set(NOT_HTTP) <= class_codes, "NOT_HTTP names a code no error class has any more"


def _routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route the API registers, read from a real route table."""
    from edge_agent.api import Api
    from edge_agent.functions import FunctionSet
    from edge_agent.metrics import Metrics
    from edge_agent.router import Router

    functions = FunctionSet(tmp_path, require_signed=False, sandbox=None)
    metrics = Metrics()
    api = Api(Router(functions, metrics), functions, metrics, max_body_bytes=1024, health=dict)
    routes = set()
    for route in api.app().router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if route.method == "*" or path is None:
            continue  # the JSON 404/405 catch-all
        routes.add((route.method.lower(), path))
    return routes - {("head", p) for _m, p in routes}


def test_openapi_paths_match_the_routes(agent: AgentProcess, tmp_path: Path) -> None:
    doc = agent.get("/v1/openapi.json").json()
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert ("delete", "/v1/cache/{name}") in documented
    assert documented == _routes(tmp_path)

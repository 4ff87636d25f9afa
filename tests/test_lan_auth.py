"""Local API security: bearer tokens (edge_agent.tokens, edge_agent.auth) on a real agent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.auth import Authenticator, Forbidden, Unauthorized
from edge_agent.settings import Settings
from edge_agent.tokens import TokenError, TokenStore
from tests.harness import FUNCTIONS, AgentProcess, http, install_dev_function, start_agent

CONFORMANCE_NODE = FUNCTIONS / "conformance" / "node"


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=60
    )


def create_token(data_dir: Path, *scopes: str, expires: str = "") -> str:
    argv = ["token", "create", "--data-dir", str(data_dir)]
    for scope in scopes:
        argv += ["--scope", scope]
    if expires:
        argv += ["--expires", expires]
    proc = edge_agent(*argv)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]  # the contract: the token is the last line


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- refusing to expose the API without auth --------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "file"])
def test_non_loopback_without_auth_is_refused_before_listening(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    if how == "flag":
        proc = edge_agent("run", "--data-dir", str(data), "--host", "0.0.0.0", "--port", "0")
        assert "--auth token" in proc.stderr
    else:
        cfg = tmp_path / "agent.toml"
        cfg.write_text('host = "0.0.0.0"\nport = 0\n')
        proc = edge_agent("run", "--config", str(cfg), "--data-dir", str(data))
        assert 'auth = "token"' in proc.stderr
    assert proc.returncode == 4
    assert "refusing to listen on 0.0.0.0 without authentication" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (data / "agent.json").exists()  # it never listened


def test_exposure_rules() -> None:
    base = Settings(data_dir=Path("/x"))
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        Settings(data_dir=Path("/x"), host=host).check()
    for host in ("0.0.0.0", "10.1.2.3", "::", "agent.local"):
        with pytest.raises(Exception, match="without authentication"):
            Settings(data_dir=Path("/x"), host=host).check()
        Settings(data_dir=Path("/x"), host=host, auth="token").check()
    with pytest.raises(Exception, match="mtls"):
        Settings(data_dir=base.data_dir, auth="mtls").check()


# --- the token store and its CLI ---------------------------------------------------------------


def test_token_cli_create_list_revoke(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = create_token(data, "invoke:eta-node", "admin", expires="3600")
    assert token.startswith("eft_") and len(token) == 47
    other = create_token(data, "invoke:*")
    stored = (data / "tokens.json").read_text()
    assert token not in stored and other not in stored  # hashes only
    assert (data / "tokens.json").stat().st_mode & 0o077 == 0

    listing = edge_agent("token", "list", "--data-dir", str(data), "--json")
    assert listing.returncode == 0
    items = json.loads(listing.stdout)
    assert [i["scopes"] for i in items] == [["invoke:eta-node", "admin"], ["invoke:*"]]
    assert items[0]["expires_at"] is not None and items[1]["expires_at"] is None
    keys = {"id", "scopes", "created_at", "expires_at", "client_cn", "source"}
    assert all(set(i) == keys and i["source"] == "local" for i in items)
    text = edge_agent("token", "list", "--data-dir", str(data)).stdout
    assert items[0]["id"] in text and token not in text and "sha" not in text

    revoked = edge_agent("token", "revoke", items[0]["id"], "--data-dir", str(data))
    assert revoked.returncode == 0 and items[0]["id"] in revoked.stdout
    left = json.loads(edge_agent("token", "list", "--data-dir", str(data), "--json").stdout)
    assert [i["id"] for i in left] == [items[1]["id"]]
    again = edge_agent("token", "revoke", items[0]["id"], "--data-dir", str(data))
    assert again.returncode == 1 and "no token with id" in again.stderr

    bad = edge_agent("token", "create", "--data-dir", str(data), "--scope", "invoke:")
    assert bad.returncode == 1 and "bad scope" in bad.stderr


def test_store_refuses_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{not json")
    with pytest.raises(TokenError, match="not a token store"):
        TokenStore(path).read()


async def test_authenticator_rules(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    _, one = store.create(["invoke:a"])
    _, any_fn = store.create(["invoke:*"])
    _, admin = store.create(["admin"])
    _, old = store.create(["invoke:*"], expires_at=time.time() - 1)
    auth = Authenticator(store.path)
    await auth.start()
    try:
        assert auth.check(f"Bearer {one}", "p", "invoke:a").token_id
        assert auth.check(f"bearer {any_fn}", "p", "invoke:b").token_id
        with pytest.raises(Forbidden):
            auth.check(f"Bearer {one}", "p", "invoke:b")
        with pytest.raises(Forbidden):
            auth.check(f"Bearer {admin}", "p", "invoke:a")  # admin is not invoke:*
        for header in (None, "", f"Basic {one}", "Bearer ", f"Bearer {one}x", f"Bearer {old}"):
            with pytest.raises(Unauthorized):
                auth.check(header, "p", "invoke:a")
        assert auth.check(None, "p", None, optional=True).record is None
    finally:
        await auth.close()


def test_client_refuses_to_guess_between_agents() -> None:
    from edge_agent.client import ClientError, pick
    from edge_agent.discovery import Found

    a = Found("edge-a", "edge-a._edgefn._tcp.local.", ("10.0.0.1",), 8680, {"tls": "1"})
    b = Found("edge-b", "edge-b._edgefn._tcp.local.", ("10.0.0.2",), 8680, {})
    assert pick([a, b], "edge-b") is b and pick([a], None) is a
    assert a.url == "https://10.0.0.1:8680" and b.url == "http://10.0.0.2:8680"
    for found, device, message in (([a, b], None, "pass --device"), ([], None, "no edgefn"),
                                    ([a], "edge-c", "'edge-c'")):  # fmt: skip
        with pytest.raises(ClientError, match=message):
            pick(found, device)


# --- a real agent with --auth token ------------------------------------------------------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[AgentProcess]:
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    # --worker-user root: the test's tmp dir is root-only, an edgefn-worker could not read it.
    agent = start_agent(data, "--auth", "token", "--worker-user", "root")
    try:
        yield agent
    finally:
        agent.stop()


@pytest.mark.slow
def test_invocation_needs_a_token_with_the_function_scope(secured: AgentProcess) -> None:
    data = secured.data_dir
    right = create_token(data, "invoke:conformance-node")
    wildcard = create_token(data, "invoke:*")
    wrong = create_token(data, "invoke:other-fn")
    expired = create_token(data, "invoke:conformance-node", expires="0.05")

    # Tokens made while the agent runs are picked up by the reload: once the last one made is
    # known (as expired), all are. Bounded wait.
    deadline = time.monotonic() + 10
    while "expired" not in secured.invoke("conformance-node", b"", bearer(expired)).body.decode():
        assert time.monotonic() < deadline, secured.log_text()
        time.sleep(0.1)

    anonymous = secured.invoke("conformance-node", b"hi")
    assert anonymous.status == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert anonymous.headers.get("WWW-Authenticate", "").startswith("Bearer")
    garbage = secured.invoke("conformance-node", b"hi", bearer("eft_" + "x" * 43))
    assert garbage.status == 401 and garbage.json()["error"]["code"] == "unauthorized"
    forbidden = secured.invoke("conformance-node", b"hi", bearer(wrong))
    assert forbidden.status == 403 and forbidden.json()["error"]["code"] == "forbidden"
    late = secured.invoke("conformance-node", b"hi", bearer(expired))
    assert late.status == 401 and "expired" in late.json()["error"]["message"]
    ok = secured.invoke("conformance-node", b"hi", bearer(right))
    assert ok.status == 200 and ok.body == b"hi"
    assert secured.invoke("conformance-node", b"yo", bearer(wildcard)).body == b"yo"

    # The CLI sends the token (--token or $EDGEFN_TOKEN) through edge_agent.client.
    url = ["--url", secured.url, "--data", "cli"]
    by_flag = edge_agent("invoke", "conformance-node", *url, "--token", right)
    assert by_flag.returncode == 0 and by_flag.stdout == "cli", by_flag.stderr
    denied = edge_agent("invoke", "conformance-node", *url, "--token", wrong)
    assert denied.returncode == 1 and "forbidden" in denied.stderr

    # Failures are logged with the peer, never with the token.
    secured.wait_log(r"refused a request from 127\.0\.0\.1: no token")
    secured.wait_log(r"refused a request from 127\.0\.0\.1: token \w+ lacks scope")
    log = secured.log_text()
    for token in (right, wildcard, wrong, expired, "eft_" + "x" * 43):
        assert token not in log


@pytest.mark.slow
def test_revocation_is_honoured_by_a_running_agent(secured: AgentProcess) -> None:
    data = secured.data_dir
    token = create_token(data, "invoke:conformance-node")
    deadline = time.monotonic() + 10
    while secured.invoke("conformance-node", b"a", bearer(token)).status != 200:
        assert time.monotonic() < deadline, secured.log_text()
        time.sleep(0.1)
    token_id = json.loads(edge_agent("token", "list", "--data-dir", str(data), "--json").stdout)[0][
        "id"
    ]
    assert edge_agent("token", "revoke", token_id, "--data-dir", str(data)).returncode == 0
    # The agent polls the file every RELOAD_INTERVAL_S (0.5 s, for the 2 s promise). Bounded.
    deadline = time.monotonic() + 10
    while (resp := secured.invoke("conformance-node", b"a", bearer(token))).status == 200:
        assert time.monotonic() < deadline, "revoked token still accepted"
        time.sleep(0.05)
    assert resp.status == 401 and resp.json()["error"]["code"] == "unauthorized"


@pytest.mark.slow
def test_admin_scope_guards_purge_metrics_and_details(secured: AgentProcess) -> None:
    data = secured.data_dir
    user = create_token(data, "invoke:conformance-node")
    admin = create_token(data, "admin")
    deadline = time.monotonic() + 10
    url = secured.url
    while http("GET", f"{url}/metrics", headers=bearer(admin)).status != 200:
        assert time.monotonic() < deadline, secured.log_text()
        time.sleep(0.1)

    purge = f"{url}/v1/cache/conformance-node"
    assert http("DELETE", purge).status == 401
    denied = http("DELETE", purge, headers=bearer(user))
    assert denied.status == 403 and denied.json()["error"]["code"] == "forbidden"
    assert http("DELETE", purge, headers=bearer(admin)).json()["purged"] == 0
    assert http("GET", f"{url}/metrics", headers=bearer(user)).status == 403

    # Health: liveness for anyone, details only for admin.
    assert http("GET", f"{url}/v1/health").json() == {"status": "ok"}
    assert http("GET", f"{url}/v1/health", headers=bearer(user)).json() == {"status": "ok"}
    detail = http("GET", f"{url}/v1/health", headers=bearer(admin)).json()
    assert detail["status"] == "ok" and detail["pid"] == secured.proc.pid

    # Function listing: a token is needed; pool state and pids only for admin.
    assert http("GET", f"{url}/v1/functions").status == 401
    plain = http("GET", f"{url}/v1/functions", headers=bearer(user)).json()["functions"]
    assert plain == [
        {"name": "conformance-node", "version": plain[0]["version"], "runtime": "node"}
    ]
    full = http("GET", f"{url}/v1/functions", headers=bearer(admin)).json()["functions"]
    assert "status" in full[0]
    one = http("GET", f"{url}/v1/functions/conformance-node", headers=bearer(user)).json()
    assert "status" not in one

    # The OpenAPI document stays public and lists the auth errors.
    spec = http("GET", f"{url}/v1/openapi.json").json()
    codes = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert {"unauthorized", "forbidden"} <= set(codes["enum"])
    invoke = spec["paths"]["/v1/functions/{name}/invoke"]["post"]["responses"]
    assert {"401", "403"} <= set(invoke)


@pytest.mark.slow
def test_functions_and_cache_purge_cli_send_the_token(secured: AgentProcess) -> None:
    data, url = secured.data_dir, secured.url
    user = create_token(data, "invoke:conformance-node")
    admin = create_token(data, "admin")
    anonymous = edge_agent("functions", "--url", url, "--data-dir", str(data))
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr, anonymous.stderr
    listed = edge_agent("functions", "--url", url, "--json", "--token", user)
    assert listed.returncode == 0, listed.stderr
    assert [f["name"] for f in json.loads(listed.stdout)] == ["conformance-node"]

    purge = ["cache", "purge", "conformance-node", "--url", url, "--data-dir", str(data)]
    assert edge_agent(*purge).returncode != 0  # 401, not purged offline behind the agent's back
    denied = edge_agent(*purge, "--token", user)
    assert denied.returncode != 0 and "forbidden" in denied.stderr, denied.stderr
    done = edge_agent(*purge, "--token", admin)
    assert done.returncode == 0 and "purged 0 cached results" in done.stdout, done.stderr


@pytest.mark.slow
def test_without_auth_loopback_behaves_as_before(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "data")
    try:
        assert "pid" in agent.get("/v1/health").json()
        assert http("DELETE", f"{agent.url}/v1/cache/x").status == 200
    finally:
        agent.stop()

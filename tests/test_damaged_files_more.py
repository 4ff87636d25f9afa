"""No file takes the agent down (issue 11 item 4), the remaining files: the LAN token store
(`tokens.json`), the sync state (`sync-state.json`), the functions' key-value state (`state.db`)
and the agent's own state file (`agent.json`). Each is damaged (random bytes, or truncated), then
a real agent process starts on it: it serves and says precisely what it set aside.

Security: a damaged token store fails closed. With `--auth token` no token is valid afterwards
(401), not even one that was valid before; a token made after the repair works.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.harness import FUNCTIONS, AgentProcess, install_dev_function, start_agent
from tests.test_building_blocks import blocks, make_fn
from tests.test_lan_auth import bearer, create_token
from tests.test_sync_e2e import FN, enrol, run_agent, start_platform, wait_for

pytestmark = pytest.mark.slow

DAMAGES = ("random", "truncated")


def damage(path: Path, how: str) -> None:
    """Random bytes of the same size, or the first half of the file (a cut write)."""
    raw = path.read_bytes()
    assert raw, f"{path} should exist and hold something before it is damaged"
    if how == "random":
        path.write_bytes(os.urandom(max(len(raw), 64)))
    else:
        path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_token_store_fails_closed(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    install_dev_function(FUNCTIONS / "conformance" / "node", data, FN)
    token = create_token(data, f"invoke:{FN}")
    agent = start_agent(data, "--auth", "token", "--worker-user", "root")
    try:
        assert agent.invoke(FN, b"x", bearer(token)).status == 200
    finally:
        agent.stop()
    damage(data / "tokens.json", how)

    agent = start_agent(data, "--auth", "token", "--worker-user", "root")
    try:
        # Fail closed: the token that was valid is refused, and so is no token at all.
        refused = agent.invoke(FN, b"x", bearer(token))
        assert refused.status == 401, refused.body
        assert refused.json()["error"]["code"] == "unauthorized"
        assert agent.invoke(FN, b"x").status == 401
        assert not (data / "tokens.json").exists()
        assert list(data.glob("tokens.json.corrupt-*"))
        log = agent.log_text()
        assert "token store tokens.json was damaged: set aside as tokens.json.corrupt-" in log
        assert "starting with no tokens; every call that needs a token is refused (401)" in log
        assert "Traceback" not in log
        # The store is usable again: a token made now is picked up by the reload (bounded).
        fresh = create_token(data, f"invoke:{FN}")
        deadline = time.monotonic() + 30
        while agent.invoke(FN, b"x", bearer(fresh)).status != 200:
            assert time.monotonic() < deadline, agent.log_text()
            time.sleep(0.1)
        assert agent.invoke(FN, b"x", bearer(token)).status == 401
    finally:
        agent.stop()


def state_call(agent: AgentProcess, *calls: dict[str, str]) -> list[dict[str, object]]:
    resp = agent.invoke("keeper", blocks(*calls), {"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    return list(resp.json()["results"])


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_state_sync_state_tokens_and_agent_file(tmp_path: Path, how: str) -> None:
    plat = start_platform(tmp_path / "plat")
    agents: list[AgentProcess] = []
    try:
        creds = enrol(plat, f"edge-dmg2-{how}", tmp_path)
        data = tmp_path / "agent"
        make_fn(data, "keeper", permissions="state = { max_bytes = 4096 }")
        create_token(data, f"invoke:{FN}")  # a token store exists, though auth is off
        agent = run_agent(agents, data, creds)
        assert state_call(agent, {"op": "state.set", "target": "k", "payload": "v"}) == [
            {"value": ""}
        ]
        wait_for(lambda: (data / "sync-state.json").exists(), "the sync state to be written")
        agent.stop()
        for name in ("state.db", "sync-state.json", "tokens.json", "agent.json"):
            if name == "agent.json" and not (data / name).exists():
                (data / name).write_text('{"url": "http://127.0.0.1:1"}')  # removed at stop
            damage(data / name, how)
        for side in ("-wal", "-shm"):
            Path(f"{data / 'state.db'}{side}").unlink(missing_ok=True)

        agent = run_agent(agents, data, creds)
        assert agent.invoke(FN, b"after").status == 200  # serves
        # The state store was set aside and recreated: empty, and writable again.
        assert state_call(agent, {"op": "state.get", "target": "k"}) == [{"missing": True}]
        assert state_call(agent, {"op": "state.set", "target": "k", "payload": "w"}) == [
            {"value": ""}
        ]
        for name in ("state.db", "sync-state.json", "tokens.json"):
            assert list(data.glob(f"{name}.corrupt-*")), name
        # The agent's own file is written afresh at start (nothing reads it there).
        assert json.loads((data / "agent.json").read_text())["url"] == agent.url
        # The next sync-state write is clean.
        wait_for(
            lambda: (
                (data / "sync-state.json").exists()
                and isinstance(json.loads((data / "sync-state.json").read_bytes()), dict)
            ),
            "a clean sync-state.json",
        )
        log = agent.log_text()
        assert "function state state.db was damaged (" in log
        assert "set aside as state.db.corrupt-" in log
        assert "sync: sync-state.json was damaged (" in log
        assert "set aside as sync-state.json.corrupt-" in log
        assert "token store tokens.json was damaged: set aside as tokens.json.corrupt-" in log
        assert "Traceback" not in log
    finally:
        for a in agents:
            a.stop()
        plat.stop()

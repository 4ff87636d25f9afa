"""No file takes the agent down (issue 11 item 4): every file the agent keeps is damaged, then a
real agent process starts on them. It serves what it can and says what it set aside.

Files: the outbox (set aside, recreated, and an `outbox_recovered` event reaches the platform),
the result cache (set aside, rebuilt), the sync state (set aside), a trusted key
(set aside, the other keys still trusted) and an installed function's active pointer (that
function is reported with the reason, the others load). The token store, the function state
and agent.json: tests/test_damaged_files_more.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.harness import AgentProcess
from tests.test_sync_e2e import FN, Platform, enrol, run_agent, start_platform, wait_for

pytestmark = pytest.mark.slow


def platform_events(plat: Platform, device: str) -> list[dict[str, object]]:
    conn = sqlite3.connect(f"file:{plat.data_dir / 'fleet.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT payload FROM records WHERE device = ? AND kind = 'events'", (device,)
        ).fetchall()
    finally:
        conn.close()
    return [json.loads(r[0]) for r in rows]


def test_every_damaged_file_is_set_aside_and_the_agent_serves(tmp_path: Path) -> None:
    plat = start_platform(tmp_path / "plat")
    agents: list[AgentProcess] = []
    try:
        creds = enrol(plat, "edge-dmg", tmp_path)
        data = tmp_path / "agent"
        agent = run_agent(agents, data, creds)
        assert agent.invoke(FN, b"before").status == 200
        agent.stop()
        # Damage every file the agent keeps.
        (data / "outbox.db").write_bytes(os.urandom(8192))
        for side in ("-wal", "-shm"):
            Path(f"{data / 'outbox.db'}{side}").unlink(missing_ok=True)
        (data / "cache.db").write_bytes(b"\0garbage" * 512)
        (data / "sync-state.json").write_bytes(os.urandom(300))
        (data / "trust").mkdir(exist_ok=True)
        (data / "trust" / "deadbeef.pub").write_bytes(os.urandom(100))
        broken = data / "functions" / "broken"
        broken.mkdir(parents=True)
        (broken / "active").write_bytes(b"\xff\xfe../../etc")

        agent = run_agent(agents, data, creds)
        assert agent.invoke(FN, b"after").status == 200  # serves
        fns = {f["name"]: f for f in agent.get("/v1/functions").json()["functions"]}
        assert "damaged active-version pointer" in fns["broken"]["error"]
        assert list(data.glob("outbox.db.corrupt-*"))
        assert list(data.glob("cache.db.corrupt-*"))
        assert not list((data / "trust").glob("*.pub"))
        assert list((data / "trust").glob("deadbeef.pub.corrupt-*"))
        log = agent.log_text()
        assert "outbox" in log and "set aside as outbox.db.corrupt-" in log
        assert "deadbeef.pub is not a valid key" in log
        assert "Traceback" not in log
        # The recovery is reported to the platform once the link is up.
        wait_for(
            lambda: any(
                e.get("type") == "outbox_recovered" for e in platform_events(plat, "edge-dmg")
            ),
            "the outbox_recovered event at the platform",
        )
    finally:
        for a in agents:
            a.stop()
        plat.stop()

"""The result cache through the real agent: hit/miss/stale/bypass, purge, invalidation, damage."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import AgentProcess, start_agent, write_manifest

# Answers with a per-process counter so every real execution is visible; fails while the flag
# file exists.
COUNTER_JS = """
const fs = require('fs');
let n = 0;
exports.handler = async (event, context) => {
  if (fs.existsSync(process.env.EDGEFN_FUNCTION_DIR + '/fail')) throw new Error('upstream down');
  n += 1;
  return `run ${n}`;
};
"""


def counter_fn(data: Path, version: str = "1.0.0", **cache: object) -> Path:
    d = data / "functions" / "counter"
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.js").write_text(COUNTER_JS)
    table = {"enabled": True, "ttl_s": 60, **cache}
    write_manifest(
        d, name="counter", version=version, runtime="node", entry="index.js", cache=table
    )
    return d


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    data = tmp_path / "data"
    counter_fn(data, stale_if_error_s=60, ttl_s=0.5)
    proc = start_agent(data)
    yield proc
    proc.stop()


def wait_written(agent: AgentProcess, writes: int) -> None:
    """Cache writes leave the request path on purpose: wait until the writer committed them."""
    for _ in range(200):  # bounded: up to 10 s
        if agent.get("/v1/health").json()["cache"]["writes"] >= writes:
            return
        time.sleep(0.05)
    raise AssertionError("the cache writer did not commit")


def call(agent: AgentProcess, body: bytes = b"q", **headers: str) -> tuple[str, str, str]:
    resp = agent.invoke("counter", body, {k.replace("_", "-"): v for k, v in headers.items()})
    assert resp.status == 200, resp.body
    return resp.body.decode(), resp.headers["X-Edgefn-Cache"], resp.headers["X-Edgefn-Served-By"]


def test_miss_then_hit_and_the_body_is_part_of_the_key(agent: AgentProcess) -> None:
    assert call(agent) == ("run 1", "miss", "local")
    wait_written(agent, 1)
    assert call(agent) == ("run 1", "hit", "cache")
    assert call(agent, b"other") == ("run 2", "miss", "local")


def test_no_cache_header_bypasses(agent: AgentProcess) -> None:
    call(agent)
    assert call(agent, Cache_Control="no-cache") == ("run 2", "bypass", "local")


def test_errors_are_never_cached_and_stale_is_served_on_error(agent: AgentProcess) -> None:
    fn_dir = agent.data_dir / "functions" / "counter"
    assert call(agent)[0] == "run 1"
    wait_written(agent, 1)
    time.sleep(0.7)  # past ttl_s = 0.5, inside stale_if_error_s = 60
    (fn_dir / "fail").write_text("x")
    assert call(agent) == ("run 1", "stale", "cache")
    # A request with no cached entry gets the function's error, and it is not cached.
    failed = agent.invoke("counter", b"new")
    assert failed.status == 500
    assert failed.json()["error"]["code"] == "function_error"
    (fn_dir / "fail").unlink()
    assert call(agent, b"new") == ("run 2", "miss", "local")


def test_purge_by_api_and_cli(agent: AgentProcess) -> None:
    call(agent)
    resp = agent.invoke("counter", b"")  # another key, cached too
    assert resp.status == 200
    wait_written(agent, 2)
    purge = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "cache",
            "purge",
            "counter",
            "--data-dir",
            str(agent.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert purge.returncode == 0, purge.stderr
    assert "purged 2 cached results of counter" in purge.stdout
    assert call(agent)[1] == "miss"
    wait_written(agent, 3)
    api = agent.get("/v1/functions")  # still serving
    assert api.status == 200
    from tests.harness import http

    deleted = http("DELETE", f"{agent.url}/v1/cache/counter")
    assert deleted.json() == {"function": "counter", "purged": 1}


def test_new_version_invalidates_its_entries(agent: AgentProcess) -> None:
    call(agent)
    wait_written(agent, 1)
    assert call(agent)[1] == "hit"
    counter_fn(agent.data_dir, version="1.1.0", stale_if_error_s=60, ttl_s=0.5)
    for _ in range(100):  # bounded: the scanner swaps within a few 0.2 s scans
        resp = agent.invoke("counter", b"probe", {"Cache-Control": "no-cache"})
        if resp.headers.get("X-Edgefn-Version") == "1.1.0":
            break
        time.sleep(0.05)
    assert call(agent)[1] == "miss"


def test_cache_file_deleted_while_running_keeps_serving(agent: AgentProcess) -> None:
    call(agent)
    db = agent.data_dir / "cache.db"
    assert db.exists()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    # Every request still gets a correct answer while the cache notices and rebuilds, and
    # once it has rebuilt, answers are cached again.
    for i in range(100):  # bounded: 100 x 0.1 s; the cache checks its file every 2 s
        body, _, _ = call(agent, f"during {i}".encode())
        assert body.startswith("run ")
        if agent.get("/v1/health").json()["cache"]["recoveries"] >= 1:
            break
        time.sleep(0.1)
    stats = agent.get("/v1/health").json()["cache"]
    assert stats["recoveries"] >= 1
    assert db.exists()
    assert call(agent, b"after")[1] == "miss"
    wait_written(agent, stats["writes"] + 1)
    assert call(agent, b"after")[1] == "hit"


def test_corrupt_cache_file_at_start_is_set_aside(tmp_path: Path) -> None:
    data = tmp_path / "data"
    counter_fn(data)
    data.joinpath("cache.db").write_bytes(b"this is not a database" * 100)
    agent = start_agent(data)
    try:
        assert call(agent)[1] == "miss"
        wait_written(agent, 1)
        assert call(agent)[1] == "hit"
        assert list(data.glob("cache.db.corrupt-*"))
    finally:
        agent.stop()


def test_bad_cache_table_is_a_load_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    counter_fn(data, ttl_s="soon")
    agent = start_agent(data)
    try:
        fns = {f["name"]: f for f in agent.get("/v1/functions").json()["functions"]}
        assert "ttl_s" in fns["counter"]["error"]
    finally:
        agent.stop()

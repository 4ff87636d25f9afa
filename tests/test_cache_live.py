"""Cache behaviours added with the in-memory hot layer and live resizing, on real SQLite files."""

from __future__ import annotations

from pathlib import Path

from cloud_sync.state import validate_config
from edge_agent.agent import Agent
from edge_agent.cache import ResultCache
from edge_agent.cache_policy import parse_cache_policy
from edge_agent.settings import Settings
from runtimes.sandbox import Sandbox

POLICY = parse_cache_policy({"enabled": True, "ttl_s": 600})


async def test_a_replaced_value_is_seen_after_the_hot_layer_held_the_old_one(
    tmp_path: Path,
) -> None:
    cache = await ResultCache.open(tmp_path / "c.db")
    try:
        key = POLICY.key_for("fn", "1", b"q")
        cache.put(key, b"old", "text/plain", 600, 0)
        await cache.flush()
        first = await cache.get(key)
        assert first is not None and first.value == b"old"  # now in the hot layer too
        cache.put(key, b"new", "text/plain", 600, 0)
        await cache.flush()
        again = await cache.get(key)
        assert again is not None and again.value == b"new"
    finally:
        await cache.close()


async def test_purge_and_invalidate_leave_no_hit_behind(tmp_path: Path) -> None:
    cache = await ResultCache.open(tmp_path / "c.db")
    try:
        k1 = POLICY.key_for("fn", "1", b"a")
        k2 = POLICY.key_for("other", "1", b"a")
        for key in (k1, k2):
            cache.put(key, b"v", "text/plain", 600, 0)
        await cache.flush()
        assert await cache.get(k1) is not None and await cache.get(k2) is not None
        assert await cache.purge("fn") == 1
        assert await cache.get(k1) is None
        assert await cache.invalidate_function("other", keep_version="2") == 1
        assert await cache.get(k2) is None
    finally:
        await cache.close()


async def test_lowering_the_bound_evicts_at_once(tmp_path: Path) -> None:
    cache = await ResultCache.open(tmp_path / "c.db", max_bytes=1 << 20)
    try:
        for i in range(50):  # bounded: 50 entries of ~2 KiB
            cache.put(POLICY.key_for("fn", "1", str(i).encode()), b"x" * 2000, "t", 600, 0)
        await cache.flush()
        assert cache.stats()["bytes"] > 64 * 1024
        await cache.set_max_bytes(16 * 1024)
        stats = cache.stats()
        assert stats["max_bytes"] == 16 * 1024
        assert 0 < stats["bytes"] <= 16 * 1024
        assert stats["evictions"] > 0
    finally:
        await cache.close()


async def test_desired_config_resizes_the_cache_live(tmp_path: Path) -> None:
    agent = Agent(Settings(data_dir=tmp_path / "d", port=0, cache_max_bytes=1 << 20))
    parts = await agent.open(sandbox=Sandbox())  # stores and parts, no HTTP site
    try:
        assert agent.router.cache is parts.cache  # built with it, not plugged in afterwards
        await agent._apply_config(validate_config({"cache": {"max_bytes": 65536}}))
        assert parts.cache.max_bytes == 65536
        assert agent.health()["cache"]["max_bytes"] == 65536
        # Dropping the setting goes back to the device's own bound.
        await agent._apply_config(validate_config({}))
        assert parts.cache.max_bytes == agent.settings.cache_max_bytes
    finally:
        await agent.stop()

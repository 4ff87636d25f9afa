"""The result cache on real SQLite files: hits, expiry, stale-if-error, LRU bound, purge,
version invalidation, errors never cached, persistence, concurrency.

Time is a `Clock` the test moves; nothing sleeps to wait for expiry.
"""

from __future__ import annotations

import asyncio
import glob
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent.cache import CacheEntry, ResultCache
from edge_agent.cache_policy import CacheKey, CachePolicy
from runtimes.errors import FunctionError, ManifestError, WorkerCrashed
from runtimes.invocation import Result

POLICY = CachePolicy(enabled=True, ttl_s=10, stale_if_error_s=100)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cache(tmp_path: Path, clock: Clock) -> AsyncIterator[ResultCache]:
    c = await ResultCache.open(tmp_path / "cache.db", clock=clock)
    assert c.stats()["state"] == "ok"
    yield c
    await c.close()


def key(body: bytes, function: str = "fn", version: str = "1.0.0", **kw: object) -> CacheKey:
    policy = CachePolicy(enabled=True, ttl_s=10, **kw)  # type: ignore[arg-type]
    return policy.key_for(function, version, body)


def rows(path: Path) -> list[tuple[str, str, int]]:
    """What is really in the file, read with a separate connection."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT key, scope, size FROM entries ORDER BY key").fetchall()


async def test_miss_put_hit_then_expiry(cache: ResultCache, clock: Clock) -> None:
    k = key(b"a")
    assert await cache.get(k) is None
    assert cache.put(k, b"result", "text/plain", ttl_s=10)
    await cache.flush()
    entry = await cache.get(k)
    assert isinstance(entry, CacheEntry)
    assert (entry.value, entry.content_type, entry.status) == (b"result", "text/plain", "fresh")
    assert entry.expires == clock.now + 10
    clock.now += 4
    assert (await cache.get(k)).age_s == 4  # type: ignore[union-attr]
    clock.now += 6  # exactly at expiry: no longer fresh
    assert await cache.get(k) is None
    assert await cache.get(key(b"other")) is None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["writes"], s["entries"]) == (2, 3, 1, 1)


async def test_stale_entries_only_when_asked_and_only_within_the_window(
    cache: ResultCache, clock: Clock
) -> None:
    k = key(b"a")
    cache.put(k, b"old", "text/plain", ttl_s=10, stale_if_error_s=100)
    await cache.flush()
    clock.now += 50
    assert await cache.get(k) is None
    entry = await cache.get(k, allow_stale=True)
    assert entry is not None and (entry.value, entry.status) == (b"old", "stale")
    clock.now += 60  # 110 s after the put: past expires + stale_if_error_s
    assert await cache.get(k, allow_stale=True) is None
    # Without a stale window an expired entry is gone for good.
    k0 = key(b"b")
    cache.put(k0, b"x", "text/plain", ttl_s=10)
    await cache.flush()
    clock.now += 11
    assert await cache.get(k0, allow_stale=True) is None
    assert cache.stats()["stale_hits"] == 1


async def test_replacing_an_entry_keeps_byte_accounting_exact(
    cache: ResultCache, tmp_path: Path
) -> None:
    k = key(b"a")
    cache.put(k, b"x" * 1000, "a/b", ttl_s=10)
    cache.put(k, b"y" * 10, "a/b", ttl_s=10)
    await cache.flush()
    entry = await cache.get(k)
    assert entry is not None and entry.value == b"y" * 10
    [(_, _, size)] = rows(tmp_path / "cache.db")
    assert cache.stats()["bytes"] == size and cache.stats()["entries"] == 1


async def test_put_validates_and_refuses_what_is_not_a_successful_payload(
    cache: ResultCache,
) -> None:
    k = key(b"a")
    with pytest.raises(TypeError, match="successful"):
        cache.put(k, FunctionError("boom"), "text/plain", ttl_s=10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cache.put(k, "text", "text/plain", ttl_s=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.put(k, b"x", "text/plain", ttl_s=0)
    with pytest.raises(ValueError):
        cache.put(k, b"x", "text/plain", ttl_s=1, stale_if_error_s=float("inf"))
    assert cache.put(k, bytearray(b"ok"), "text/plain", ttl_s=1)
    await cache.flush()
    assert cache.stats()["writes"] == 1


async def test_an_entry_larger_than_its_share_is_not_stored(tmp_path: Path) -> None:
    async with await ResultCache.open(tmp_path / "c.db", max_bytes=64 * 1024) as c:
        assert c.max_entry_bytes == 8 * 1024
        assert not c.put(key(b"a"), b"x" * 9000, "a/b", ttl_s=10)
        assert c.put(key(b"b"), b"x" * 4000, "a/b", ttl_s=10)
        await c.flush()
        assert (c.stats()["dropped"], c.stats()["entries"]) == (1, 1)


async def test_lru_eviction_keeps_the_file_under_the_bound(tmp_path: Path, clock: Clock) -> None:
    bound = 64 * 1024
    path = tmp_path / "lru.db"
    async with await ResultCache.open(path, max_bytes=bound, clock=clock) as c:
        hot = key(b"hot")
        c.put(hot, b"h" * 1000, "a/b", ttl_s=3600)
        await c.flush()  # a put is visible once the writer committed it
        first = [key(str(i).encode()) for i in range(10)]
        for i in range(400):  # ~6x the bound in total
            clock.now += 1
            c.put(key(str(i).encode()), b"v" * 1000, "a/b", ttl_s=3600)
            assert await c.get(hot) is not None  # keeps `hot` recently used
            if i % 25 == 24:
                await c.flush()
                assert c.stats()["bytes"] <= bound
                assert sum(size for _, _, size in rows(path)) == c.stats()["bytes"]
        await c.flush()
        s = c.stats()
        assert s["evictions"] > 300 and s["bytes"] <= bound
        assert await c.get(hot) is not None
        assert all([await c.get(k) is None for k in first])  # the oldest went first
        assert await c.get(key(b"399")) is not None


async def test_entries_past_their_stale_window_are_evicted_first(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "dead.db"
    async with await ResultCache.open(path, max_bytes=32 * 1024, clock=clock) as c:
        c.put(key(b"old-but-fresh"), b"d" * 1000, "a/b", ttl_s=3600)  # least recently used
        for i in range(10):  # ~12 KB of newer entries that will be past their window
            clock.now += 1
            c.put(key(b"dead-%d" % i), b"d" * 1000, "a/b", ttl_s=1)
        clock.now += 5
        for i in range(17):  # pushes the total just past the bound
            clock.now += 1
            c.put(key(str(i).encode()), b"v" * 1000, "a/b", ttl_s=3600)
        await c.flush()
        # Removing the dead ones was enough: the least recently used live entry survived.
        assert (c.stats()["expired"], c.stats()["evictions"]) == (10, 0)
        assert await c.get(key(b"old-but-fresh")) is not None


async def test_purge_deletes_one_function_only(cache: ResultCache, tmp_path: Path) -> None:
    for i in range(5):
        cache.put(key(b"%d" % i, "alpha"), b"a", "a/b", ttl_s=10)
        cache.put(key(b"%d" % i, "alpha", "2.0.0"), b"a", "a/b", ttl_s=10)
    cache.put(key(b"0", "beta"), b"b", "a/b", ttl_s=10)
    assert await cache.purge("alpha") == 10  # queued puts are applied before the purge
    assert await cache.get(key(b"0", "alpha")) is None
    assert await cache.get(key(b"0", "beta")) is not None
    assert [r[0].split("/")[0] for r in rows(tmp_path / "cache.db")] == ["beta"]
    assert cache.stats()["entries"] == 1
    assert await cache.purge("nothing-here") == 0


async def test_puts_and_purges_apply_in_queue_order(cache: ResultCache) -> None:
    before, after = key(b"before"), key(b"after")
    cache.put(before, b"1", "a/b", ttl_s=10)
    purge = asyncio.ensure_future(cache.purge("fn"))
    await asyncio.sleep(0)  # the purge is queued when its coroutine starts
    cache.put(after, b"2", "a/b", ttl_s=10)
    assert await purge == 1
    await cache.flush()
    assert await cache.get(before) is None
    assert await cache.get(after) is not None


async def test_version_switch_invalidates_other_versions(
    cache: ResultCache, tmp_path: Path
) -> None:
    v1, v2 = key(b"a", version="1.0.0"), key(b"a", version="2.0.0")
    cache.put(v1, b"one", "a/b", ttl_s=10)
    cache.put(v2, b"two", "a/b", ttl_s=10)
    cache.put(key(b"a", "other", "1.0.0"), b"x", "a/b", ttl_s=10)
    assert await cache.invalidate_function("fn", keep_version="2.0.0") == 1
    assert await cache.get(v1) is None
    assert (await cache.get(v2)).value == b"two"  # type: ignore[union-attr]
    assert await cache.get(key(b"a", "other", "1.0.0")) is not None
    # A request that started on 1.0.0 and finishes after the switch does not store its result.
    cache.put(key(b"late", version="1.0.0"), b"late", "a/b", ttl_s=10)
    await cache.flush()
    assert await cache.get(key(b"late", version="1.0.0")) is None
    assert sorted(r[1] for r in rows(tmp_path / "cache.db")) == ["v=1.0.0", "v=2.0.0"]


async def test_an_epoch_keeps_entries_across_versions_while_it_matches(cache: ResultCache) -> None:
    p1 = CachePolicy(enabled=True, ttl_s=10, epoch="e1")
    k = p1.key_for("fn", "1.0.0", b"a")
    cache.put(k, b"shared", "a/b", ttl_s=10)
    cache.put(key(b"a", version="1.0.0"), b"versioned", "a/b", ttl_s=10)
    # 2.0.0 declares the same epoch: its key is the same, the entry survives the switch.
    assert await cache.invalidate_function("fn", keep_version="2.0.0", keep_epoch="e1") == 1
    k2 = p1.key_for("fn", "2.0.0", b"a")
    assert k2 == k and (await cache.get(k2)).value == b"shared"  # type: ignore[union-attr]
    # 3.0.0 declares a new epoch: the old epoch's entries go.
    assert await cache.invalidate_function("fn", keep_version="3.0.0", keep_epoch="e2") == 1
    assert await cache.get(k) is None
    # 4.0.0 declares no epoch at all: epoch entries go too.
    cache.put(CachePolicy(enabled=True, ttl_s=1, epoch="e2").key_for("fn", "3.0.0"), b"", "", 9)
    await cache.flush()
    assert cache.stats()["entries"] == 1
    assert await cache.invalidate_function("fn", keep_version="4.0.0") == 1


async def test_run_cached_caches_success_and_never_errors(cache: ResultCache) -> None:
    calls: list[str] = []
    outcome: list[BaseException | Result] = [FunctionError("bad input")]

    async def run() -> Result:
        calls.append("run")
        o = outcome[0]
        if isinstance(o, BaseException):
            raise o
        return o

    k = key(b"req")
    for _ in range(2):  # an error: propagated unchanged each time, nothing stored
        with pytest.raises(FunctionError, match="bad input"):
            await cache.run_cached(k, POLICY, run)
    await cache.flush()
    assert len(calls) == 2 and cache.stats()["writes"] == 0 and cache.stats()["entries"] == 0

    outcome[0] = Result(b"good", "application/json")
    first = await cache.run_cached(k, POLICY, run)
    assert (first.status, first.result.payload) == ("miss", b"good")
    await cache.flush()
    second = await cache.run_cached(k, POLICY, run)
    assert (second.status, second.result.payload, second.result.content_type) == (
        "hit",
        b"good",
        "application/json",
    )
    assert len(calls) == 3
    off = await cache.run_cached(k, CachePolicy(), run)
    assert off.status == "bypass" and len(calls) == 4


async def test_run_cached_serves_stale_only_for_runtime_failures_within_the_window(
    cache: ResultCache, clock: Clock
) -> None:
    k = key(b"req")
    ok = Result(b"v1", "text/plain")

    async def succeed() -> Result:
        return ok

    async def crash() -> Result:
        raise WorkerCrashed("worker died")

    async def bug() -> Result:
        raise KeyError("not a runtime error")

    assert (await cache.run_cached(k, POLICY, succeed)).status == "miss"
    await cache.flush()
    assert (await cache.run_cached(k, POLICY, crash)).status == "hit"  # crash never ran
    clock.now += 30  # expired (ttl 10), within stale_if_error_s (100)
    stale = await cache.run_cached(k, POLICY, crash)
    assert (stale.status, stale.result.payload, stale.age_s) == ("stale", b"v1", 30)
    with pytest.raises(KeyError):
        await cache.run_cached(k, POLICY, bug)
    no_window = CachePolicy(enabled=True, ttl_s=10, stale_if_error_s=0)
    with pytest.raises(WorkerCrashed):
        await cache.run_cached(k, no_window, crash)
    clock.now += 100  # past the window
    with pytest.raises(WorkerCrashed):
        await cache.run_cached(k, POLICY, crash)
    assert cache.stats()["stale_hits"] == 1


async def test_close_writes_everything_queued_and_data_survives_reopen(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "persist.db"
    c = await ResultCache.open(path, clock=clock)
    keys = [key(b"%d" % i) for i in range(300)]
    c.put(keys[5], b"value-5", "text/plain", ttl_s=60)
    await c.flush()
    clock.now += 7
    assert await c.get(keys[5]) is not None  # a hit: its LRU time is written later, in a batch
    for i, k in enumerate(keys):
        assert c.put(k, b"value-%d" % i, "text/plain", ttl_s=60)
    await c.close()  # no flush before: close must drain the queue and the pending touches
    await c.close()  # idempotent
    assert not c.put(keys[0], b"after close", "text/plain", ttl_s=60)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone() == (300,)
    db.close()
    async with await ResultCache.open(path, clock=clock) as again:
        assert again.stats()["entries"] == 300
        for i, k in enumerate(keys):
            entry = await again.get(k)
            assert entry is not None and entry.value == b"value-%d" % i
    assert not any(n.endswith("-wal") for n in os.listdir(tmp_path))  # clean close


async def test_lru_touches_are_batched_and_written_on_close(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "touch.db"
    c = await ResultCache.open(path, clock=clock)
    k = key(b"t")
    c.put(k, b"v", "text/plain", ttl_s=60)
    await c.flush()
    clock.now += 7
    assert await c.get(k) is not None
    assert await c.get(k) is not None
    await c.close()
    with sqlite3.connect(path) as db:
        last = db.execute("SELECT created, last_access FROM entries").fetchone()
    db.close()
    assert last == (clock.now - 7, clock.now)


async def test_many_tasks_share_one_cache(cache: ResultCache) -> None:
    async def worker(n: int) -> int:
        hits = 0
        for i in range(25):
            k = key(b"shared-%d" % (i % 10))
            if await cache.get(k) is not None:
                hits += 1
            else:
                cache.put(k, b"v%d" % (i % 10), "a/b", ttl_s=60)
            cache.put(key(b"own-%d-%d" % (n, i)), b"x" * 100, "a/b", ttl_s=60)
            await asyncio.sleep(0)
        return hits

    # The shared keys exist before the tasks start: hits then never depend on how soon the
    # writer thread commits the tasks' own puts (under load it may not within the test).
    for i in range(10):
        cache.put(key(b"shared-%d" % i), b"v%d" % i, "a/b", ttl_s=60)
    await cache.flush()
    hits = await asyncio.gather(*(worker(n) for n in range(100)))
    await cache.flush()
    s = cache.stats()
    assert s["errors"] == 0 and s["dropped"] == 0
    assert s["entries"] == 10 + 100 * 25
    assert s["hits"] == sum(hits) > 0
    for n in (0, 57, 99):
        assert await cache.get(key(b"own-%d-24" % n)) is not None


async def test_schema_is_versioned_and_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "schema.db"
    async with await ResultCache.open(path) as c:
        c.put(key(b"a"), b"x", "a/b", ttl_s=60)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    async with await ResultCache.open(path) as c:
        assert c.stats()["entries"] == 1 and c.stats()["recoveries"] == 0


async def test_a_schema_from_a_newer_agent_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    async with await ResultCache.open(path) as c:
        c.put(key(b"a"), b"x", "a/b", ttl_s=60)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    async with await ResultCache.open(path) as c:
        s = c.stats()
        assert s["state"] == "ok" and s["entries"] == 0 and "newer" in s["last_recovery"]
        assert len(glob.glob(f"{tmp_path}/newer.db.corrupt-*")) == 1


def test_error_classes_are_not_results() -> None:
    # The API-level guarantee in one line: what the router gets from a failed run is an
    # exception, and the cache's put only takes bytes.
    assert not isinstance(ManifestError("x"), bytes | bytearray | memoryview)


async def test_a_file_made_by_sqlite_utils_opens_unchanged(tmp_path: Path, clock: Clock) -> None:
    """Agents before the plain-SQL schema created the file with sqlite-utils: same tables,
    same indexes, same version, so such a file opens with its entries and nothing is rebuilt."""
    import sqlite_utils  # the test may use it; the agent does not (next test)

    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    db.conn.execute("PRAGMA journal_mode=WAL")
    db.table("schema_version").create({"id": int, "version": int}, pk="id")
    db.conn.execute("INSERT INTO schema_version (id, version) VALUES (1, 1)")
    entries = db.table("entries")
    columns = {"key": str, "function": str, "scope": str, "value": bytes, "content_type": str}
    times = {"created": float, "expires": float, "stale_until": float}
    entries.create(
        {**columns, **times, "size": int, "last_access": float},
        pk="key",
        not_null=[*list(columns)[1:], *times, "size", "last_access"],  # key: the primary key
    )
    for index in (["last_access"], ["function", "scope"], ["stale_until"]):
        entries.create_index(index)
    k = key(b"old")
    now = clock()
    entries.insert(
        {"key": k.id, "function": k.function, "scope": k.scope, "value": b"kept"}
        | {"content_type": "a/b", "created": now, "expires": now + 60, "stale_until": now + 60}
        | {"size": 100, "last_access": now}
    )
    db.conn.commit()
    db.close()
    made_by_sqlite_utils = _schema_sql(path)
    async with await ResultCache.open(path, clock=clock) as c:
        s = c.stats()
        assert (s["state"], s["entries"], s["recoveries"]) == ("ok", 1, 0)
        hit = await c.get(k)
        assert hit is not None and hit.value == b"kept"
    fresh = tmp_path / "fresh.db"
    async with await ResultCache.open(fresh, clock=clock):
        pass
    assert _schema_sql(fresh) == made_by_sqlite_utils  # the same schema, whoever made it


def _schema_sql(path: Path) -> list[tuple[str, str]]:
    """Table and index definitions, without whitespace and quoting."""
    with sqlite3.connect(path) as db:
        found = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
    db.close()
    return [(n, "".join(s.split()).replace('"', "")) for n, s in found]


def test_the_agent_never_imports_sqlite_utils(tmp_path: Path) -> None:
    """sqlite-utils is the platform's; the agent (and its cache) run on plain sqlite3."""
    code = (
        "import asyncio, sys\n"
        "import edge_agent.agent\n"
        "from edge_agent.cache import ResultCache\n"
        "from cloud_sync.outbox import Outbox\n"
        "async def main():\n"
        "    c = await ResultCache.open(sys.argv[1])\n"
        "    await c.close()\n"
        "    o = await Outbox.open(sys.argv[2])\n"
        "    await o.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('sqlite_utils')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c.db"), str(tmp_path / "o.db")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "c.db").exists() and (tmp_path / "o.db").exists()


async def test_get_and_run_cached_judge_and_count_through_one_path(
    cache: ResultCache, clock: Clock
) -> None:
    k = key(b"count")

    async def succeed() -> Result:
        return Result(b"v", "text/plain")

    async def crash() -> Result:
        raise WorkerCrashed("worker died")

    assert await cache.get(k) is None  # miss 1
    assert (await cache.run_cached(k, POLICY, succeed)).status == "miss"  # miss 2, stored
    await cache.flush()
    fresh = await cache.get(k)  # hit 1
    assert fresh is not None and fresh.status == "fresh"
    assert (await cache.run_cached(k, POLICY, crash)).status == "hit"  # hit 2
    clock.now += 30  # expired, within the stale window
    assert await cache.get(k) is None  # miss 3: stale only when asked
    stale = await cache.get(k, allow_stale=True)  # stale hit 1
    assert stale is not None and (stale.status, stale.age_s) == ("stale", 30)
    assert (await cache.run_cached(k, POLICY, crash)).status == "stale"  # miss 4, stale hit 2
    clock.now += 100  # past the window: dead
    with pytest.raises(WorkerCrashed):
        await cache.run_cached(k, POLICY, crash)  # miss 5, and only one
    s = cache.stats()
    assert (s["hits"], s["misses"], s["stale_hits"]) == (2, 5, 2)

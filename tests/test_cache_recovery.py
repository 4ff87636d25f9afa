"""A broken cache file never becomes the caller's problem: it is detected, set aside and rebuilt,
and until then the cache is "degraded" (every get misses, puts drop) instead of raising."""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - imported before the fork (see _run_unprivileged)
import json
import os
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from edge_agent.cache import ResultCache
from edge_agent.cache_policy import CacheKey, CachePolicy

POLICY = CachePolicy(enabled=True, ttl_s=60)
# Bound for every wait on the writer thread; the waits end as soon as the condition holds.
WAIT_S = 10.0


def key(i: int | str) -> CacheKey:
    return POLICY.key_for("fn", "1.0.0", str(i).encode())


async def fill(c: ResultCache, n: int, size: int = 1000) -> None:
    for i in range(n):
        assert c.put(key(i), b"v" * size, "a/b", ttl_s=60)
    await c.flush()


async def works(c: ResultCache) -> bool:
    """The cache stores and answers again."""
    probe = key(f"probe-{time.monotonic_ns()}")
    c.put(probe, b"probe", "a/b", ttl_s=60)
    await c.flush()
    entry = await c.get(probe)
    return entry is not None and entry.value == b"probe"


async def wait_for(cond: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def set_aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


async def test_garbage_file_at_open_is_set_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    garbage = os.urandom(16 * 1024)
    path.write_bytes(garbage)
    async with await ResultCache.open(path) as c:
        s = c.stats()
        assert s["state"] == "ok" and s["recoveries"] == 1, s
        assert "set aside as cache.db.corrupt-" in s["last_recovery"], s
        assert await works(c)
    [main] = set_aside(path)
    assert main.read_bytes() == garbage  # kept for a post-mortem, untouched


async def test_only_the_newest_set_aside_copies_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    for i in range(4):
        path.write_bytes(b"%d" % i * 8192)
        async with await ResultCache.open(path) as c:
            assert c.stats()["recoveries"] == 1
    kept = set_aside(path)
    assert len(kept) == 2  # a disk that keeps corrupting the file does not fill up with copies
    assert sorted(p.read_bytes()[:1] for p in kept) == [b"2", b"3"]


async def test_truncated_file_at_open_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    async with await ResultCache.open(path) as c:
        await fill(c, 300)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    async with await ResultCache.open(path) as c:
        s = c.stats()
        assert s["state"] == "ok" and s["recoveries"] == 1 and s["entries"] == 0, s
        assert await works(c)
    assert len(set_aside(path)) == 1


async def test_corruption_found_by_a_read_degrades_then_rebuilds(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    async with await ResultCache.open(path) as c:
        await fill(c, 300)
    # Reopen so everything is in the main file (no WAL) and the read connection has read
    # nothing yet, then overwrite every page but the first with garbage under its feet.
    async with await ResultCache.open(path) as c:
        with path.open("r+b") as f:
            f.seek(4096)
            f.write(b"\xa5" * (path.stat().st_size - 4096))
        answers = [await c.get(key(i)) for i in range(300)]
        assert all(a is None for a in answers)  # misses, not exceptions
        await wait_for(lambda: c.stats()["recoveries"] >= 1, "the rebuild")
        await wait_for(lambda: c.stats()["state"] == "ok", "state ok")
        s = c.stats()
        assert s["errors"] >= 1 and "read failed" in s["last_recovery"], s
        assert await works(c)
    assert len(set_aside(path)) == 1


async def test_file_deleted_while_running_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    async with await ResultCache.open(path) as c:
        await fill(c, 20)
        for name in os.listdir(tmp_path):
            os.unlink(tmp_path / name)  # an operator's `rm -f cache.db*`
        await c.flush()  # checks the inode at once
        s = c.stats()
        assert s["state"] == "ok" and "deleted" in s["last_recovery"], s
        assert path.exists() and s["entries"] == 0
        assert await c.get(key(1)) is None
        assert await works(c)
    assert set_aside(path) == []  # nothing was wrong with the data, nothing kept


async def test_deletion_is_noticed_without_any_call(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    async with await ResultCache.open(path, check_interval_s=0.05) as c:
        await fill(c, 5)
        path.unlink()  # the main file only: its -wal and -shm stay behind
        await wait_for(lambda: path.exists() and c.stats()["recoveries"] == 1, "the rebuild")
        await wait_for(lambda: c.stats()["state"] == "ok", "state ok")
        assert c.stats()["entries"] == 0 and await c.get(key(1)) is None
        assert await works(c)


async def test_file_replaced_while_running_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    async with await ResultCache.open(path) as c:
        await fill(c, 5)
        other = tmp_path / "other"
        other.write_bytes(b"garbage" * 1000)
        os.replace(other, path)
        await c.flush()
        s = c.stats()
        assert s["state"] == "ok" and "replaced" in s["last_recovery"], s
        assert "set aside" in s["last_recovery"]  # the garbage that took its place
        assert await works(c)


async def test_unusable_directory_degrades_without_raising_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    path = blocker / "cache" / "cache.db"
    c = await ResultCache.open(path, retry_initial_s=0.05, retry_max_s=0.1)
    try:
        s = c.stats()
        assert s["state"] == "degraded" and "cannot create directory" in s["reason"], s
        assert await c.get(key(1)) is None
        assert c.put(key(1), b"x", "a/b", ttl_s=60) is False
        assert await c.purge("fn") == 0
        await c.flush()
        assert c.stats()["dropped"] == 1
        blocker.unlink()  # the operator fixes it; the retry picks it up
        await wait_for(lambda: c.stats()["state"] == "ok", "recovery")
        assert await works(c)
    finally:
        await c.close()


async def test_purge_while_degraded_is_applied_when_the_file_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    async with await ResultCache.open(path) as c:
        await fill(c, 3)
    hidden = tmp_path / "hidden.db"
    os.replace(path, hidden)
    path.mkdir()  # a directory where the file was: cannot be opened, is not set aside
    c = await ResultCache.open(path, retry_initial_s=0.05, retry_max_s=0.1)
    try:
        assert c.stats()["state"] == "degraded"
        assert await c.purge("fn") == 0  # remembered
        path.rmdir()
        os.replace(hidden, path)
        await wait_for(lambda: c.stats()["state"] == "ok", "recovery")
        await c.flush()
        assert c.stats()["entries"] == 0 and await c.get(key(1)) is None
    finally:
        await c.close()


async def _probe(db: str) -> dict[str, object]:
    c = await ResultCache.open(db)
    k = POLICY.key_for("fn", "1.0.0", b"x")
    put = c.put(k, b"v", "a/b", ttl_s=60)
    await c.flush()
    got = await c.get(k)
    out = {**c.stats(), "put": put, "got": None if got is None else got.value.decode()}
    await c.close()
    return out


def _run_unprivileged(db: Path) -> dict[str, object]:
    """Run `_probe` in a forked child that dropped root (root ignores file permissions).

    Forked rather than spawned: the interpreter may live where `nobody` cannot read it, so
    everything the child needs must be imported before (asyncio.to_thread's executor module
    is imported lazily, hence the import at the top).
    """
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            signal.alarm(30)  # bounded: a hung child dies and the parent reads EOF
            os.close(read_fd)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)  # nobody
            out = asyncio.run(_probe(str(db)))
            os.write(write_fd, json.dumps(out).encode())
            code = 0
        except BaseException as exc:
            os.write(write_fd, json.dumps({"child_error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    result: dict[str, object] = json.loads(data)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


@pytest.fixture
def shared_dir() -> object:
    # Not under tmp_path: pytest's base temp dir is private to root, `nobody` cannot enter it.
    d = Path(tempfile.mkdtemp(prefix="edgefn-cache-perm-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX permissions")
def test_permission_denied_directory_is_degraded_not_an_exception(shared_dir: Path) -> None:
    shared_dir.chmod(0o755)  # others may enter, not create
    out = _run_unprivileged(shared_dir / "cache.db")
    assert out["state"] == "degraded" and out["put"] is False and out["got"] is None, out
    assert "cannot open" in str(out["reason"]), out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX permissions")
def test_unreadable_file_is_set_aside_and_rebuilt(shared_dir: Path) -> None:
    shared_dir.chmod(0o777)
    db = shared_dir / "cache.db"
    db.write_bytes(b"")
    db.chmod(0o000 if os.geteuid() != 0 else 0o600)  # root-owned 0600: `nobody` cannot read
    out = _run_unprivileged(db)
    assert out["state"] == "ok" and out["got"] == "v", out
    assert out["recoveries"] == 1 and "set aside" in str(out["last_recovery"]), out
    assert len(set_aside(db)) == 1

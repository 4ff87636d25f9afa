"""The result cache's async face: `ResultCache`, what the router and the API use.

Reads (`get`, the hit half of `run_cached`) run on the loop thread through one path, `_lookup`:
the hot layer, else one primary-key SELECT on the read connection. Writes (`put`, purges,
invalidation, resizing) are queued to the writer thread (`edge_agent.cache.writer`) and return
at once (or await the writer's answer). Callers never see an exception from a broken cache: a
cache is an optimisation, the function can always run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from edge_agent.cache.answers import CachedResult, CacheEntry, Hit
from edge_agent.cache.shared import (
    HOT_MAX_BYTES,
    HOT_SHARE,
    SELECT_ROW,
    Control,
    NewRow,
    Put,
    Shared,
    StoredRow,
)
from edge_agent.cache.writer import CHECK_INTERVAL_S, RETRY_INITIAL_S, RETRY_MAX_S, Writer
from edge_agent.cache_policy import CacheKey, CachePolicy
from runtimes.errors import RuntimeErrorBase
from runtimes.invocation import Result
from runtimes.sqlitedb import is_transient

log = logging.getLogger("edge_agent.cache")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# One entry may use at most this share of the bound (and 1 MiB): a single large result must not
# flush the whole cache, and reading one value on the loop thread stays a short copy.
MAX_ENTRY_SHARE = 8
MAX_ENTRY_BYTES = 1024 * 1024
# Accounted per row on top of value and key: SQLite's record header, cell pointer and the index
# entries (the key is stored twice: table row and primary-key index). An estimate, not exact.
ROW_OVERHEAD = 64
# Results queued for the writer but not yet written; past it `put` drops (counted). Bounds the
# memory a slow or stuck disk can pin.
MAX_PENDING_BYTES = 16 * 1024 * 1024
CLOSE_TIMEOUT_S = 10.0  # how long close() waits for the writer to flush


class ResultCache:
    """Successful function results, keyed by `CacheKey`, bounded in bytes, LRU-evicted.

    Use from one event loop. `open` never fails because of the file: a cache that cannot be
    used starts (and stays, while it retries) "degraded", answering every `get` with None.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        clock: Callable[[], float],
        max_entry_bytes: int | None,
        check_interval_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.max_entry_bytes = (
            max_entry_bytes
            if max_entry_bytes is not None
            else min(MAX_ENTRY_BYTES, max_bytes // MAX_ENTRY_SHARE)
        )
        self._clock = clock
        self._shared = Shared()
        self._shared.hot.max_bytes = min(HOT_MAX_BYTES, max_bytes // HOT_SHARE)
        self._writer = Writer(
            path, self._shared, max_bytes, clock, check_interval_s, retry_initial_s, retry_max_s
        )
        self._closed = False
        # Counters written only on the loop thread.
        self._hits = 0
        self._misses = 0
        self._stale_hits = 0
        self._read_errors = 0
        self._dropped = 0

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        clock: Callable[[], float] = time.time,
        max_entry_bytes: int | None = None,
        check_interval_s: float = CHECK_INTERVAL_S,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> ResultCache:
        """Start the writer thread and wait for its first open attempt (ok or degraded).

        `clock` is wall-clock seconds (entries outlive the process, so not monotonic); tests
        pass their own to move time without sleeping.
        """
        self = cls(
            Path(path),
            max_bytes,
            clock=clock,
            max_entry_bytes=max_entry_bytes,
            check_interval_s=check_interval_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )
        self._writer.thread.start()
        try:
            await asyncio.wrap_future(self._writer.opened)
        except BaseException:
            self._closed = True
            self._writer.q.put(Control("stop"))
            raise
        return self

    async def __aenter__(self) -> ResultCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Write everything queued, then stop the writer and close the file."""
        if self._closed:
            return
        self._closed = True
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._writer.q.put(Control("stop", (), done))
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.wrap_future(done)
        except TimeoutError:
            log.warning("result cache writer did not finish within %.0f s", CLOSE_TIMEOUT_S)
        await asyncio.to_thread(self._writer.thread.join, CLOSE_TIMEOUT_S)

    # -- reads (loop thread) -------------------------------------------------------------------

    def _lookup(self, kid: str) -> Hit | None:
        """The one read path: the live row of key id `kid` and the clock reading it was judged
        by, or None (absent, or past its stale window). Counts nothing; `_get` does.

        First the hot layer (`HotLayer`, a dict lookup), else one primary-key SELECT, directly
        on the calling (loop) thread; a row found by the SELECT enters the hot layer.

        Why the SELECT is not in a thread: the read is a B-tree lookup in pages that are in
        SQLite's or the OS's page cache. Measured on the 2-core dev VM (tests/test_cache_perf.py,
        `-s`): a whole `get` hit through SQLite takes a median of 16-24 us on the loop, while the
        same lookup through `asyncio.to_thread` takes 130-230 us (p99 in milliseconds): the hop
        would cost ten times the read. The worst case on the loop is a page not in memory (one
        cold read from flash, ~0.1-1 ms) or copying one value of at most `max_entry_bytes`. The
        reader never waits on a lock: WAL readers do not block on the writer, and its busy
        timeout is 0 (busy = miss). No mmap: a file truncated under an mmap kills the process
        with SIGBUS.
        """
        shared = self._shared
        with shared.lock:
            conn = shared.reader
            if conn is None:
                return None
            hot = shared.hot
            row = hot.rows.get(kid)
            if row is not None:
                now = self._clock()
                if now >= row.stale_until:
                    hot.drop(kid)  # past its stale window: dead, the writer sweeps the row
                    return None
                hot.rows.move_to_end(kid)
                shared.touches[kid] = now
                return Hit(row, now)
            try:
                found = conn.execute(SELECT_ROW, (kid,)).fetchone()
            except sqlite3.Error as exc:
                self._read_errors += 1
                if not is_transient(exc):
                    # Stop using this connection now; the writer closes it and rebuilds.
                    shared.reader = None
                    shared.retired.append(conn)
                    shared.state = "degraded"
                    shared.reason = f"read failed: {exc}"
                    hot.clear()
                    self._writer.q.put(Control("recover", (f"read failed: {exc}",)))
                return None
            if found is None:
                return None
            value, content_type, created, expires, stale_until = found
            now = self._clock()
            if now >= stale_until:
                return None
            row = StoredRow(
                value, content_type, created, expires, stale_until, Result(value, content_type)
            )
            hot.add(kid, row)
            shared.touches[kid] = now
        return Hit(row, now)

    def _get(self, kid: str, allow_stale: bool) -> Hit | None:
        """`_lookup`, judged and counted: what `get` and `run_cached` both answer from."""
        hit = self._lookup(kid)
        if hit is None or (hit.status == "stale" and not allow_stale):
            self._misses += 1
            return None
        return self._answered(hit)

    def _answered(self, hit: Hit) -> Hit:
        if hit.status == "fresh":
            self._hits += 1
        else:
            self._stale_hits += 1
        return hit

    async def get(self, key: CacheKey, *, allow_stale: bool = False) -> CacheEntry | None:
        """The entry for `key`, or None. A stale entry (past `expires`, within `stale_until`) is
        returned only with `allow_stale=True`: the caller does that after the function failed.

        Async although it does not await today, so the read can move to a thread without
        changing callers.
        """
        hit = self._get(key.id, allow_stale)
        return None if hit is None else hit.entry()

    # -- writes (queued to the writer) ---------------------------------------------------------

    def put(
        self,
        key: CacheKey,
        value: bytes | bytearray | memoryview,
        content_type: str,
        ttl_s: float,
        stale_if_error_s: float = 0.0,
    ) -> bool:
        """Queue a *successful* result; returns at once. True if queued, False if dropped.

        Only bytes are accepted: an error (an exception, an error body) must never be cached, and
        the router only calls this after the function succeeded. The entry becomes visible to
        `get` once the writer commits it (normally within a millisecond; `flush()` waits).
        """
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(
                f"only a successful result's payload (bytes) can be cached, got {type(value)!r}"
            )
        if not isinstance(content_type, str):
            raise TypeError("content_type must be a string")
        for name, v in (("ttl_s", ttl_s), ("stale_if_error_s", stale_if_error_s)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if ttl_s <= 0 or stale_if_error_s < 0:
            raise ValueError(
                f"need ttl_s > 0 and stale_if_error_s >= 0, got {ttl_s}, {stale_if_error_s}"
            )
        kid = key.id
        data = bytes(value)
        size = len(data) + len(content_type) + 2 * len(kid) + ROW_OVERHEAD
        shared = self._shared
        with shared.lock:
            if (
                self._closed
                or shared.state != "ok"
                or size > self.max_entry_bytes
                or shared.pending_bytes + size > MAX_PENDING_BYTES
            ):
                self._dropped += 1
                return False
            shared.pending_bytes += size
        now = self._clock()
        expires = now + ttl_s
        stale_until = expires + stale_if_error_s
        row = NewRow(
            key=kid,
            function=key.function,
            scope=key.scope,
            value=data,
            content_type=content_type,
            created=now,
            expires=expires,
            stale_until=stale_until,
            size=size,
            last_access=now,
        )
        self._writer.q.put(Put(row, size))
        return True

    async def _control(
        self, kind: Literal["purge", "invalidate", "flush", "resize"], *args: Any
    ) -> Any:
        if self._closed:
            raise RuntimeError("the result cache is closed")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._writer.q.put(Control(kind, args, done))
        return await asyncio.wrap_future(done)

    async def purge(self, function: str) -> int:
        """Delete every entry of `function` (all versions and epochs); return how many.

        Writes queued before the call are applied first. While degraded it answers 0 and the
        purge is applied once the file is usable again.
        """
        return int(await self._control("purge", function))

    async def invalidate_function(
        self, function: str, keep_version: str, keep_epoch: str | None = None
    ) -> int:
        """The active version of `function` changed: delete entries of every other version.

        Entries keyed by an epoch survive only if it is `keep_epoch` (the epoch the new version
        declares). Later puts for other versions/epochs are dropped. Returns rows deleted.
        """
        keep = {f"v={keep_version}"}
        if keep_epoch is not None:
            keep.add(f"e={keep_epoch}")
        return int(await self._control("invalidate", function, frozenset(keep)))

    async def set_max_bytes(self, max_bytes: int) -> None:
        """Change the byte bound live (device config); a lower bound evicts at once."""
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(MAX_ENTRY_BYTES, max_bytes // MAX_ENTRY_SHARE)
        with self._shared.lock:
            self._shared.hot.max_bytes = min(HOT_MAX_BYTES, max_bytes // HOT_SHARE)
        await self._control("resize", max_bytes)

    async def flush(self) -> None:
        """Wait until everything queued so far (and the LRU touches) is committed, and check the
        file is still in place. For tests and orderly hand-offs; never needed for correctness."""
        await self._control("flush")

    # -- the router's flow in one call ---------------------------------------------------------

    async def run_cached(
        self,
        key: CacheKey | None,
        policy: CachePolicy,
        run: Callable[[], Awaitable[Result]],
        *,
        stale_on: tuple[type[BaseException], ...] = (RuntimeErrorBase,),
    ) -> CachedResult:
        """Answer from the cache, or run the function and cache its result if it succeeded.

        If `run` raises one of `stale_on` and an entry within its stale-if-error window exists,
        that entry is answered with status "stale" (or "hit", if a concurrent request stored a
        fresh one meanwhile); otherwise the error propagates unchanged.
        Errors are never cached. `key=None` or a disabled policy bypasses the cache.
        """
        if key is None or not policy.enabled:
            return CachedResult(await run(), "bypass")
        # A `Hit`, not a CacheEntry: a hit builds nothing but the shared Result it answers with.
        hit = self._get(key.id, allow_stale=False)
        if hit is not None:
            return CachedResult(hit.row.result, "hit", hit.age_s)
        try:
            result = await run()
        except stale_on:
            if policy.stale_if_error_s > 0:
                # Looked up again now (the miss is already counted): the function may have
                # taken a while, and a stale row is only answered within its window.
                hit = self._lookup(key.id)
                if hit is not None:
                    self._answered(hit)
                    return CachedResult(hit.row.result, hit.cache_status, hit.age_s)
            raise
        self.put(key, result.payload, result.content_type, policy.ttl_s, policy.stale_if_error_s)
        return CachedResult(result, "miss")

    # -- observability -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot for /status and /metrics. Sizes are as of the last commit."""
        w = self._writer
        with self._shared.lock:
            state, reason = self._shared.state, self._shared.reason
            pending = self._shared.pending_bytes
        return {
            "state": state,
            "reason": reason,
            "path": str(self.path),
            "entries": w.entries,
            "bytes": w.bytes,
            "max_bytes": self.max_bytes,
            "pending_bytes": pending,
            "hits": self._hits,
            "misses": self._misses,
            "stale_hits": self._stale_hits,
            "writes": w.writes,
            "writer_busy_s": round(w.busy_s, 6),
            "evictions": w.evictions,
            "expired": w.expired,
            "dropped": self._dropped + w.dropped,
            "errors": self._read_errors + w.errors,
            "recoveries": w.recoveries,
            "last_recovery": w.last_recovery,
        }

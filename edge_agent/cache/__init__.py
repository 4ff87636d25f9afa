"""The result cache: successful function results in a local SQLite file, behind an async API.

Flow of one invocation (the router drives it; `ResultCache.run_cached` is that flow in one call):

1. `policy.key_for(...)` (edge_agent.cache_policy) derives the `CacheKey` from the request.
2. `await cache.get(key)` looks in a small in-memory hot layer of rows read before
   (`shared.HotLayer`), else does one primary-key SELECT on a read connection, run directly on
   the event loop thread (`front.ResultCache._lookup` has the measurement that justifies it).
   A hit records the key in an in-memory "touched" map; the LRU column is updated later, in
   batches, by the writer.
3. On a miss the function runs. Only a successful `Result` is offered to `cache.put(...)`, which
   checks the arguments, puts a row on a queue and returns at once. Errors are exceptions in this
   code base, so they never reach `put`; `put` refuses anything that is not bytes.
4. One writer thread owns the write connection (`writer.Writer`). It drains the queue into one
   transaction (`BEGIN IMMEDIATE ... COMMIT`): the rows, pending purges, the touched map, and
   LRU eviction down to 90 % of the byte bound whenever the bound is passed, so a committed
   state never exceeds it.

Failure handling (`files.FileKeeper`, part of the writer): any SQLite error other than "busy", a
file deleted or replaced under us (checked by inode every `check_interval_s`), or a file that
fails `PRAGMA quick_check` at open puts the cache in the "degraded" state: `get` answers None,
`put` drops, `stats()` says why. The writer then renames a bad file aside
(`<name>.corrupt-<UTC timestamp>` plus its -wal/-shm), creates a fresh file, and goes back to
"ok"; if that fails it retries with exponential backoff. Callers never see an exception from a
broken cache: a cache is an optimisation, the function can always run.

Modules, one job each:

    front.py    ResultCache, the async face: reads on the loop, writes queued to the writer
    answers.py  what a lookup answers: CacheEntry, CachedResult (and the private Hit)
    writer.py   the writer thread: batches, transactions, eviction, periodic checks
    files.py    the file's life: open checked, notice it vanish, set a broken one aside
    shared.py   what both threads share: row shapes, the hot layer, the queue items
    schema.py   the schema and its migrations (plain SQL: the agent has no sqlite-utils)

The SQLite pieces every store uses (WAL, `BEGIN IMMEDIATE`, reader connections) come from
`runtimes.sqlitedb`.
"""

from edge_agent.cache.answers import CachedResult, CacheEntry, CacheStatus, EntryStatus
from edge_agent.cache.front import DEFAULT_MAX_BYTES, MAX_ENTRY_BYTES, ResultCache
from edge_agent.cache.schema import MIGRATIONS, migrate
from edge_agent.cache.shared import State

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_ENTRY_BYTES",
    "MIGRATIONS",
    "CacheEntry",
    "CacheStatus",
    "CachedResult",
    "EntryStatus",
    "ResultCache",
    "State",
    "migrate",
]

"""What the event loop and the writer thread share: row shapes, the hot layer, the queue items.

Every field of `Shared` (and the hot layer inside it) is read and written under `Shared.lock`;
nothing else crosses between the two threads except the writer's queue.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from runtimes.invocation import Result

State = Literal["ok", "degraded"]

# The in-memory hot layer in front of the SQLite read (see `HotLayer`): at most this many bytes
# of values (and this share of the cache bound), entries above HOT_MAX_ENTRY_BYTES never enter
# it. 2 MiB holds ~10 k typical small results and keeps the agent within its idle-RSS target.
HOT_MAX_BYTES = 2 * 1024 * 1024
HOT_SHARE = 8
HOT_MAX_ENTRY_BYTES = 64 * 1024
HOT_OVERHEAD = 200  # per entry: the tuple, the key string, the OrderedDict node (an estimate)


class StoredRow(NamedTuple):
    """A committed row as a lookup reads it (the columns of `SELECT_ROW`, in order), and the
    `Result` a hit answers with (immutable, so every hit can share the one object)."""

    value: bytes
    content_type: str
    created: float  # clock() seconds when the result was put
    expires: float  # fresh until then
    stale_until: float  # servable as "stale" (only when the function fails) until then
    result: Result


SELECT_ROW = "SELECT value, content_type, created, expires, stale_until FROM entries WHERE key = ?"


class NewRow(NamedTuple):
    """A row to insert: the columns of `INSERT_ROW`, in order."""

    key: str  # CacheKey.id
    function: str
    scope: str  # "v=<version>" or "e=<epoch>": what version invalidation keeps or deletes
    value: bytes
    content_type: str
    created: float
    expires: float
    stale_until: float
    size: int  # bytes accounted against the bound (see ROW_OVERHEAD)
    last_access: float  # the LRU column


INSERT_ROW = (
    f"INSERT OR REPLACE INTO entries ({', '.join(NewRow._fields)}) "
    f"VALUES ({', '.join('?' * len(NewRow._fields))})"
)


class HotLayer:
    """Rows read from SQLite recently, kept in memory so a repeated hit costs no SELECT.

    Why: a hit through SQLite costs ~20 us on the loop (lock, statement, row tuple); from this
    dict it is ~1-2 us, and at the agent's request rates that is most of what a hit costs on
    top of aiohttp itself (bench/cache.py). Semantics stay those of the file:
      * only rows that were read from SQLite (committed) enter, never a queued `put`;
      * expiry and the stale window are checked against the row's own times on every lookup;
      * the writer drops a key after it committed a new row for it, and empties the layer after
        any committed delete (purge, invalidation, sweep, eviction) and whenever the read
        connection is dropped or replaced (degraded, recovery);
      * LRU bookkeeping still goes through `Shared.touches` to the writer, in batches.
    One gap, accepted: rows changed by another process (an operator's sqlite3 shell) are not
    seen until one of the events above. Guarded by `Shared.lock`, like everything shared.
    """

    __slots__ = ("max_bytes", "rows", "size")

    def __init__(self, max_bytes: int) -> None:
        self.rows: OrderedDict[str, StoredRow] = OrderedDict()
        self.size = 0
        self.max_bytes = max_bytes

    @staticmethod
    def _cost(kid: str, row: StoredRow) -> int:
        return len(row.value) + len(kid) + HOT_OVERHEAD

    def add(self, kid: str, row: StoredRow) -> None:
        cost = self._cost(kid, row)
        if cost > HOT_MAX_ENTRY_BYTES or cost > self.max_bytes:
            return
        self.drop(kid)
        self.rows[kid] = row
        self.size += cost
        while self.size > self.max_bytes:
            old, dropped = self.rows.popitem(last=False)
            self.size -= self._cost(old, dropped)

    def drop(self, kid: str) -> None:
        row = self.rows.pop(kid, None)
        if row is not None:
            self.size -= self._cost(kid, row)

    def clear(self) -> None:
        self.rows.clear()
        self.size = 0


@dataclass
class Shared:
    """State touched by both threads. Every field is read and written under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: sqlite3.Connection | None = None  # created/closed by the writer, used by the loop
    retired: list[sqlite3.Connection] = field(default_factory=list)  # readers that failed
    state: State = "degraded"
    reason: str = "not opened yet"
    touches: dict[str, float] = field(default_factory=dict)  # key id -> last access
    pending_bytes: int = 0
    hot: HotLayer = field(default_factory=lambda: HotLayer(HOT_MAX_BYTES))


@dataclass
class Put:
    """A result for the writer to store."""

    row: NewRow
    size: int


ControlKind = Literal["purge", "invalidate", "flush", "resize", "recover", "stop"]


@dataclass
class Control:
    """Anything else for the writer; `done` is answered once it has been applied."""

    kind: ControlKind
    args: tuple[Any, ...] = ()
    done: concurrent.futures.Future[Any] | None = None


def resolve(fut: concurrent.futures.Future[Any] | None, value: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)

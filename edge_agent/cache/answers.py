"""What a cache lookup answers: the public values, and the private `Hit` they are built from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from edge_agent.cache.shared import StoredRow
from runtimes.invocation import Result

EntryStatus = Literal["fresh", "stale"]
CacheStatus = Literal["hit", "miss", "stale", "bypass"]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    value: bytes
    content_type: str
    created: float  # clock() seconds when the result was put
    expires: float  # fresh until then
    stale_until: float  # servable as "stale" (only when the function fails) until then
    status: EntryStatus
    age_s: float  # at lookup; the HTTP API can send it as the Age header


@dataclass(frozen=True, slots=True)
class CachedResult:
    """What `run_cached` answers: the result and where it came from."""

    result: Result
    status: CacheStatus
    age_s: float = 0.0


class Hit(NamedTuple):
    """A live row found by `_lookup`, and the clock reading it was judged by."""

    row: StoredRow
    now: float

    @property
    def status(self) -> EntryStatus:
        return "fresh" if self.now < self.row.expires else "stale"

    @property
    def cache_status(self) -> CacheStatus:
        return "hit" if self.now < self.row.expires else "stale"

    @property
    def age_s(self) -> float:
        return max(0.0, self.now - self.row.created)

    def entry(self) -> CacheEntry:
        row = self.row
        return CacheEntry(
            value=row.value,
            content_type=row.content_type,
            created=row.created,
            expires=row.expires,
            stale_until=row.stale_until,
            status=self.status,
            age_s=self.age_s,
        )

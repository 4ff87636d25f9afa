"""Failover between several URLs of one service (platform replicas behind no load balancer).

An `Endpoint` (`cloud_sync.http_client`) may name `fallback_urls` beside its `base_url`. A
request goes to the client's current URL; when that one is unreachable or answers 502/503/504
(any 5xx for GET/HEAD) the same request goes to the next URL, each at most once, and the first
that answers otherwise becomes the current one (sticky: later requests start there, so a working
replica keeps the traffic until it fails). When every URL failed the caller sees the last answer
(a 5xx) or, with no answer at all, the last `Unreachable`. Requests that may be retried this way
are the platform's idempotent ones: records carry their outbox key (the platform de-duplicates),
desired documents and bundles are reads. A cloud invocation (`cloud_invoke.py`) is retried
elsewhere only when no answer came or the answer was 502-504; a connection cut after the request
was sent may, rarely, run the function twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

# Answers that say "this server cannot serve now, another may": fail over on any method.
FAILOVER_STATUSES = frozenset({502, 503, 504})
_IDEMPOTENT = frozenset({"GET", "HEAD"})

T = TypeVar("T")


def fails_over(method: str, status: int) -> bool:
    """Whether an answer with `status` sends the request on to the next URL."""
    return status in FAILOVER_STATUSES or (status >= 500 and method.upper() in _IDEMPOTENT)


class Sticky(Generic[T]):
    """The endpoints of one client and which one answered last (where requests start)."""

    def __init__(self, endpoints: Sequence[T]) -> None:
        self.endpoints = list(endpoints)
        self.current = 0

    def order(self) -> list[tuple[int, T]]:
        n = len(self.endpoints)
        return [((self.current + i) % n, self.endpoints[(self.current + i) % n]) for i in range(n)]

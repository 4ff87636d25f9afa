"""Console sessions: who is logged in, with which CSRF token, until when.

A session is 32 random bytes (the cookie `edgefn_session`: HttpOnly so scripts cannot read it,
SameSite=Strict so other sites cannot send it, Secure under TLS) mapped in memory to the
operator's name, a CSRF token of its own and an expiry. Every POST must carry that CSRF token
in the form field `csrf` (or the `X-CSRF-Token` header); SameSite already stops cross-site form
posts in current browsers, the token stops them in the others and from sibling subdomains.

Sessions live in memory only: a platform restart logs everyone out, which is the safe
direction. They are bounded (`MAX_SESSIONS`, oldest dropped first) so a login loop cannot grow
the platform's memory.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

COOKIE = "edgefn_session"
# A working day: long enough not to interrupt an incident, short enough that a forgotten
# browser on a shared desk stops working by the next morning.
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 1000


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    csrf: str
    expires_at: float


class Sessions:
    def __init__(self, ttl_s: float = SESSION_TTL_S, limit: int = MAX_SESSIONS) -> None:
        self._ttl = ttl_s
        self._limit = limit
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), time.time() + self._ttl)
        self._by_id[sid] = session
        while len(self._by_id) > self._limit:
            self._by_id.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is None:
            return None
        if session.expires_at < time.time():
            del self._by_id[sid]
            return None
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)


def csrf_ok(session: Session, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(
        str(presented).encode("utf-8"), session.csrf.encode("utf-8")
    )

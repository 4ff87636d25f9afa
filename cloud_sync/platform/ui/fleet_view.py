"""The fleet as the console reads it: filtered, sorted, paged in SQL, so 10,000 devices cost
one indexed query per page and one aggregate for the counts, not 10,000 JSON decodes.

Reads go straight to the fleet store's SQLite file on a read connection of this thread
(`runtimes.sqlitedb.connect_reader`, WAL): they never wait for the store's writer thread and
never write. The store stays the one writer and the owner of the schema (fleet_store.py); the
expressions for "online" and "unhealthy" below follow its `describe()`.

Blocking: async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.platform.fleet_store import HTTP_ONLINE_S
from runtimes.sqlitedb import connect_reader

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# Online as in FleetStore.describe: an MQTT presence, or an HTTP fallback contact lately.
_ONLINE = (
    "(revoked = 0 AND (COALESCE(presence, '') = 'online'"
    " OR (http_seen IS NOT NULL AND :now - http_seen < :http_s)))"
)
# Unhealthy: the device refused its config, or a function's latest rollout step failed.
_UNHEALTHY = (
    "(COALESCE(json_extract(reported, '$.status'), '') = 'rejected' OR EXISTS (SELECT 1 FROM"
    " json_each(devices.reported, '$.rollouts') r"
    " WHERE json_extract(r.value, '$.state') = 'failed'))"
)
SORTS = {
    "id": "id",
    "last_seen": "last_seen",
    "state": _ONLINE,
    "arch": "json_extract(reported, '$.profile.arch')",
}
STATES = ("online", "offline", "unhealthy")


@dataclass(frozen=True, slots=True)
class FleetQuery:
    search: str = ""
    label: str = ""  # "key=value"
    state: str = ""  # one of STATES or ""
    sort: str = "id"
    descending: bool = False
    page: int = 1
    page_size: int = PAGE_SIZE


@dataclass(slots=True)
class FleetPage:
    rows: list[dict[str, Any]]
    total: int  # matching the filter
    counts: dict[str, int] = field(default_factory=dict)  # whole fleet: online/offline/unhealthy


class FleetView:
    def __init__(self, fleet_db: Path) -> None:
        self.path = Path(fleet_db)
        self._local = threading.local()
        # Every thread's connection, so close() can close them all (executor threads included).
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_reader(self.path)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def page(self, q: FleetQuery, now: float | None = None) -> FleetPage:
        args: dict[str, Any] = {"now": time.time() if now is None else now, "http_s": HTTP_ONLINE_S}
        where = ["1=1"]
        if q.search:
            where.append("id LIKE :search ESCAPE '\\'")
            escaped = q.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args["search"] = f"%{escaped}%"
        if q.label:
            key, _, value = q.label.partition("=")
            where.append(
                "EXISTS (SELECT 1 FROM json_each(devices.labels) l WHERE l.key = :lk"
                " AND l.value = :lv)"
            )
            args["lk"], args["lv"] = key.strip(), value.strip()
        if q.state == "online":
            where.append(_ONLINE)
        elif q.state == "offline":
            where.append(f"NOT {_ONLINE}")
        elif q.state == "unhealthy":
            where.append(_UNHEALTHY)
        order = SORTS.get(q.sort, "id")
        direction = "DESC" if q.descending else "ASC"
        size = max(1, min(q.page_size, MAX_PAGE_SIZE))
        args["limit"], args["offset"] = size, (max(1, q.page) - 1) * size
        cond = " AND ".join(where)
        sql = (
            f"SELECT id, labels, {_ONLINE} AS online, {_UNHEALTHY} AS unhealthy, last_seen,"
            " json_extract(reported, '$.profile.arch'), json_extract(reported, '$.agent_version'),"
            " json_extract(reported, '$.functions'), revoked,"
            " json_extract(reported, '$.profile.labels')"
            f" FROM devices WHERE {cond} ORDER BY {order} {direction}, id {direction}"
            " LIMIT :limit OFFSET :offset"
        )
        conn = self._conn()
        conn.execute("BEGIN")  # one snapshot: the page, its total and the counts agree
        try:
            raw = conn.execute(sql, args).fetchall()
            (total,) = conn.execute(f"SELECT COUNT(*) FROM devices WHERE {cond}", args).fetchone()
            online, all_, unhealthy = conn.execute(
                f"SELECT COALESCE(SUM({_ONLINE}), 0), COUNT(*), COALESCE(SUM({_UNHEALTHY}), 0)"
                " FROM devices",
                args,
            ).fetchone()
        finally:
            conn.execute("COMMIT")
        rows = []
        for (ident, labels, is_online, is_unhealthy, last_seen, arch, agent, fns, revoked,
             reported_labels) in raw:  # fmt: skip
            rows.append(
                {
                    "id": ident,
                    "labels": _obj(labels),
                    "online": bool(is_online),
                    "unhealthy": bool(is_unhealthy),
                    "last_seen": last_seen,
                    "arch": arch,
                    "agent_version": agent,
                    "functions": _obj(fns),
                    "revoked": bool(revoked),
                    # What the device says about itself (its profile), beside what enrolment set.
                    "reported_labels": _obj(reported_labels),
                }
            )
        counts = {"online": int(online), "offline": int(all_) - int(online),
                  "unhealthy": int(unhealthy), "total": int(all_)}  # fmt: skip
        return FleetPage(rows, int(total), counts)

    def version_distribution(self) -> dict[str, dict[str, int]]:
        """function -> version -> how many devices report it active."""
        rows = (
            self._conn()
            .execute(
                "SELECT f.key, f.value, COUNT(*) FROM devices, json_each(devices.reported,"
                " '$.functions') f WHERE devices.reported IS NOT NULL AND devices.revoked = 0"
                " GROUP BY f.key, f.value ORDER BY f.key, f.value"
            )
            .fetchall()
        )
        out: dict[str, dict[str, int]] = {}
        for name, version, n in rows:
            out.setdefault(str(name), {})[str(version)] = int(n)
        return out

    def close(self) -> None:
        """At app cleanup, when no request runs any more (a connection is used by one thread)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


def _obj(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

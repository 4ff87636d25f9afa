"""The fleet as the console reads it: filtered, sorted, paged in SQL, so 10,000 devices cost
one indexed query per page and one aggregate for the counts, not 10,000 JSON decodes.

Reads go through the fleet store's engine (`FleetStore.engine`), one read snapshot per page: on
SQLite a read connection of this thread (WAL; it never waits for the writer), on PostgreSQL a
pooled connection in a REPEATABLE READ READ ONLY transaction. The store stays the one writer and
the owner of the schema (fleet_schema.py); the expressions for "online" and "unhealthy" below
follow its `describe()`. JSON columns are TEXT on both backends; only the few JSON expressions
differ per dialect (`_Dialect`): SQLite's json_extract/json_each, PostgreSQL's jsonb operators.

Blocking: async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from cloud_sync.platform.fleet_store import HTTP_ONLINE_S
from cloud_sync.platform.sql import Conn, Engine

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# Parameters every query shares, bound once: `WITH p AS (...)` and then p.now / p.http_s.
_PARAMS = (
    "WITH p AS (SELECT CAST(? AS DOUBLE PRECISION) AS now, CAST(? AS DOUBLE PRECISION) AS http_s)"
)
# Online as in FleetStore.describe: an MQTT presence, or an HTTP fallback contact lately.
_ONLINE = (
    "(revoked = 0 AND (COALESCE(presence, '') = 'online'"
    " OR (http_seen IS NOT NULL AND p.now - http_seen < p.http_s)))"
)
STATES = ("online", "offline", "unhealthy")


def _as_int(cond: str) -> str:
    return f"(CASE WHEN {cond} THEN 1 ELSE 0 END)"


@dataclass(frozen=True, slots=True)
class _Dialect:
    """The JSON expressions that differ between SQLite and PostgreSQL."""

    unhealthy: str  # the device refused its config, or a function's latest rollout step failed
    label_match: str  # two parameters: label key, label value
    arch: str
    agent_version: str
    functions: str
    reported_labels: str
    function_versions: str  # FROM item: rows (key, value) of reported.functions

    @property
    def sorts(self) -> dict[str, str]:
        return {"id": "id", "last_seen": "last_seen", "state": _as_int(_ONLINE), "arch": self.arch}


def _pg_object(expr: str) -> str:
    """`expr` (jsonb) when it is an object, else an empty one: jsonb_each refuses non-objects."""
    return f"(CASE WHEN jsonb_typeof({expr}) = 'object' THEN {expr} ELSE '{{}}'::jsonb END)"


_PG_ROLLOUTS = "reported::jsonb -> 'rollouts'"
_PG_FUNCTIONS = "devices.reported::jsonb -> 'functions'"
_SQLITE = _Dialect(
    unhealthy=(
        "(COALESCE(json_extract(reported, '$.status'), '') = 'rejected' OR EXISTS (SELECT 1 FROM"
        " json_each(devices.reported, '$.rollouts') r"
        " WHERE json_extract(r.value, '$.state') = 'failed'))"
    ),
    label_match=(
        "EXISTS (SELECT 1 FROM json_each(devices.labels) l WHERE l.key = ? AND l.value = ?)"
    ),
    arch="json_extract(reported, '$.profile.arch')",
    agent_version="json_extract(reported, '$.agent_version')",
    functions="json_extract(reported, '$.functions')",
    reported_labels="json_extract(reported, '$.profile.labels')",
    function_versions="json_each(devices.reported, '$.functions') f",
)
_POSTGRESQL = _Dialect(
    unhealthy=(
        "(COALESCE(reported::jsonb ->> 'status', '') = 'rejected' OR EXISTS (SELECT 1 FROM"
        f" jsonb_each({_pg_object(_PG_ROLLOUTS)}) r"
        " WHERE r.value ->> 'state' = 'failed'))"
    ),
    label_match="(devices.labels::jsonb ->> CAST(? AS TEXT)) = CAST(? AS TEXT)",
    arch="(reported::jsonb #>> '{profile,arch}')",
    agent_version="(reported::jsonb ->> 'agent_version')",
    functions="(reported::jsonb ->> 'functions')",
    reported_labels="(reported::jsonb #>> '{profile,labels}')",
    function_versions=f"jsonb_each_text({_pg_object(_PG_FUNCTIONS)}) f",
)


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
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._d = _SQLITE if engine.dialect == "sqlite" else _POSTGRESQL

    def page(self, q: FleetQuery, now: float | None = None) -> FleetPage:
        d = self._d
        shared: list[Any] = [time.time() if now is None else now, HTTP_ONLINE_S]
        where = ["1=1"]
        args: list[Any] = []
        if q.search:
            where.append("LOWER(id) LIKE LOWER(?) ESCAPE '\\'")
            escaped = q.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
        if q.label:
            key, _, value = q.label.partition("=")
            where.append(d.label_match)
            args += [key.strip(), value.strip()]
        if q.state == "online":
            where.append(_ONLINE)
        elif q.state == "offline":
            where.append(f"NOT {_ONLINE}")
        elif q.state == "unhealthy":
            where.append(d.unhealthy)
        order = d.sorts.get(q.sort, "id")
        direction = "DESC" if q.descending else "ASC"
        size = max(1, min(q.page_size, MAX_PAGE_SIZE))
        cond = " AND ".join(where)
        sql = (
            f"{_PARAMS} SELECT id, labels, {_as_int(_ONLINE)}, {_as_int(d.unhealthy)}, last_seen,"
            f" {d.arch}, {d.agent_version}, {d.functions}, revoked, {d.reported_labels}"
            f" FROM devices, p WHERE {cond} ORDER BY {order} {direction}, id {direction}"
            " LIMIT ? OFFSET ?"
        )
        page_args = [*shared, *args, size, (max(1, q.page) - 1) * size]

        def query(c: Conn) -> tuple[list[Any], Any, Any]:
            # One snapshot: the page, its total and the counts agree.
            raw = c.execute(sql, page_args).fetchall()
            (total,) = c.execute(
                f"{_PARAMS} SELECT COUNT(*) FROM devices, p WHERE {cond}", [*shared, *args]
            ).fetchone()
            counts = c.execute(
                f"{_PARAMS} SELECT COALESCE(SUM({_as_int(_ONLINE)}), 0), COUNT(*),"
                f" COALESCE(SUM({_as_int(d.unhealthy)}), 0) FROM devices, p",
                shared,
            ).fetchone()
            return raw, total, counts

        raw, total, (online, all_, unhealthy) = self._engine.read(query)
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
        sql = (
            f"SELECT f.key, f.value, COUNT(*) FROM devices, {self._d.function_versions}"
            " WHERE devices.reported IS NOT NULL AND devices.revoked = 0"
            " GROUP BY f.key, f.value ORDER BY f.key, f.value"
        )
        rows = self._engine.read(lambda c: c.execute(sql).fetchall())
        out: dict[str, dict[str, int]] = {}
        for name, version, n in rows:
            out.setdefault(str(name), {})[str(version)] = int(n)
        return out

    def close(self) -> None:
        """Nothing of its own to close: the fleet store owns the engine."""


def _obj(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

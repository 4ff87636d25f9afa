"""What the platform knows about devices: registry, desired state, reported state, metrics.

One SQLite file (`<data_dir>/fleet.db`, WAL) behind plain methods; every method blocks, so async
callers use `asyncio.to_thread`. The access pattern is the shared one (`runtimes.sqlitedb`): a
writer thread owns the write connection and runs each change in one `BEGIN IMMEDIATE`
transaction; reads run on a connection of their own per calling thread, in one snapshot, and
never wait for a write. The write rate is one row per device per metrics interval: small for one
host; a fleet swaps this class for PostgreSQL behind the same methods.

Tables:

    devices   id, labels, token hash, certificate serial, enrolment time, presence, last seen,
              desired (version + config), latest reported document and its report counter
    groups    name -> desired version + config
    records   every device -> platform record stored once: UNIQUE idempotency key AND UNIQUE
              payload digest (sha256 of topic + payload). MQTT 5 and HTTP carry the outbox key;
              MQTT 3.1.1 (embedded broker) cannot, so the digest catches the same record arriving
              by two paths. `ingest` answers whether the record was new.
    fn_metrics one row per (metrics record, function) with its counters, for fast sums.

Device tokens are stored as sha256 hashes only; `token_index()` gives the in-memory map the HTTP
authoriser uses (hash -> device id), so authorising a request never touches the disk.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.assignments import apply_assignments, parse_assignments
from runtimes.sqlitedb import Database

# Config edits by `KEY=VALUE` moved to their own module; re-exported for existing importers.
__all__ = [
    "HTTP_ONLINE_S",
    "Desired",
    "DeviceExists",
    "FleetError",
    "FleetStore",
    "UnknownDevice",
    "apply_assignments",
    "parse_assignments",
    "record_digest",
    "token_hash",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL DEFAULT '{}',
    token_hash TEXT UNIQUE,
    cert_serial TEXT,
    enrolled_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    presence TEXT,
    presence_at REAL,
    last_seen REAL,
    http_seen REAL,
    desired_version INTEGER NOT NULL DEFAULT 0,
    desired_config TEXT NOT NULL DEFAULT '{}',
    reported TEXT,
    reported_seq INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY,
    desired_version INTEGER NOT NULL DEFAULT 0,
    desired_config TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE,
    digest TEXT NOT NULL UNIQUE,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    via TEXT NOT NULL,
    received_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_device ON records(device, kind, id);
CREATE TABLE IF NOT EXISTS fn_metrics (
    record_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    function TEXT NOT NULL,
    interval_start REAL NOT NULL,
    interval_end REAL NOT NULL,
    invocations INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    cache_hits INTEGER NOT NULL,
    cache_misses INTEGER NOT NULL,
    latency_sum_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS fn_metrics_device ON fn_metrics(device, function);
"""

# A device seen over HTTP (fallback) within this many seconds counts as online: it has no MQTT
# presence while the broker is unreachable. Three of the agent's default HTTP poll periods.
HTTP_ONLINE_S = 30.0


class FleetError(CloudSyncError):
    code = "fleet_error"
    category = "storage"


class UnknownDevice(FleetError):
    code = "unknown_device"


class DeviceExists(FleetError):
    code = "device_exists"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def record_digest(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode() + b"\n" + payload).hexdigest()


@dataclass(frozen=True, slots=True)
class Desired:
    version: int
    config: dict[str, Any]

    def document(self) -> dict[str, Any]:
        return {"version": self.version, "config": self.config}


class FleetStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # NORMAL: a platform crash loses nothing committed; a power cut may lose the last
        # commits, which devices resend (they delete records only after our 2xx/PUBACK ... of
        # the broker, so the broker path relies on the broker's own persistence).
        self._db = Database(
            self.path, synchronous="NORMAL", setup=_create_schema, name="edgefn-fleet-db"
        )
        try:
            self._db.opened.result()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise FleetError(f"cannot open the fleet store {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    # ---- registry ----------------------------------------------------------------------

    def enroll(
        self, device_id: str, labels: Mapping[str, str], token: str, cert_serial: int
    ) -> None:
        row = (
            device_id,
            json.dumps(dict(labels)),
            token_hash(token),
            str(cert_serial),
            time.time(),
        )
        try:
            self._db.write(
                lambda c: c.execute(
                    "INSERT INTO devices (id, labels, token_hash, cert_serial, enrolled_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    row,
                )
            )
        except sqlite3.IntegrityError as exc:
            raise DeviceExists(f"device {device_id!r} is already enrolled") from exc

    def revoke(self, device_id: str) -> int:
        """Mark revoked and forget its token; returns the certificate serial to put on the CRL."""

        def revoke(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT cert_serial FROM devices WHERE id=?", (device_id,)).fetchone()
            if row is None:
                raise UnknownDevice(f"no device {device_id!r}")
            c.execute("UPDATE devices SET revoked=1, token_hash=NULL WHERE id=?", (device_id,))
            (serial,) = row
            return int(serial)

        return self._db.write(revoke)

    def token_index(self) -> dict[str, str]:
        rows = self._db.read(
            lambda c: c.execute(
                "SELECT token_hash, id FROM devices WHERE token_hash IS NOT NULL AND revoked=0"
            ).fetchall()
        )
        return {h: d for h, d in rows}

    def revoked_serials(self) -> set[int]:
        rows = self._db.read(
            lambda c: c.execute("SELECT cert_serial FROM devices WHERE revoked=1").fetchall()
        )
        return {int(serial) for (serial,) in rows if serial}

    def exists(self, device_id: str) -> bool:
        found = self._db.read(
            lambda c: c.execute("SELECT 1 FROM devices WHERE id=?", (device_id,)).fetchone()
        )
        return found is not None

    def device_ids(self) -> list[str]:
        rows = self._db.read(lambda c: c.execute("SELECT id FROM devices ORDER BY id").fetchall())
        return [ident for (ident,) in rows]

    def describe(
        self, device_id: str | None = None, now: float | None = None
    ) -> list[dict[str, Any]]:
        """The `edge-cloud devices` view: one object per device."""
        now = time.time() if now is None else now
        sql = (
            "SELECT id, labels, enrolled_at, revoked, presence, presence_at, last_seen, http_seen,"
            " desired_version, reported FROM devices"
        )
        args: tuple[Any, ...] = ()
        if device_id is not None:
            sql += " WHERE id=?"
            args = (device_id,)
        rows = self._db.read(lambda c: c.execute(sql + " ORDER BY id", args).fetchall())
        out = []
        for (ident, labels, enrolled, revoked, presence, _presence_at, last_seen,
             http_seen, desired_v, reported_raw) in rows:  # fmt: skip
            reported = json.loads(reported_raw) if reported_raw else {}
            applied = reported.get("applied") or {}
            http_recent = http_seen is not None and now - http_seen < HTTP_ONLINE_S
            online = not revoked and (presence == "online" or http_recent)
            out.append(
                {
                    "id": ident,
                    "online": bool(online),
                    "last_seen": last_seen,
                    "labels": json.loads(labels),
                    "functions": reported.get("functions") or {},
                    "config_version": {
                        "desired": desired_v,
                        "reported": int(applied.get("device_version") or 0),
                    },
                    "config_status": reported.get("status"),
                    "config_error": reported.get("error"),
                    "sync": reported.get("sync"),
                    "profile": reported.get("profile"),
                    "presence": presence,
                    "enrolled_at": enrolled,
                    "revoked": bool(revoked),
                }
            )
        return out

    # ---- desired -----------------------------------------------------------------------

    def desired(self, device_id: str) -> Desired:
        row = self._db.read(
            lambda c: c.execute(
                "SELECT desired_version, desired_config FROM devices WHERE id=?", (device_id,)
            ).fetchone()
        )
        if row is None:
            raise UnknownDevice(f"no device {device_id!r}")
        version, config = row
        return Desired(int(version), json.loads(config))

    def set_desired(self, device_id: str, config: Mapping[str, Any]) -> Desired:
        """Store a new config under the next version (the caller validated it)."""
        doc = json.dumps(dict(config))

        def bump(c: sqlite3.Connection) -> int:
            row = c.execute(
                "SELECT desired_version FROM devices WHERE id=?", (device_id,)
            ).fetchone()
            if row is None:
                raise UnknownDevice(f"no device {device_id!r}")
            version = int(row[0]) + 1
            c.execute(
                "UPDATE devices SET desired_version=?, desired_config=? WHERE id=?",
                (version, doc, device_id),
            )
            return version

        return Desired(self._db.write(bump), dict(config))

    def group_desired(self, name: str) -> Desired | None:
        row = self._db.read(
            lambda c: c.execute(
                "SELECT desired_version, desired_config FROM groups WHERE name=?", (name,)
            ).fetchone()
        )
        if row is None:
            return None
        version, config = row
        return Desired(int(version), json.loads(config))

    def set_group_desired(self, name: str, config: Mapping[str, Any]) -> Desired:
        doc = json.dumps(dict(config))

        def bump(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT desired_version FROM groups WHERE name=?", (name,)).fetchone()
            version = (int(row[0]) if row else 0) + 1
            c.execute(
                "INSERT INTO groups (name, desired_version, desired_config) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET desired_version=excluded.desired_version,"
                " desired_config=excluded.desired_config",
                (name, version, doc),
            )
            return version

        return Desired(self._db.write(bump), dict(config))

    def group_names(self) -> list[str]:
        rows = self._db.read(
            lambda c: c.execute("SELECT name FROM groups ORDER BY name").fetchall()
        )
        return [name for (name,) in rows]

    # ---- intake ------------------------------------------------------------------------

    def seen(self, device_id: str, *, via: str, presence: str | None = None) -> None:
        now = time.time()
        if presence is not None:
            sql = "UPDATE devices SET presence=?, presence_at=?, last_seen=? WHERE id=?"
            args: tuple[Any, ...] = (presence, now, now, device_id)
        elif via == "http":
            sql = "UPDATE devices SET http_seen=?, last_seen=? WHERE id=?"
            args = (now, now, device_id)
        else:
            sql = "UPDATE devices SET last_seen=? WHERE id=?"
            args = (now, device_id)
        self._db.write(lambda c: c.execute(sql, args))

    def ingest(
        self,
        device_id: str,
        kind: str,
        topic: str,
        payload: bytes,
        *,
        key: str | None,
        via: str,
    ) -> bool:
        """Store one record unless its key or digest was seen; True if it was new."""
        digest = record_digest(topic, payload)
        now = time.time()
        doc: Any = None
        if kind in ("reported", "metrics"):
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = None

        def store(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT OR IGNORE INTO records (key, digest, device, kind, via, received_at,"
                " payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, digest, device_id, kind, via, now, payload),
            )
            new = cur.rowcount == 1
            if new and kind == "metrics" and isinstance(doc, dict):
                _add_metrics(c, cur.lastrowid or 0, device_id, doc)
            if new and kind == "reported" and isinstance(doc, dict):
                seq = doc.get("version")
                if isinstance(seq, int):
                    c.execute(
                        "UPDATE devices SET reported=?, reported_seq=? WHERE id=?"
                        " AND reported_seq < ?",
                        (payload.decode(), seq, device_id, seq),
                    )
            if via == "http":
                c.execute(
                    "UPDATE devices SET http_seen=?, last_seen=? WHERE id=?",
                    (now, now, device_id),
                )
            else:
                c.execute("UPDATE devices SET last_seen=? WHERE id=?", (now, device_id))
            return new

        return self._db.write(store)

    # ---- queries -----------------------------------------------------------------------

    def metrics_summary(self, device_id: str, function: str | None = None) -> dict[str, Any]:
        """Totals per function over everything stored, plus the latest system gauges."""
        sql = (
            "SELECT function, SUM(invocations), SUM(errors), SUM(cache_hits), SUM(cache_misses),"
            " SUM(latency_sum_ms), MIN(interval_start), MAX(interval_end), COUNT(*)"
            " FROM fn_metrics WHERE device=?"
        )
        args: list[Any] = [device_id]
        if function is not None:
            sql += " AND function=?"
            args.append(function)

        def query(c: sqlite3.Connection) -> tuple[list[Any], int, Any]:
            # One read snapshot: the totals, the count and the latest record agree.
            if not c.execute("SELECT 1 FROM devices WHERE id=?", (device_id,)).fetchone():
                raise UnknownDevice(f"no device {device_id!r}")
            rows = c.execute(sql + " GROUP BY function ORDER BY function", args).fetchall()
            (count,) = c.execute(
                "SELECT COUNT(*) FROM records WHERE device=? AND kind='metrics'", (device_id,)
            ).fetchone()
            last = c.execute(
                "SELECT payload FROM records WHERE device=? AND kind='metrics'"
                " ORDER BY id DESC LIMIT 1",
                (device_id,),
            ).fetchone()
            return rows, int(count), last

        rows, count, last = self._db.read(query)
        functions = {}
        for name, inv, err, hits, misses, lat_sum, start, end, n in rows:
            functions[name] = {
                "invocations": inv,
                "errors": err,
                "cache_hits": hits,
                "cache_misses": misses,
                "cache_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
                "latency_ms_avg": round(lat_sum / inv, 3) if inv else None,
                "from": start,
                "to": end,
                "intervals": n,
            }
        system: dict[str, Any] = {}
        if last is not None:
            (payload,) = last
            try:
                system = json.loads(payload).get("system") or {}
            except ValueError:
                system = {}
        return {"device": device_id, "records": count, "functions": functions, "system": system}

    def records(self, device_id: str, kind: str | None = None, limit: int = 100) -> list[Any]:
        sql = "SELECT kind, via, received_at, payload FROM records WHERE device=?"
        args: list[Any] = [device_id]
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        rows = self._db.read(
            lambda c: c.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
        )
        out = []
        for k, via, at, payload in rows:
            try:
                value = json.loads(payload)
            except ValueError:
                value = bytes(payload).decode("utf-8", "replace")
            out.append({"kind": k, "via": via, "received_at": at, "value": value})
        return out

    def record_counts(self, device_id: str) -> dict[str, int]:
        rows = self._db.read(
            lambda c: c.execute(
                "SELECT kind, COUNT(*) FROM records WHERE device=? GROUP BY kind", (device_id,)
            ).fetchall()
        )
        return {k: n for k, n in rows}


def _create_schema(conn: sqlite3.Connection) -> None:
    """The Database's setup step (idempotent: every statement is IF NOT EXISTS)."""
    conn.executescript(_SCHEMA)


def _add_metrics(
    conn: sqlite3.Connection, record_id: int, device_id: str, doc: Mapping[str, Any]
) -> None:
    start, end = doc.get("interval_start", 0.0), doc.get("interval_end", 0.0)
    fns = doc.get("functions")
    if not isinstance(fns, dict):
        return
    rows = []
    for name, entry in fns.items():
        if not isinstance(entry, dict):
            continue
        lat = entry.get("latency_ms") if isinstance(entry.get("latency_ms"), dict) else {}
        rows.append(
            (
                record_id,
                device_id,
                str(name),
                float(start),
                float(end),
                _int(entry.get("invocations")),
                _int(entry.get("errors")),
                _int(entry.get("cache_hits")),
                _int(entry.get("cache_misses")),
                float(lat.get("sum", 0.0) if lat else 0.0),
            )
        )
    conn.executemany("INSERT INTO fn_metrics VALUES (?,?,?,?,?,?,?,?,?,?)", rows)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

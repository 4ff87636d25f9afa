"""What the platform knows about devices: registry, desired state, reported state, metrics.

One SQLite file (`<data_dir>/fleet.db`, WAL) behind plain methods; every method blocks, so async
callers use `asyncio.to_thread`. One connection guarded by a lock serves all threads (the write
rate is one row per device per metrics interval: small for one host; a fleet swaps this class
for PostgreSQL behind the same methods).

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
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.errors import CloudSyncError

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
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a platform crash loses nothing committed; a power cut may lose the last
        # commits, which devices resend (they delete records only after our 2xx/PUBACK ... of
        # the broker, so the broker path relies on the broker's own persistence).
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- registry ----------------------------------------------------------------------

    def enroll(
        self, device_id: str, labels: Mapping[str, str], token: str, cert_serial: int
    ) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO devices (id, labels, token_hash, cert_serial, enrolled_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (device_id, json.dumps(dict(labels)), token_hash(token), str(cert_serial),
                     time.time()),
                )  # fmt: skip
            except sqlite3.IntegrityError as exc:
                raise DeviceExists(f"device {device_id!r} is already enrolled") from exc

    def revoke(self, device_id: str) -> int:
        """Mark revoked and forget its token; returns the certificate serial to put on the CRL."""
        with self._lock:
            row = self._db.execute(
                "SELECT cert_serial FROM devices WHERE id=?", (device_id,)
            ).fetchone()
            if row is None:
                raise UnknownDevice(f"no device {device_id!r}")
            self._db.execute(
                "UPDATE devices SET revoked=1, token_hash=NULL WHERE id=?", (device_id,)
            )
            return int(row[0])

    def token_index(self) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT token_hash, id FROM devices WHERE token_hash IS NOT NULL AND revoked=0"
            ).fetchall()
        return {h: d for h, d in rows}

    def revoked_serials(self) -> set[int]:
        with self._lock:
            rows = self._db.execute("SELECT cert_serial FROM devices WHERE revoked=1").fetchall()
        return {int(r[0]) for r in rows if r[0]}

    def exists(self, device_id: str) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM devices WHERE id=?", (device_id,)).fetchone()
                is not None
            )

    def device_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM devices ORDER BY id")]

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
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
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
        with self._lock:
            row = self._db.execute(
                "SELECT desired_version, desired_config FROM devices WHERE id=?", (device_id,)
            ).fetchone()
        if row is None:
            raise UnknownDevice(f"no device {device_id!r}")
        return Desired(int(row[0]), json.loads(row[1]))

    def set_desired(self, device_id: str, config: Mapping[str, Any]) -> Desired:
        """Store a new config under the next version (the caller validated it)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT desired_version FROM devices WHERE id=?", (device_id,)
                ).fetchone()
                if row is None:
                    raise UnknownDevice(f"no device {device_id!r}")
                version = int(row[0]) + 1
                self._db.execute(
                    "UPDATE devices SET desired_version=?, desired_config=? WHERE id=?",
                    (version, json.dumps(dict(config)), device_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Desired(version, dict(config))

    def group_desired(self, name: str) -> Desired | None:
        with self._lock:
            row = self._db.execute(
                "SELECT desired_version, desired_config FROM groups WHERE name=?", (name,)
            ).fetchone()
        return Desired(int(row[0]), json.loads(row[1])) if row else None

    def set_group_desired(self, name: str, config: Mapping[str, Any]) -> Desired:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT desired_version FROM groups WHERE name=?", (name,)
                ).fetchone()
                version = (int(row[0]) if row else 0) + 1
                self._db.execute(
                    "INSERT INTO groups (name, desired_version, desired_config) VALUES (?, ?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET desired_version=excluded.desired_version,"
                    " desired_config=excluded.desired_config",
                    (name, version, json.dumps(dict(config))),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Desired(version, dict(config))

    def group_names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM groups ORDER BY name")]

    # ---- intake ------------------------------------------------------------------------

    def seen(self, device_id: str, *, via: str, presence: str | None = None) -> None:
        now = time.time()
        with self._lock:
            if presence is not None:
                self._db.execute(
                    "UPDATE devices SET presence=?, presence_at=?, last_seen=? WHERE id=?",
                    (presence, now, now, device_id),
                )
            elif via == "http":
                self._db.execute(
                    "UPDATE devices SET http_seen=?, last_seen=? WHERE id=?",
                    (now, now, device_id),
                )
            else:
                self._db.execute("UPDATE devices SET last_seen=? WHERE id=?", (now, device_id))

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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO records (key, digest, device, kind, via, received_at,"
                    " payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, digest, device_id, kind, via, now, payload),
                )
                new = cur.rowcount == 1
                if new and kind == "metrics" and isinstance(doc, dict):
                    self._add_metrics(cur.lastrowid or 0, device_id, doc)
                if new and kind == "reported" and isinstance(doc, dict):
                    seq = doc.get("version")
                    if isinstance(seq, int):
                        self._db.execute(
                            "UPDATE devices SET reported=?, reported_seq=? WHERE id=?"
                            " AND reported_seq < ?",
                            (payload.decode(), seq, device_id, seq),
                        )
                if via == "http":
                    self._db.execute(
                        "UPDATE devices SET http_seen=?, last_seen=? WHERE id=?",
                        (now, now, device_id),
                    )
                else:
                    self._db.execute("UPDATE devices SET last_seen=? WHERE id=?", (now, device_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def _add_metrics(self, record_id: int, device_id: str, doc: Mapping[str, Any]) -> None:
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
        self._db.executemany("INSERT INTO fn_metrics VALUES (?,?,?,?,?,?,?,?,?,?)", rows)

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
        with self._lock:
            if not self._db.execute("SELECT 1 FROM devices WHERE id=?", (device_id,)).fetchone():
                raise UnknownDevice(f"no device {device_id!r}")
            rows = self._db.execute(sql + " GROUP BY function ORDER BY function", args).fetchall()
            count = self._db.execute(
                "SELECT COUNT(*) FROM records WHERE device=? AND kind='metrics'", (device_id,)
            ).fetchone()[0]
            last = self._db.execute(
                "SELECT payload FROM records WHERE device=? AND kind='metrics'"
                " ORDER BY id DESC LIMIT 1",
                (device_id,),
            ).fetchone()
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
            try:
                system = json.loads(last[0]).get("system") or {}
            except ValueError:
                system = {}
        return {"device": device_id, "records": count, "functions": functions, "system": system}

    def records(self, device_id: str, kind: str | None = None, limit: int = 100) -> list[Any]:
        sql = "SELECT kind, via, received_at, payload FROM records WHERE device=?"
        args: list[Any] = [device_id]
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
        out = []
        for k, via, at, payload in rows:
            try:
                value = json.loads(payload)
            except ValueError:
                value = bytes(payload).decode("utf-8", "replace")
            out.append({"kind": k, "via": via, "received_at": at, "value": value})
        return out

    def record_counts(self, device_id: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, COUNT(*) FROM records WHERE device=? GROUP BY kind", (device_id,)
            ).fetchall()
        return {k: n for k, n in rows}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; VALUE is JSON when it parses (3, true, null, {...}), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def apply_assignments(config: Mapping[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted paths in a copy of `config`; a null value removes the key (local default)."""
    out: dict[str, Any] = json.loads(json.dumps(dict(config)))
    for path, value in sets.items():
        parts = path.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return _prune(out)


def _prune(node: dict[str, Any]) -> dict[str, Any]:
    for key in list(node):
        if isinstance(node[key], dict):
            _prune(node[key])
            if not node[key]:
                del node[key]
    return node

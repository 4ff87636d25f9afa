"""What the platform knows about devices: registry, desired state, reported state, metrics.

Plain blocking methods (async callers use `asyncio.to_thread`) over an `sql.Engine`: by default
one SQLite file (`<data_dir>/fleet.db`, WAL, the shared `runtimes.sqlitedb` pattern: one writer
thread, each change one `BEGIN IMMEDIATE` transaction, reads in their own snapshot); with
`--database postgresql://...` the shared PostgreSQL pool, where several replicas write at once.
Every read-modify-write is therefore one statement (`UPDATE ... RETURNING`, `ON CONFLICT DO
UPDATE`), correct under PostgreSQL's READ COMMITTED as under SQLite's single writer. The tables
and their migrations are in `fleet_schema.py`.

Tables:

    devices   id, labels, token hash, certificate serial, enrolment time, presence, last seen,
              desired (version + config), latest reported document and its report counter
    groups    name -> desired version + config
    records   every device -> platform record stored once: UNIQUE idempotency key AND UNIQUE
              payload digest (sha256 of topic + payload). MQTT 5 and HTTP carry the outbox key;
              MQTT 3.1.1 (embedded broker) cannot, so the digest catches the same record arriving
              by two paths. `ingest` answers whether the record was new.
    fn_metrics one row per (metrics record, function) with its counters, for fast sums.

Device tokens are stored as sha256 hashes only. The HTTP authoriser looks a token up here
(`device_for_token`, a unique index) and caches the answer briefly, so a token issued through
one replica works on every replica at once (`device_auth.DeviceAuth`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.assignments import apply_assignments, parse_assignments
from cloud_sync.platform.fleet_schema import COMPONENT, MIGRATIONS
from cloud_sync.platform.sql import Conn, Engine, IntegrityError, SqlError, SqliteEngine

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
    def __init__(self, where: Path | Engine) -> None:
        """`where`: the SQLite file (opened and owned here) or an engine (`sql.Databases`)."""
        if isinstance(where, Path | str):
            self.path: Path | None = Path(where)
            try:
                # NORMAL: a platform crash loses nothing committed; a power cut may lose the
                # last commits, which devices resend (they delete records only after our
                # 2xx/PUBACK ... of the broker, so the broker path relies on its persistence).
                self._db: Engine = SqliteEngine(
                    self.path, synchronous="NORMAL", name="edgefn-fleet-db"
                )
            except SqlError as exc:
                raise FleetError(f"cannot open the fleet store {self.path}: {exc}") from exc
        else:
            self.path, self._db = None, where
        try:
            self._db.migrate(COMPONENT, MIGRATIONS)
        except SqlError as exc:
            self._db.close()
            raise FleetError(f"cannot open the fleet store: {exc}") from exc

    @property
    def engine(self) -> Engine:
        return self._db

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
        except IntegrityError as exc:
            raise DeviceExists(f"device {device_id!r} is already enrolled") from exc

    def revoke(self, device_id: str) -> int:
        """Mark revoked and forget its token; returns the certificate serial to put on the CRL."""

        def revoke(c: Conn) -> int:
            row = c.execute(
                "UPDATE devices SET revoked=1, token_hash=NULL WHERE id=? RETURNING cert_serial",
                (device_id,),
            ).fetchone()
            if row is None:
                raise UnknownDevice(f"no device {device_id!r}")
            (serial,) = row
            return int(serial)

        return self._db.write(revoke)

    def device_for_token(self, digest: str) -> str | None:
        """The enrolled, unrevoked device whose token hashes to `digest` (unique index)."""
        row = self._db.read(
            lambda c: c.execute(
                "SELECT id FROM devices WHERE token_hash=? AND revoked=0", (digest,)
            ).fetchone()
        )
        return str(row[0]) if row else None

    def certificate_ok(self, device_id: str, serial: int | None) -> bool:
        """A verified client certificate names an enrolled, unrevoked device (and, when its
        serial is known, not one that was revoked: a re-enrolled id keeps no old certificate)."""

        def check(c: Conn) -> bool:
            row = c.execute("SELECT revoked FROM devices WHERE id=?", (device_id,)).fetchone()
            if row is None or int(row[0]):
                return False
            if serial is None:
                return True
            bad = c.execute(
                "SELECT 1 FROM devices WHERE revoked=1 AND cert_serial=?", (str(serial),)
            ).fetchone()
            return bad is None

        return self._db.read(check)

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

        def bump(c: Conn) -> int:
            row = c.execute(
                "UPDATE devices SET desired_version=desired_version+1, desired_config=?"
                " WHERE id=? RETURNING desired_version",
                (doc, device_id),
            ).fetchone()
            if row is None:
                raise UnknownDevice(f"no device {device_id!r}")
            return int(row[0])

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

        def bump(c: Conn) -> int:
            (version,) = c.execute(
                "INSERT INTO groups (name, desired_version, desired_config) VALUES (?, 1, ?)"
                " ON CONFLICT(name) DO UPDATE SET desired_version=groups.desired_version+1,"
                " desired_config=excluded.desired_config RETURNING desired_version",
                (name, doc),
            ).fetchone()
            return int(version)

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
        self._db.write(lambda c: c.execute(sql, args), idempotent=True)

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
        """Store one record unless its key or digest was seen; True if it was new.

        Safe to repeat (the engine retries it once on a broken PostgreSQL connection): a record
        that did commit the first time is found by its digest and answered as not new.
        NOT EXISTS first, so a duplicate (the common case after a reconnect) takes no record
        id; ON CONFLICT for two replicas racing with the same record."""
        digest = record_digest(topic, payload)
        now = time.time()
        doc: Any = None
        if kind in ("reported", "metrics"):
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = None

        def store(c: Conn) -> bool:
            row = c.execute(
                "INSERT INTO records (key, digest, device, kind, via, received_at, payload)"
                " SELECT ?, ?, ?, ?, ?, ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM records WHERE digest=?)"
                " AND NOT EXISTS (SELECT 1 FROM records WHERE key=?)"
                " ON CONFLICT DO NOTHING RETURNING id",
                (key, digest, device_id, kind, via, now, payload, digest, key),
            ).fetchone()
            new = row is not None
            if new and kind == "metrics" and isinstance(doc, dict):
                _add_metrics(c, int(row[0]), device_id, doc)
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

        return self._db.write(store, idempotent=True)

    # ---- queries -----------------------------------------------------------------------

    def metrics_summary(self, device_id: str, function: str | None = None) -> dict[str, Any]:
        """Totals per function over everything stored, plus the latest system gauges."""
        sql = (
            "SELECT function, CAST(SUM(invocations) AS BIGINT), CAST(SUM(errors) AS BIGINT),"
            " CAST(SUM(cache_hits) AS BIGINT), CAST(SUM(cache_misses) AS BIGINT),"
            " SUM(latency_sum_ms), MIN(interval_start), MAX(interval_end), COUNT(*)"
            " FROM fn_metrics WHERE device=?"
        )
        args: list[Any] = [device_id]
        if function is not None:
            sql += " AND function=?"
            args.append(function)

        def query(c: Conn) -> tuple[list[Any], int, Any]:
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
                system = json.loads(bytes(payload)).get("system") or {}
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
                value = json.loads(bytes(payload))
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


def _add_metrics(conn: Conn, record_id: int, device_id: str, doc: Mapping[str, Any]) -> None:
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
    if rows:
        conn.executemany("INSERT INTO fn_metrics VALUES (?,?,?,?,?,?,?,?,?,?)", rows)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

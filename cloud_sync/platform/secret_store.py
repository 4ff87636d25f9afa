"""The platform's secrets: sealed values, the devices' sealing keys, and what devices hold.

Plain portable SQL (TEXT/INTEGER/REAL, `INSERT ... ON CONFLICT ... DO UPDATE`, no SQLite-only
functions) over `runtimes.sqlitedb.Database`, so the PostgreSQL port can take it as it is.

Values are never stored in clear: `edge-cloud secret set` seals the value to the platform's own
secrets key (`PlatformSecretKey`, a P-256 key in `<data_dir>/secrets-key.pem`, mode 0600) before
it leaves the operator's machine, and this store keeps that box as it came. Why a key of its
own: the database (and every backup or dump of it, or a PostgreSQL server elsewhere) then holds
nothing usable; the key stays on the platform host beside the CA key and the operator token.
Delivery opens a box in memory and seals it again to the device (`secrets_api.py`).

Versions are per secret name across all its targets and only grow: every `set` of a name gets
the name's highest version + 1, so a device that moves from a group's value to its own still sees
a newer version, and "the device acknowledged version N" is unambiguous.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sync.errors import CloudSyncError
from cloud_sync.sealbox import private_key_from_pem
from runtimes.sqlitedb import Database

Scope = Literal["device", "group"]
KEY_FILE = "secrets-key.pem"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    target TEXT NOT NULL,
    version INTEGER NOT NULL,
    sealed TEXT NOT NULL,
    size INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, scope, target)
);
CREATE TABLE IF NOT EXISTS secret_device_keys (
    device_id TEXT PRIMARY KEY,
    public_pem TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS secret_acks (
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    acked_at REAL NOT NULL,
    PRIMARY KEY (device_id, name)
);
"""


class SecretStoreError(CloudSyncError):
    code = "secret_store_error"


@dataclass(frozen=True, slots=True)
class SecretRow:
    name: str
    scope: Scope
    target: str
    version: int
    sealed: dict[str, Any]  # the box sealed to the platform key
    size: int
    updated_at: float

    def listing(self) -> dict[str, Any]:
        """What `secret list` shows: never the box, never a value."""
        return {
            "name": self.name,
            "scope": self.scope,
            "target": self.target,
            "version": self.version,
            "size": self.size,
            "updated_at": self.updated_at,
        }


def load_or_create_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The platform's secrets key, created (0600, O_EXCL: never replaced) on first use."""
    path = Path(data_dir) / KEY_FILE
    try:
        return private_key_from_pem(path.read_bytes())
    except FileNotFoundError:
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return private_key_from_pem(path.read_bytes())
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)


class SecretStore:
    """Blocking: call from a thread (`asyncio.to_thread`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = Database(
            self.path, synchronous="FULL", setup=_create_schema, name="edgefn-secrets-db"
        )
        try:
            self._db.opened.result()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise SecretStoreError(f"cannot open the secret store {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def set(self, name: str, scope: Scope, target: str, sealed: dict[str, Any], size: int) -> int:
        """Store a new value of `name` for the target; returns its version."""
        box = json.dumps(sealed, sort_keys=True)

        def put(c: sqlite3.Connection) -> int:
            (top,) = c.execute(
                "SELECT COALESCE(MAX(version), 0) FROM secrets WHERE name = ?", (name,)
            ).fetchone()
            version = int(top) + 1
            c.execute(
                "INSERT INTO secrets (name, scope, target, version, sealed, size, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name, scope, target) DO UPDATE SET version = excluded.version,"
                " sealed = excluded.sealed, size = excluded.size,"
                " updated_at = excluded.updated_at",
                (name, scope, target, version, box, size, time.time()),
            )
            return version

        return self._db.write(put)

    def rows(self, scope: Scope | None = None, target: str | None = None) -> list[SecretRow]:
        sql = "SELECT name, scope, target, version, sealed, size, updated_at FROM secrets"
        args: tuple[Any, ...] = ()
        if scope is not None and target is not None:
            sql += " WHERE scope = ? AND target = ?"
            args = (scope, target)
        got = self._db.read(
            lambda c: c.execute(sql + " ORDER BY name, scope, target", args).fetchall()
        )
        return [
            SecretRow(n, s, t, int(v), json.loads(b), int(z), float(u))
            for (n, s, t, v, b, z, u) in got
        ]

    def for_device(self, device_id: str, groups: list[str]) -> dict[str, SecretRow]:
        """The secrets a device gets: its groups' (in order, the first group wins), then its
        own, which override a group's value of the same name."""
        out: dict[str, SecretRow] = {}
        for group in reversed(groups):
            out.update({r.name: r for r in self.rows("group", group)})
        out.update({r.name: r for r in self.rows("device", device_id)})
        return out

    def register_key(self, device_id: str, public_pem: str) -> None:
        self._db.write(
            lambda c: c.execute(
                "INSERT INTO secret_device_keys (device_id, public_pem, registered_at)"
                " VALUES (?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
                " public_pem = excluded.public_pem, registered_at = excluded.registered_at",
                (device_id, public_pem, time.time()),
            )
        )

    def device_key(self, device_id: str) -> str | None:
        row = self._db.read(
            lambda c: c.execute(
                "SELECT public_pem FROM secret_device_keys WHERE device_id = ?", (device_id,)
            ).fetchone()
        )
        return str(row[0]) if row is not None else None

    def ack(self, device_id: str, versions: dict[str, int]) -> None:
        """What the device reports holding now (names it no longer holds are forgotten)."""

        def put(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM secret_acks WHERE device_id = ?", (device_id,))
            now = time.time()
            for name, version in versions.items():
                c.execute(
                    "INSERT INTO secret_acks (device_id, name, version, acked_at)"
                    " VALUES (?, ?, ?, ?)",
                    (device_id, name, version, now),
                )

        self._db.write(put)

    def acks(self) -> dict[str, dict[str, int]]:
        """name -> {device: version it acknowledged}."""
        got = self._db.read(
            lambda c: c.execute(
                "SELECT name, device_id, version FROM secret_acks ORDER BY name, device_id"
            ).fetchall()
        )
        out: dict[str, dict[str, int]] = {}
        for name, device, version in got:
            out.setdefault(name, {})[device] = int(version)
        return out

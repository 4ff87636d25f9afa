"""Operator accounts for the console: a name and a password, stored as a scrypt hash only.

`edge-cloud operator create NAME` adds one (the password is read from the terminal or stdin,
never from the command line, where `ps` would show it). The table lives beside the registry
tables: in the platform store's SQLite file (`<data_dir>/registry.db`) by default, or in the
shared PostgreSQL database (`sql.Engine`), so every replica accepts every account. The
operator token stays the way in for scripts; accounts exist so that people need not share it.

Hash: `hashlib.scrypt` with n=2**14, r=8, p=1 (the parameters RFC 7914 suggests for
interactive logins, ~16 MB and some tens of ms per check), a 16-byte random salt per account;
the parameters are stored per row so they can be raised later without breaking old accounts.
A check compares in constant time, and a check for an unknown name still runs scrypt once, so
the response time does not tell which names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.sql import Engine, IntegrityError, Migration, SqlError, SqliteEngine

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Short passwords are guessed offline from a stolen file in minutes even through scrypt.
MIN_PASSWORD = 12
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    salt {blob} NOT NULL,
    hash {blob} NOT NULL,
    n INTEGER NOT NULL,
    r INTEGER NOT NULL,
    p INTEGER NOT NULL,
    created_at {real} NOT NULL
);
"""
MIGRATIONS = (
    Migration(
        1,
        "operators",
        _SCHEMA.format(blob="BLOB", real="REAL"),
        _SCHEMA.format(blob="BYTEA", real="DOUBLE PRECISION"),
    ),
)


class OperatorAccountError(CloudSyncError):
    code = "operator_account_error"
    category = "config"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem above the 128*n*r bytes scrypt needs; OpenSSL's default cap is 32 MB.
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=64 << 20
    )


# Checked against when the name is unknown, so both paths cost one scrypt.
_DUMMY_SALT = secrets.token_bytes(SALT_BYTES)


class OperatorAccounts:
    """Create, list and check operator accounts (blocking: async callers use to_thread)."""

    def __init__(self, where: Path | Engine) -> None:
        """`where`: the SQLite file (opened and owned here) or an engine (`sql.Databases`)."""
        try:
            if isinstance(where, Path | str):
                self._db: Engine = SqliteEngine(
                    where, synchronous="FULL", name="edgefn-operators-db"
                )
            else:
                self._db = where
        except SqlError as exc:
            raise OperatorAccountError(
                f"cannot open the operator accounts in {where}: {exc}"
            ) from exc
        try:
            self._db.migrate("operators", MIGRATIONS)
        except SqlError as exc:
            self._db.close()
            raise OperatorAccountError(f"cannot open the operator accounts: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def create(self, name: str, password: str) -> None:
        if not NAME_RE.match(name):
            raise OperatorAccountError(
                f"operator name {name!r}: use 1-64 of a-z 0-9 . _ - (starting alnum)"
            )
        if len(password) < MIN_PASSWORD:
            raise OperatorAccountError(f"the password needs at least {MIN_PASSWORD} characters")
        salt = secrets.token_bytes(SALT_BYTES)
        digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        row = (name, salt, digest, SCRYPT_N, SCRYPT_R, SCRYPT_P, time.time())
        try:
            self._db.write(
                lambda c: c.execute("INSERT INTO operators VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            )
        except IntegrityError as exc:
            raise OperatorAccountError(f"operator {name!r} exists already") from exc

    def names(self) -> list[str]:
        rows = self._db.read(
            lambda c: c.execute("SELECT name FROM operators ORDER BY name").fetchall()
        )
        return [name for (name,) in rows]

    def verify(self, name: str, password: str) -> bool:
        row = self._db.read(
            lambda c: c.execute(
                "SELECT salt, hash, n, r, p FROM operators WHERE name=?", (name,)
            ).fetchone()
        )
        if row is None:
            _scrypt(password, _DUMMY_SALT, SCRYPT_N, SCRYPT_R, SCRYPT_P)
            return False
        salt, stored, n, r, p = row
        return hmac.compare_digest(_scrypt(password, bytes(salt), n, r, p), bytes(stored))

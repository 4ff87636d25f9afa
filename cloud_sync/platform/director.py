"""The director (Uptane's director role): every desired document the platform sends is signed.

Why: rollouts travel over MQTT, and anyone with a broker position (a leaked broker password, a
misconfigured ACL, a hostile network in front of a plain-MQTT broker) could publish a device's
retained desired document -- "roll back to the old version" -- and the device would obey. Now
each document leaves wrapped in an envelope (format in `cloud_sync.director_check`, which is
also what devices run) that names the device (or group), carries a per-scope counter that only
grows, an expiry, and the sha256 of every bundle version it names, signed with the director
key. The public half goes into every credentials file at enrolment (`director_key`).

Files under the platform data dir:

    director/director.key       Ed25519 private key, PEM PKCS#8, 0600 (online: the platform
                                signs with it unattended); `director.key.pub` beside it
    director.db                 SQLite (WAL): per scope ("device:<id>" / "group:<name>") the
                                last counter and the envelope issued with it

`ensure_director_key(data_dir)` creates the key when missing; `edge-cloud serve` calls it at
start and `edge-cloud tuf init` may call it too. `Director.instruction(...)` is the one way to
get an envelope: inside one write transaction it returns the stored envelope when it still
holds the same document and has more than `RENEW_FRACTION` of its lifetime left (so an HTTP poll
or a republish on reconnect is byte-identical, and a device sees a redelivery, not a replay),
else signs the document under the next counter. `due()` names the scopes to re-issue before
they expire (the MQTT intake republishes them). All methods block: call them in a thread.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.director_check import ENVELOPE_TYPE, canonical, key_id
from cloud_sync.errors import CloudSyncError
from runtimes.errors import BundleError
from runtimes.signing import create_keypair, load_private_key, public_key_to_pem
from runtimes.sqlitedb import Database

KEY_DIR = "director"
KEY_FILE = "director.key"
DB_FILE = "director.db"
# An instruction lives a week: long enough that a device offline over a holiday still trusts
# what it last received when it comes back (expired means "refuse new ones", not "stop"), short
# enough that a captured instruction is useless within days. `--director-ttl-s` changes it.
DEFAULT_TTL_S = 7 * 86_400
# Under a minute, devices with a slow clock or a slow link would refuse fresh instructions.
MIN_TTL_S = 60
# Re-issue once less than half the lifetime is left: a device that polls or reconnects within
# that half always holds an instruction with days to spare.
RENEW_FRACTION = 0.5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS director_instructions (
    scope TEXT PRIMARY KEY,
    counter INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    envelope TEXT NOT NULL
);
"""

# (function, version) -> the bundle's sha256 (hex) in the registry, or None if not published.
DigestLookup = Callable[[str, str], str | None]


class DirectorError(CloudSyncError):
    code = "director_error"
    category = "storage"


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_DIR / KEY_FILE


def ensure_director_key(data_dir: Path) -> Path:
    """The director key's path, creating the key (0600, never overwritten) when missing."""
    path = key_path(data_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            create_keypair(path)
        except BundleError as exc:
            if exc.code != "key_exists":  # another process created it first: use that one
                raise DirectorError(f"cannot create the director key: {exc.message}") from exc
    return path


def load_director_key(data_dir: Path) -> Ed25519PrivateKey:
    try:
        return load_private_key(ensure_director_key(data_dir))
    except BundleError as exc:
        raise DirectorError(f"director key: {exc.message}", code="director_key_bad") from exc


def public_pem(data_dir: Path) -> str:
    """What enrolment writes into the credentials file as `director_key`."""
    return public_key_to_pem(load_director_key(data_dir)).decode()


@dataclass(frozen=True, slots=True)
class Issued:
    scope: str
    counter: int
    expires: int


class Director:
    """Signs desired documents for devices and groups; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        digests: DigestLookup,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s < MIN_TTL_S:
            raise DirectorError(
                f"director TTL must be at least {MIN_TTL_S} s, got {ttl_s}", code="bad_director_ttl"
            )
        self.key = load_director_key(data_dir)
        self.key_id = key_id(self.key.public_key())
        self.public_pem = public_key_to_pem(self.key).decode()
        self.digests = digests
        self.ttl_s = int(ttl_s)
        self.clock = clock
        path = Path(data_dir) / DB_FILE
        self._db = Database(path, synchronous="FULL", setup=_schema, name="edgefn-director-db")
        try:
            self._db.opened.result()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise DirectorError(f"cannot open {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def for_device(self, device_id: str, document: Mapping[str, Any]) -> dict[str, Any]:
        return self.instruction("device", device_id, document)

    def for_group(self, name: str, document: Mapping[str, Any]) -> dict[str, Any]:
        return self.instruction("group", name, document)

    def instruction(self, kind: str, name: str, document: Mapping[str, Any]) -> dict[str, Any]:
        """The envelope for `document` sent to device/group `name`: the stored one while it
        still fits, else a new one under the next counter (one write transaction, so two
        callers never sign two different envelopes under one counter)."""
        scope = f"{kind}:{name}"
        doc = json.loads(canonical(document))  # a plain JSON copy, as the device will see it
        targets = self._targets(doc)
        now = int(self.clock())
        # FULL sync: a counter handed out and then lost in a power cut would be reused.

        def issue(c: sqlite3.Connection) -> dict[str, Any]:
            row = c.execute(
                "SELECT counter, expires, envelope FROM director_instructions WHERE scope=?",
                (scope,),
            ).fetchone()
            if row is not None:
                counter, expires, raw = row
                stored = json.loads(raw)
                fresh = expires - now > self.ttl_s * RENEW_FRACTION
                same = stored["signed"]["document"] == doc
                if fresh and same and stored["signed"].get("targets") == targets:
                    return dict(stored)
            counter = (int(row[0]) if row else 0) + 1
            signed = {
                "_type": ENVELOPE_TYPE,
                kind: name,
                "counter": counter,
                "issued": now,
                "expires": now + self.ttl_s,
                "document": doc,
                "targets": targets,
            }
            sig = base64.b64encode(self.key.sign(canonical(signed))).decode()
            envelope = {"signed": signed, "signatures": [{"keyid": self.key_id, "sig": sig}]}
            c.execute(
                "INSERT INTO director_instructions (scope, counter, issued, expires, envelope)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(scope) DO UPDATE SET"
                " counter=excluded.counter, issued=excluded.issued, expires=excluded.expires,"
                " envelope=excluded.envelope",
                (scope, counter, now, now + self.ttl_s, json.dumps(envelope)),
            )
            return envelope

        try:
            return self._db.write(issue)
        except sqlite3.Error as exc:
            raise DirectorError(f"cannot issue an instruction for {scope}: {exc}") from exc

    def due(self) -> list[tuple[str, str]]:
        """(kind, name) of every scope whose instruction has less than RENEW_FRACTION left."""
        limit = int(self.clock()) + int(self.ttl_s * RENEW_FRACTION)
        rows = self._db.read(
            lambda c: c.execute(
                "SELECT scope FROM director_instructions WHERE expires <= ? ORDER BY scope",
                (limit,),
            ).fetchall()
        )
        out = []
        for (scope,) in rows:
            kind, _, name = str(scope).partition(":")
            out.append((kind, name))
        return out

    def issued(self, kind: str, name: str) -> Issued | None:
        row = self._db.read(
            lambda c: c.execute(
                "SELECT counter, expires FROM director_instructions WHERE scope=?",
                (f"{kind}:{name}",),
            ).fetchone()
        )
        return Issued(f"{kind}:{name}", int(row[0]), int(row[1])) if row else None

    def _targets(self, doc: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """Every function version the document names, with its bundle digest from the registry
        (so the device can check the TUF target it downloads is this very bundle)."""
        config = doc.get("config")
        functions = config.get("functions") if isinstance(config, Mapping) else None
        out: dict[str, dict[str, str]] = {}
        if not isinstance(functions, Mapping):
            return out
        for name, entry in sorted(functions.items()):
            version = entry.get("version") if isinstance(entry, Mapping) else None
            if not isinstance(version, str):
                continue
            digest = self.digests(str(name), version)
            if digest:
                out[str(name)] = {"version": version, "digest": digest}
        return out


def _schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)

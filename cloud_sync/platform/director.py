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
                                last counter and the envelope issued with it; with
                                `--database postgresql://...` that table is in the shared
                                database instead, so every replica counts on from the same row

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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.director_check import ENVELOPE_TYPE, canonical, key_id
from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.sql import Conn, Engine, Migration, SqlError, SqliteEngine
from runtimes.errors import BundleError
from runtimes.signing import create_keypair, load_private_key, public_key_to_pem

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

COMPONENT = "director"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS director_instructions (
    scope TEXT PRIMARY KEY,
    counter {int} NOT NULL,
    issued {int} NOT NULL,
    expires {int} NOT NULL,
    envelope TEXT NOT NULL
);
"""
# Step 1 is the table the SQLite file always had (IF NOT EXISTS: an existing file is kept).
MIGRATIONS = (
    Migration(
        1, "director_instructions", _SCHEMA.format(int="INTEGER"), _SCHEMA.format(int="BIGINT")
    ),
)

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


class _Current(Exception):
    """Internal: another writer issued a fitting envelope while this one waited for the row:
    undo this transaction's increment and hand out that envelope."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        self.envelope = envelope


class Director:
    """Signs desired documents for devices and groups; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        digests: DigestLookup,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
        engine: Engine | None = None,
    ) -> None:
        """`engine`: the shared database (`sql.Databases`); None opens `<data_dir>/director.db`.
        The key is a file in `data_dir` either way (replicas must share it, like the CA)."""
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
        where = Path(data_dir) / DB_FILE if engine is None else "the database"
        try:
            # FULL sync: a counter handed out and then lost in a power cut would be reused.
            self._db: Engine = engine or SqliteEngine(
                where, synchronous="FULL", name="edgefn-director-db"
            )
        except SqlError as exc:
            raise DirectorError(f"cannot open {where}: {exc}") from exc
        try:
            self._db.migrate(COMPONENT, MIGRATIONS)
        except SqlError as exc:
            self._db.close()
            raise DirectorError(f"cannot open the director store in {where}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def for_device(self, device_id: str, document: Mapping[str, Any]) -> dict[str, Any]:
        return self.instruction("device", device_id, document)

    def for_group(self, name: str, document: Mapping[str, Any]) -> dict[str, Any]:
        return self.instruction("group", name, document)

    def instruction(self, kind: str, name: str, document: Mapping[str, Any]) -> dict[str, Any]:
        """The envelope for `document` sent to device/group `name`: the stored one while it
        still fits, else a new one under the next counter. The counter is taken by one upsert
        (`counter + 1 ... RETURNING`), whose row lock makes every other writer of the scope, on
        any replica, wait for this transaction: two callers never get one counter, and one that
        waited finds the envelope just issued and hands that out if it fits."""
        scope = f"{kind}:{name}"
        doc = json.loads(canonical(document))  # a plain JSON copy, as the device will see it
        targets = self._targets(doc)
        now = int(self.clock())

        def fits(expires: int, raw: str) -> dict[str, Any] | None:
            if not raw or expires - now <= self.ttl_s * RENEW_FRACTION:
                return None  # due for renewal, or the placeholder of a row just created
            stored: dict[str, Any] = json.loads(raw)
            signed = stored["signed"]
            same = signed["document"] == doc and signed.get("targets") == targets
            return stored if same else None

        def issue(c: Conn) -> dict[str, Any]:
            row = c.execute(
                "SELECT expires, envelope FROM director_instructions WHERE scope=?", (scope,)
            ).fetchone()
            if row is not None and (stored := fits(int(row[0]), str(row[1]))) is not None:
                return stored
            counter, expires, raw = c.execute(
                "INSERT INTO director_instructions (scope, counter, issued, expires, envelope)"
                " VALUES (?, 1, ?, ?, '') ON CONFLICT(scope) DO UPDATE SET"
                " counter = director_instructions.counter + 1"
                " RETURNING counter, expires, envelope",
                (scope, now, now),
            ).fetchone()
            if (current := fits(int(expires), str(raw))) is not None:
                raise _Current(current)  # rolls the increment back
            signed = {
                "_type": ENVELOPE_TYPE,
                kind: name,
                "counter": int(counter),
                "issued": now,
                "expires": now + self.ttl_s,
                "document": doc,
                "targets": targets,
            }
            sig = base64.b64encode(self.key.sign(canonical(signed))).decode()
            envelope = {"signed": signed, "signatures": [{"keyid": self.key_id, "sig": sig}]}
            c.execute(
                "UPDATE director_instructions SET issued=?, expires=?, envelope=? WHERE scope=?",
                (now, now + self.ttl_s, json.dumps(envelope), scope),
            )
            return envelope

        try:
            return self._db.write(issue)  # not idempotent: a retry would take another counter
        except _Current as got:
            return got.envelope
        except SqlError as exc:
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

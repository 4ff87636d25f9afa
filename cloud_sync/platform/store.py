"""Where the registry keeps bundles and what it knows about them, behind one narrow interface.

`RegistryStore` is everything the registry handlers use: blobs by sha256 digest (spool an upload,
put it, size it, open it for reading at an offset) and version records (add, list, get). The
default `LocalStore` keeps metadata in SQLite (WAL) and blobs in a content-addressed
directory; a deployment that outgrows one machine swaps in PostgreSQL + an S3-compatible object
store behind the same methods (uploads are spooled to a local file first either way).

Layout of `LocalStore` (the blob half is a `blobs.BlobStore`: this directory by default, a
shared directory or an S3-compatible bucket with `--blobs`):

    <data_dir>/registry.db                    table `versions`, primary key (name, version)
    <data_dir>/blobs/sha256/<d[:2]>/<d>       one file per bundle, named by its sha256
    <data_dir>/blobs/uploads/                 uploads in progress (removed on any failure)

Order of a publish: spool -> verify (the caller) -> `put_blob` (rename into place, fsync) ->
`add_version`. A crash in between leaves at most an unreferenced blob, never a record without
its blob. Blobs are immutable: a digest names exactly one byte string.

All methods block (SQLite, file I/O): async callers use `asyncio.to_thread`. The metadata goes
through an `sql.Engine`: the registry.db SQLite file by default (the shared `runtimes.sqlitedb`
pattern: one writer thread, reads on a connection per calling thread), or the shared PostgreSQL
database with `--database` (`engine=`). The schema is versioned migrations (`_MIGRATIONS`); the
SQLite step 1 is the table sqlite-utils used to create, so older files open unchanged.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.sql import Engine, IntegrityError, Migration, SqlError, SqliteEngine
from runtimes.manifest import semver_key

if TYPE_CHECKING:
    from cloud_sync.platform.blobs import BlobStore

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreError(CloudSyncError):
    code = "store_error"
    category = "storage"


class VersionConflict(StoreError):
    """name@version is already published with other bytes: versions are immutable."""

    code = "version_conflict"


@dataclass(frozen=True, slots=True)
class VersionRecord:
    name: str
    version: str
    digest: str  # sha256 of the whole bundle file, lowercase hex
    size: int
    runtime: str
    arches: tuple[str, ...]  # artifact keys; empty = arch-independent
    publisher: str  # key id of the signing key named in the manifest
    created_at: str  # from the signed manifest
    published_at: str  # when the registry accepted it (UTC, RFC 3339)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": f"sha256:{self.digest}",
            "size": self.size,
            "runtime": self.runtime,
            "arches": list(self.arches),
            "publisher": self.publisher,
            "created_at": self.created_at,
            "published_at": self.published_at,
        }


@dataclass(frozen=True, slots=True)
class FunctionSummary:
    name: str
    latest: str
    versions: int


class RegistryStore(Protocol):
    """The registry's whole view of storage. Blocking; see the module docstring."""

    def new_upload(self) -> Path:
        """A fresh local file to spool an upload into; the caller removes it on failure."""
        ...

    def put_blob(self, spooled: Path, digest: str) -> None:
        """Move a spooled upload whose sha256 is `digest` into the blob store (idempotent)."""
        ...

    def blob_size(self, digest: str) -> int | None:
        """Size of the blob, or None when the store does not have it."""
        ...

    def open_blob(self, digest: str) -> BinaryIO:
        """The blob's bytes, seekable. Raises StoreError when missing."""
        ...

    def add_version(self, record: VersionRecord) -> bool:
        """Record a published version. True: new; False: the same digest was already there.
        Raises VersionConflict when name@version exists with another digest."""
        ...

    def get_version(self, name: str, version: str) -> VersionRecord | None: ...

    def list_versions(self, name: str) -> list[VersionRecord]:
        """All versions of `name`, oldest first by semver precedence."""
        ...

    def list_functions(self) -> list[FunctionSummary]: ...

    def close(self) -> None: ...


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# The `versions` columns, in the order of VersionRecord's fields (the SQL below names them).
_VERSION_COLUMNS = (
    "name", "version", "digest", "size", "runtime", "arches", "publisher", "created_at",
    "published_at",
)  # fmt: skip
_SELECT_VERSION = f"SELECT {', '.join(_VERSION_COLUMNS)} FROM versions"


_VERSIONS = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT, version TEXT, digest TEXT, size {int}, runtime TEXT, arches TEXT, publisher TEXT,
    created_at TEXT, published_at TEXT,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS idx_versions_digest ON versions (digest);
"""
_MIGRATIONS = (
    Migration(1, "versions", _VERSIONS.format(int="INTEGER"), _VERSIONS.format(int="BIGINT")),
)


class LocalStore:
    """Metadata in SQLite or PostgreSQL (`engine`) + a blob store (default: the content-addressed
    directory `blobs_dir`; `blobs.py` has the S3 one)."""

    def __init__(
        self,
        db_path: Path,
        blobs_dir: Path,
        *,
        engine: Engine | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        # The blob half lives behind `blobs.BlobStore` (a directory or S3, blobs.py).
        from cloud_sync.platform.blobs import FileBlobStore

        self._blobs: BlobStore = blobs if blobs is not None else FileBlobStore(blobs_dir)
        try:
            # FULL: a publish is rare and must survive power loss.
            self._db = engine or SqliteEngine(
                db_path, synchronous="FULL", name="edgefn-registry-db"
            )
            self._db.migrate("registry", _MIGRATIONS)
        except SqlError as exc:
            if hasattr(self, "_db"):
                self._db.close()
            raise StoreError(f"cannot open the registry store in {db_path.parent}: {exc}") from exc

    # -- blobs: delegated -------------------------------------------------------------------

    def new_upload(self) -> Path:
        return self._blobs.new_upload()

    def put_blob(self, spooled: Path, digest: str) -> None:
        self._blobs.put_blob(spooled, digest)

    def blob_size(self, digest: str) -> int | None:
        return self._blobs.blob_size(digest)

    def open_blob(self, digest: str) -> BinaryIO:
        return self._blobs.open_blob(digest)

    # -- metadata ---------------------------------------------------------------------------

    @staticmethod
    def _record(row: tuple[Any, ...]) -> VersionRecord:
        values = dict(zip(_VERSION_COLUMNS, row, strict=True))
        values["arches"] = tuple(json.loads(values["arches"]))
        return VersionRecord(**values)

    def add_version(self, record: VersionRecord) -> bool:
        values = {f.name: getattr(record, f.name) for f in fields(VersionRecord)}
        values["arches"] = json.dumps(list(record.arches))
        values["published_at"] = record.published_at or _utc_now()
        row = tuple(values[c] for c in _VERSION_COLUMNS)
        insert = (
            f"INSERT INTO versions ({', '.join(_VERSION_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_VERSION_COLUMNS))})"
        )
        try:
            # Idempotent: a retry after a lost commit finds the row and answers "not new".
            self._db.write(lambda c: c.execute(insert, row), idempotent=True)
            return True
        except IntegrityError:
            existing = self.get_version(record.name, record.version)
        except SqlError as exc:
            raise StoreError(f"cannot record {record.name}@{record.version}: {exc}") from exc
        if existing is not None and existing.digest == record.digest:
            return False
        raise VersionConflict(
            f"{record.name}@{record.version} is already published with digest "
            f"sha256:{existing.digest if existing else '?'}; versions are immutable, "
            "publish a new version"
        )

    def get_version(self, name: str, version: str) -> VersionRecord | None:
        row = self._db.read(
            lambda c: c.execute(
                f"{_SELECT_VERSION} WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
        )
        return self._record(row) if row else None

    def list_versions(self, name: str) -> list[VersionRecord]:
        rows = self._db.read(
            lambda c: c.execute(f"{_SELECT_VERSION} WHERE name = ?", (name,)).fetchall()
        )
        return sorted(map(self._record, rows), key=lambda r: semver_key(r.version))

    def list_functions(self) -> list[FunctionSummary]:
        rows = self._db.read(lambda c: c.execute("SELECT name, version FROM versions").fetchall())
        by_name: dict[str, list[str]] = {}
        for name, version in rows:
            by_name.setdefault(name, []).append(version)
        return [
            FunctionSummary(name, max(vs, key=semver_key), len(vs))
            for name, vs in sorted(by_name.items())
        ]

    def close(self) -> None:
        self._db.close()
        self._blobs.close()

"""Where the registry keeps bundles and what it knows about them, behind one narrow interface.

`RegistryStore` is everything the registry handlers use: blobs by sha256 digest (spool an upload,
put it, size it, open it for reading at an offset) and version records (add, list, get). The
default `LocalStore` keeps metadata in SQLite (sqlite-utils, WAL) and blobs in a content-addressed
directory; a deployment that outgrows one machine swaps in PostgreSQL + an S3-compatible object
store behind the same methods (uploads are spooled to a local file first either way).

Layout of `LocalStore`:

    <data_dir>/registry.db                    table `versions`, primary key (name, version)
    <data_dir>/blobs/sha256/<d[:2]>/<d>       one file per bundle, named by its sha256
    <data_dir>/blobs/uploads/                 uploads in progress (removed on any failure)

Order of a publish: spool -> verify (the caller) -> `put_blob` (rename into place, fsync) ->
`add_version`. A crash in between leaves at most an unreferenced blob, never a record without
its blob. Blobs are immutable: a digest names exactly one byte string.

All methods block (SQLite, file I/O): async callers use `asyncio.to_thread`. One connection,
guarded by a lock, serves all threads: the registry's write rate is a human publishing.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import sqlite_utils

from cloud_sync.errors import CloudSyncError
from runtimes.fsio import fsync_dir
from runtimes.manifest import semver_key

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


class LocalStore:
    """SQLite metadata + content-addressed blob directory (the default)."""

    def __init__(self, db_path: Path, blobs_dir: Path) -> None:
        self._blobs = Path(blobs_dir)
        self._uploads = self._blobs / "uploads"
        try:
            self._uploads.mkdir(parents=True, exist_ok=True)
            (self._blobs / "sha256").mkdir(exist_ok=True)
            conn = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the registry store in {db_path.parent}: {exc}") from exc
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a publish is rare and must survive power loss
        self._db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()
        if "versions" not in self._db.table_names():
            self._db.table("versions").create(
                {
                    "name": str,
                    "version": str,
                    "digest": str,
                    "size": int,
                    "runtime": str,
                    "arches": str,
                    "publisher": str,
                    "created_at": str,
                    "published_at": str,
                },
                pk=("name", "version"),
            )
            self._db.table("versions").create_index(["digest"])
        # Uploads a crash interrupted are garbage: nobody references them.
        for leftover in self._uploads.iterdir():
            leftover.unlink(missing_ok=True)

    # -- blobs ------------------------------------------------------------------------------

    def _blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise StoreError(f"not a sha256 digest: {digest!r}", code="bad_digest")
        return self._blobs / "sha256" / digest[:2] / digest

    def new_upload(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self._uploads)
        os.close(fd)
        return Path(name)

    def put_blob(self, spooled: Path, digest: str) -> None:
        dest = self._blob_path(digest)
        try:
            dest.parent.mkdir(exist_ok=True)
            with open(spooled, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(spooled, 0o644)
            os.replace(spooled, dest)  # same content if it existed: content-addressed
            fsync_dir(dest.parent)
        except OSError as exc:
            raise StoreError(f"cannot store blob {digest}: {exc}") from exc

    def blob_size(self, digest: str) -> int | None:
        try:
            return self._blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self._blob_path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} not found", code="not_found") from None

    # -- metadata ---------------------------------------------------------------------------

    @staticmethod
    def _record(row: dict[str, Any]) -> VersionRecord:
        return VersionRecord(
            name=row["name"],
            version=row["version"],
            digest=row["digest"],
            size=row["size"],
            runtime=row["runtime"],
            arches=tuple(json.loads(row["arches"])),
            publisher=row["publisher"],
            created_at=row["created_at"],
            published_at=row["published_at"],
        )

    def add_version(self, record: VersionRecord) -> bool:
        row = {
            "name": record.name,
            "version": record.version,
            "digest": record.digest,
            "size": record.size,
            "runtime": record.runtime,
            "arches": json.dumps(list(record.arches)),
            "publisher": record.publisher,
            "created_at": record.created_at,
            "published_at": record.published_at or _utc_now(),
        }
        with self._lock:
            try:
                self._db.table("versions").insert(row)
                return True
            except sqlite3.IntegrityError:
                existing = self._get(record.name, record.version)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot record {record.name}@{record.version}: {exc}") from exc
        if existing is not None and existing.digest == record.digest:
            return False
        raise VersionConflict(
            f"{record.name}@{record.version} is already published with digest "
            f"sha256:{existing.digest if existing else '?'}; versions are immutable, "
            "publish a new version"
        )

    def _get(self, name: str, version: str) -> VersionRecord | None:
        rows = list(
            self._db.table("versions").rows_where(
                "name = ? and version = ?", [name, version], limit=1
            )
        )
        return self._record(rows[0]) if rows else None

    def get_version(self, name: str, version: str) -> VersionRecord | None:
        with self._lock:
            return self._get(name, version)

    def list_versions(self, name: str) -> list[VersionRecord]:
        with self._lock:
            rows = list(self._db.table("versions").rows_where("name = ?", [name]))
        return sorted((self._record(r) for r in rows), key=lambda r: semver_key(r.version))

    def list_functions(self) -> list[FunctionSummary]:
        with self._lock:
            rows: Sequence[dict[str, Any]] = list(
                self._db.table("versions").rows_where(select="name, version")
            )
        by_name: dict[str, list[str]] = {}
        for r in rows:
            by_name.setdefault(r["name"], []).append(r["version"])
        return [
            FunctionSummary(name, max(vs, key=semver_key), len(vs))
            for name, vs in sorted(by_name.items())
        ]

    def close(self) -> None:
        with self._lock:
            self._db.conn.close()

"""Where bundle bytes live: the `BlobStore` interface and its filesystem implementation.

Blobs are content-addressed by their sha256 and immutable, so a blob store needs only four
operations: spool an upload to a local file, put it under its digest, size it, open it for
reading at an offset. The registry's metadata (which name@version has which digest) lives
elsewhere (`store.py`); a `LocalStore` delegates its blob methods to one of these.

Implementations, picked by URL (`open_blob_store`, `edge-cloud serve --blobs URL`):

    file:///PATH (or no URL)   `FileBlobStore`: a directory, the data dir's own `blobs/` by
                               default; a shared directory (NFS...) serves several replicas
    s3://BUCKET?endpoint=URL   `S3BlobStore` (blobs_s3.py): an S3-compatible object store

Layout of `FileBlobStore` (unchanged from when it lived in store.py, so old data dirs work):

    <root>/sha256/<d[:2]>/<d>       one file per bundle, named by its sha256
    <root>/uploads/                 uploads in progress (removed on any failure, and at open
                                    when older than an hour)

Every method blocks (file or network I/O): async callers use `asyncio.to_thread`. A store that
cannot be reached raises `BlobStoreUnavailable`, which the registry answers with 503 (code
`blob_store_unavailable`) so a device retries later and resumes with a Range request.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import BinaryIO, Protocol

from cloud_sync.platform.store import DIGEST_RE, StoreError
from runtimes.fsio import fsync_dir

# A spooled upload older than this is a crash's leftover: a publish spools, inspects and stores
# a bundle (at most 512 MiB) in minutes, never in an hour.
STALE_UPLOAD_S = 3600.0


class BlobStoreUnavailable(StoreError):
    """The blob store cannot be reached right now (network, server down); try again later."""

    code = "blob_store_unavailable"
    # Worth retrying: nothing is wrong with the request (StoreError's own is "storage").
    category = "transport"  # type: ignore[assignment]


class BlobStore(Protocol):
    """Content-addressed, immutable blobs. Blocking; see the module docstring."""

    def new_upload(self) -> Path:
        """A fresh local file to spool an upload into; the caller removes it on failure."""
        ...

    def put_blob(self, spooled: Path, digest: str) -> None:
        """Store a spooled upload whose sha256 is `digest` (idempotent); the caller removes
        `spooled` afterwards if it is still there."""
        ...

    def blob_size(self, digest: str) -> int | None:
        """Size of the blob, or None when the store does not have it."""
        ...

    def open_blob(self, digest: str) -> BinaryIO:
        """The blob's bytes, seekable. Raises StoreError (code not_found) when missing."""
        ...

    def close(self) -> None: ...


def check_digest(digest: str) -> str:
    """`digest` when it is lowercase sha256 hex; a path or key is never built from anything else."""
    if not DIGEST_RE.match(digest):
        raise StoreError(f"not a sha256 digest: {digest!r}", code="bad_digest")
    return digest


class FileBlobStore:
    """Blobs in a directory (the default): rename into place, fsync, read with plain files."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._uploads = self._root / "uploads"
        try:
            self._uploads.mkdir(parents=True, exist_ok=True)
            (self._root / "sha256").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open the blob store in {self._root}: {exc}") from exc
        # Uploads a crash interrupted are garbage: nobody references them. Only old ones go:
        # on a directory shared by replicas, a young one may be another replica's publish.
        cutoff = time.time() - STALE_UPLOAD_S
        for leftover in self._uploads.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()

    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self._root / "sha256" / digest[:2] / digest

    def new_upload(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self._uploads)
        os.close(fd)
        return Path(name)

    def put_blob(self, spooled: Path, digest: str) -> None:
        dest = self._path(digest)
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
            return self._path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self._path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} not found", code="not_found") from None

    def close(self) -> None:
        pass


def open_blob_store(url: str | None, default_dir: Path, spool_dir: Path) -> BlobStore:
    """The blob store a `--blobs` URL names; None or "" is `default_dir` on the filesystem.

    `spool_dir` is where an object store spools uploads (a local directory of the platform).
    Raises StoreError (code bad_blobs_url) for a URL it does not understand.
    """
    if not url:
        return FileBlobStore(default_dir)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise StoreError(
                f"--blobs {url!r}: a file URL names an absolute local path, file:///PATH",
                code="bad_blobs_url",
            )
        return FileBlobStore(Path(urllib.parse.unquote(parsed.path)))
    if parsed.scheme == "s3":
        from cloud_sync.platform.blobs_s3 import S3BlobStore, S3Location

        return S3BlobStore(S3Location.from_url(url), spool_dir)
    raise StoreError(
        f"--blobs {url!r}: expected file:///PATH or s3://BUCKET?endpoint=URL",
        code="bad_blobs_url",
    )

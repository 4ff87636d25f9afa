"""Bundles in an S3-compatible object store: `edge-cloud serve --blobs s3://BUCKET?endpoint=URL`.

Same content addressing as the directory store: a blob is the object `[prefix/]sha256/<d[:2]>/<d>`
and never changes once written, so a size once seen may be cached and a put of a digest that is
already there with the same size is skipped.

* Upload: the registry spools the request body to a local file first (it must hash and inspect
  it before accepting it); `put_blob` then uploads that file with boto3's transfer manager,
  which switches to a multipart upload above `MULTIPART_BYTES` and aborts the parts on failure.
* Size: a HEAD of the object.
* Read: `open_blob` returns a seekable reader whose reads are HTTP Range GETs of at most
  `MAX_RANGE_BYTES`, so serving `Range: bytes=N-` to a device never fetches the bytes before N
  and never holds a whole bundle in memory.

Credentials are boto3's own chain: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (systemd
`EnvironmentFile=` or `LoadCredential=`), `AWS_SHARED_CREDENTIALS_FILE`/`~/.aws/credentials`, or an
instance role. Never in the URL: a URL with user:password is refused, it would end up on a
command line and in logs.

A store that cannot be reached (connection refused or reset, timeouts, 5xx answers after
botocore's retries) raises `BlobStoreUnavailable`; everything blocks, so async callers use
`asyncio.to_thread`.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import botocore.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from cloud_sync.platform.blobs import BlobStoreUnavailable, check_digest
from cloud_sync.platform.store import StoreError

# Above this a put is a multipart upload in parts of this size: S3's minimum part is 5 MiB,
# and 8 MiB is boto3's own default, so a 512 MiB bundle is 64 parts.
MULTIPART_BYTES = 8 << 20
# One ranged GET per read, at most this long: bounded memory per download, and a few requests
# per bundle (the registry reads 1 MiB at a time).
MAX_RANGE_BYTES = 8 << 20
# Connect fast (a dead endpoint is found in seconds, and the device told to retry); reads get
# longer because a busy store may pause. Retries: botocore's "standard" mode, a few attempts
# with backoff, so a blip is absorbed and an outage is an answer within seconds.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 3
# Sizes of immutable blobs seen recently: saves the HEAD that every download would repeat.
SIZE_CACHE_ENTRIES = 4096
_QUERY_KEYS = frozenset({"endpoint", "region", "prefix"})

# What botocore raises when the store is not there or stops answering.
_UNREACHABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.HTTPClientError,
)


@dataclass(frozen=True, slots=True)
class S3Location:
    """Which bucket on which endpoint, parsed from `s3://BUCKET[/PREFIX]?endpoint=URL&region=R`."""

    bucket: str
    endpoint: str | None = None  # None: AWS itself, from the region
    region: str | None = None
    prefix: str = ""

    @classmethod
    def from_url(cls, url: str) -> S3Location:
        parsed = urllib.parse.urlsplit(url)

        def bad(why: str) -> StoreError:
            return StoreError(f"--blobs {_redact(url)}: {why}", code="bad_blobs_url")

        if parsed.scheme != "s3" or not parsed.hostname:
            raise bad("expected s3://BUCKET?endpoint=URL")
        if parsed.username or parsed.password:
            raise bad(
                "credentials do not belong in the URL (command lines and logs show it): set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a credentials file"
            )
        try:
            query = urllib.parse.parse_qs(parsed.query, strict_parsing=bool(parsed.query))
        except ValueError:
            raise bad("the query is not key=value pairs") from None
        unknown = set(query) - _QUERY_KEYS
        if unknown:
            raise bad(f"unknown parameter {sorted(unknown)[0]!r} (known: endpoint, region, prefix)")
        if any(len(v) > 1 for v in query.values()):
            raise bad("a parameter is given twice")
        endpoint = query.get("endpoint", [None])[0]
        if endpoint is not None:
            ep = urllib.parse.urlsplit(endpoint)
            if ep.scheme not in ("http", "https") or not ep.netloc:
                raise bad(f"endpoint {endpoint!r} is not an http(s) URL")
        prefix = "/".join(p for p in (parsed.path.strip("/"), *query.get("prefix", [])) if p)
        return cls(
            bucket=parsed.hostname,
            endpoint=endpoint,
            region=query.get("region", [None])[0],
            prefix=prefix.strip("/"),
        )

    def key(self, digest: str) -> str:
        check_digest(digest)
        rel = f"sha256/{digest[:2]}/{digest}"
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def _redact(url: str) -> str:
    """The URL without any user:password part, for messages."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None and parsed.username is None:
        return url
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.hostname or ""))


class S3BlobStore:
    """`BlobStore` over an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, moto)."""

    def __init__(
        self,
        location: S3Location,
        spool_dir: Path,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.location = location
        self._spool = Path(spool_dir)
        try:
            self._spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the upload spool {self._spool}: {exc}") from exc
        for leftover in self._spool.glob("upload-*"):  # a crash's spooled uploads
            leftover.unlink(missing_ok=True)
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Path-style (endpoint/bucket/key) works on every S3-compatible server without
            # wildcard DNS; AWS itself gets its default (virtual-hosted) style.
            s3={"addressing_style": "path" if location.endpoint else "auto"},
        )
        # Sessions are not thread-safe, clients are: one client, built here, used from the
        # registry's worker threads.
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=location.endpoint, region_name=location.region, config=config
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
        )
        self._sizes: dict[str, int] = {}
        self._sizes_lock = threading.Lock()

    # -- errors -----------------------------------------------------------------------------

    def _convert(self, exc: Exception, doing: str) -> StoreError:
        """A botocore/boto3 error as a StoreError; unreachable and 5xx -> BlobStoreUnavailable."""
        where = self.location.describe()
        if isinstance(exc, _UNREACHABLE):
            return BlobStoreUnavailable(f"blob store {where} unreachable while {doing}: {exc}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreError(
                f"blob store {where}: no credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or a credentials file)",
                code="blob_store_credentials",
            )
        if isinstance(exc, botocore.exceptions.ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response.get("Error", {}).get("Code", "?")
            if status >= 500:
                return BlobStoreUnavailable(f"blob store {where} failed {doing}: {code}")
            return StoreError(f"blob store {where} refused {doing}: {code} (HTTP {status})")
        if isinstance(exc, S3UploadFailedError):  # the transfer manager wraps the cause
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, Exception) and not isinstance(cause, S3UploadFailedError):
                return self._convert(cause, doing)
            return BlobStoreUnavailable(f"blob store {where} failed {doing}: {exc}")
        return StoreError(f"blob store {where} failed {doing}: {exc}")

    # -- the BlobStore methods --------------------------------------------------------------

    def new_upload(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self._spool)
        os.close(fd)
        return Path(name)

    def put_blob(self, spooled: Path, digest: str) -> None:
        key = self.location.key(digest)
        size = spooled.stat().st_size
        if self.blob_size(digest) == size:
            return  # content-addressed: the same digest is the same bytes
        try:
            self._client.upload_file(
                str(spooled),
                self.location.bucket,
                key,
                ExtraArgs={"ContentType": "application/vnd.edgefn.bundle"},
                Config=self._transfer,
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._convert(exc, f"storing blob {digest}") from exc
        except S3UploadFailedError as exc:
            raise self._convert(exc, f"storing blob {digest}") from exc

    def blob_size(self, digest: str) -> int | None:
        key = self.location.key(digest)
        with self._sizes_lock:
            cached = self._sizes.get(digest)
        if cached is not None:
            return cached
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 404:
                return None
            raise self._convert(exc, f"sizing blob {digest}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._convert(exc, f"sizing blob {digest}") from exc
        size = int(head["ContentLength"])
        with self._sizes_lock:
            if len(self._sizes) >= SIZE_CACHE_ENTRIES:
                self._sizes.clear()  # crude but bounded; a miss costs one HEAD
            self._sizes[digest] = size
        return size

    def open_blob(self, digest: str) -> BinaryIO:
        size = self.blob_size(digest)
        if size is None:
            raise StoreError(f"blob {digest} not found", code="not_found")
        raw = _RangeReader(self, digest, size)
        return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[return-value]

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        """Bytes [start, start+length) of the blob: one ranged GET."""
        key = self.location.key(digest)
        end = start + length - 1
        try:
            got = self._client.get_object(
                Bucket=self.location.bucket, Key=key, Range=f"bytes={start}-{end}"
            )
            data: bytes = got["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._convert(exc, f"reading blob {digest}") from exc
        if len(data) != length:  # a server that ignored Range, or a short body
            raise BlobStoreUnavailable(
                f"blob store {self.location.describe()} sent {len(data)} bytes for a "
                f"{length}-byte range of {digest}"
            )
        return data

    def close(self) -> None:
        self._client.close()


class _RangeReader(io.RawIOBase):
    """A seekable read-only view of one object: each read is a ranged GET (at most
    MAX_RANGE_BYTES), so nothing is fetched before the offset a device resumes at."""

    def __init__(self, store: S3BlobStore, digest: str, size: int) -> None:
        super().__init__()
        self._store, self._digest, self._size = store, digest, size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos, MAX_RANGE_BYTES)
        if n <= 0:
            return 0
        data = self._store.read_range(self._digest, self._pos, n)
        view[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        # RawIOBase's readall reads 8 KiB at a time: one GET each. Read in big ranges instead.
        parts = []
        while self._pos < self._size:
            n = min(MAX_RANGE_BYTES, self._size - self._pos)
            parts.append(self._store.read_range(self._digest, self._pos, n))
            self._pos += n
        return b"".join(parts)

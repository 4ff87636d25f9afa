"""The `BlobStore` contract, run on both implementations: a directory and a real S3-compatible
server (moto's, tests/s3server.py) on loopback. Same tests, parametrised: put, size, open, seek
and range reads, idempotent puts, a missing blob, multipart uploads; then what only S3 has
(its URL, an unreachable endpoint)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.platform import blobs, blobs_s3
from cloud_sync.platform.blobs import (
    BlobStore,
    BlobStoreUnavailable,
    FileBlobStore,
    open_blob_store,
)
from cloud_sync.platform.blobs_s3 import S3BlobStore, S3Location
from cloud_sync.platform.store import LocalStore, StoreError
from tests.s3server import S3Bucket, S3Server


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "file":
        made: BlobStore = open_blob_store(None, tmp_path / "blobs", tmp_path / "spool")
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        made = open_blob_store(bucket.url, tmp_path / "unused", tmp_path / "spool")
    yield made
    made.close()


def _put(store: BlobStore, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    spooled = store.new_upload()
    spooled.write_bytes(data)
    store.put_blob(spooled, digest)
    spooled.unlink(missing_ok=True)
    return digest


def test_put_size_open_and_range_reads(store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = _put(store, data)
    assert store.blob_size(digest) == len(data)
    with store.open_blob(digest) as f:
        assert f.read() == data
        f.seek(1_000_000)
        assert f.read(10) == data[1_000_000:1_000_010]
        f.seek(len(data) - 5)
        assert f.read(100) == data[-5:]  # a read past the end is short, not an error
        assert f.read(1) == b""


def test_put_is_idempotent_and_missing_blobs_are_none(store: BlobStore) -> None:
    data = b"same bytes" * 100
    assert _put(store, data) == _put(store, data)
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert store.blob_size(missing) is None
    with pytest.raises(StoreError) as caught:
        store.open_blob(missing)
    assert caught.value.code == "not_found"
    with pytest.raises(StoreError) as bad:
        store.blob_size("../../etc/passwd")
    assert bad.value.code == "bad_digest"


def test_large_blob_goes_up_in_parts(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 MiB is S3's smallest part; two and a bit parts exercise the multipart path.
    monkeypatch.setattr(blobs_s3, "MULTIPART_BYTES", 5 << 20)
    if isinstance(store, S3BlobStore):
        store._transfer.multipart_threshold = store._transfer.multipart_chunksize = 5 << 20
    data = os.urandom((10 << 20) + 123)
    digest = _put(store, data)
    assert store.blob_size(digest) == len(data)
    with store.open_blob(digest) as f:
        f.seek(len(data) - 200_000)
        tail = f.read()
    assert tail == data[-200_000:]


def test_s3_objects_are_content_addressed(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = open_blob_store(s3_bucket.url + "&prefix=edgefn", tmp_path, tmp_path / "spool")
    digest = _put(store, b"hello")
    keys = [
        o["Key"]
        for o in s3_bucket.server.client().list_objects_v2(Bucket=s3_bucket.name)["Contents"]
    ]
    assert keys == [f"edgefn/sha256/{digest[:2]}/{digest}"]
    assert not list((tmp_path / "spool").iterdir())  # nothing left behind locally


def test_file_store_keeps_the_old_layout(tmp_path: Path) -> None:
    """A data dir written before blobs.py existed still serves its bundles."""
    digest = hashlib.sha256(b"old").hexdigest()
    old = tmp_path / "blobs" / "sha256" / digest[:2] / digest
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    registry = LocalStore(tmp_path / "registry.db", tmp_path / "blobs")
    try:
        assert registry.blob_size(digest) == 3
        with registry.open_blob(digest) as f:
            assert f.read() == b"old"
    finally:
        registry.close()
    shared = open_blob_store(f"file://{tmp_path / 'blobs'}", tmp_path / "x", tmp_path / "spool")
    assert isinstance(shared, FileBlobStore) and shared.blob_size(digest) == 3


def test_a_shared_directory_keeps_young_uploads_of_other_replicas(tmp_path: Path) -> None:
    first = FileBlobStore(tmp_path / "shared")
    busy, stale = first.new_upload(), first.new_upload()
    old = time.time() - blobs.STALE_UPLOAD_S - 60
    os.utime(stale, (old, old))
    FileBlobStore(tmp_path / "shared")  # a second replica starts on the same directory
    assert busy.exists()  # another replica's publish in progress
    assert not stale.exists()  # a crash's leftover


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("s3://user:secret@bucket?endpoint=http://127.0.0.1:1", "credentials do not belong"),
        ("s3://bucket?endpoint=ftp://x", "not an http(s) URL"),
        ("s3://bucket?endpiont=http://127.0.0.1:1", "unknown parameter 'endpiont'"),
        ("s3://", "expected s3://BUCKET"),
        ("file://relative/path", "absolute local path"),
        ("gs://bucket", "expected file:///PATH or s3://"),
    ],
)
def test_bad_blobs_urls_are_refused(url: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError) as caught:
        open_blob_store(url, tmp_path, tmp_path / "spool")
    assert caught.value.code == "bad_blobs_url"
    assert needle in caught.value.message
    assert "secret" not in caught.value.message


def test_s3_location_from_url() -> None:
    loc = S3Location.from_url("s3://b/some/prefix?endpoint=https://minio:9000&region=eu-west-1")
    assert loc == S3Location("b", "https://minio:9000", "eu-west-1", "some/prefix")
    assert loc.key("a" * 64) == f"some/prefix/sha256/aa/{'a' * 64}"


def test_unreachable_s3_is_blob_store_unavailable(s3_server: S3Server, tmp_path: Path) -> None:
    """Nothing listens on the endpoint: every call is BlobStoreUnavailable, quickly."""
    dead = S3Location("bucket", f"http://127.0.0.1:{_closed_port()}")
    store = S3BlobStore(dead, tmp_path / "spool", connect_timeout_s=1, max_attempts=1)
    digest = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(BlobStoreUnavailable):
        store.blob_size(digest)
    spooled = store.new_upload()
    spooled.write_bytes(b"x")
    with pytest.raises(BlobStoreUnavailable):
        store.put_blob(spooled, digest)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

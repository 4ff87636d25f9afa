"""The platform with its bundles in S3 (moto's server on loopback, tests/s3server.py).

1. `edge-cloud serve --blobs s3://...` as a real process: publish, the object lands under its
   content address, a device downloads it whole, resumes a cut download with Range, and HEAD and
   suffix ranges answer as on the directory store.
2. The S3 server SIGKILLed in the middle of a device's download (the platform in-process, so
   the test picks the moment: right after the platform read the first chunk from S3): the
   device's install fails with a clear error and keeps its part, the next try gets 503
   `blob_store_unavailable` while /v1/health still answers, and once S3 is back the install
   resumes at the byte it had and the installed bundle verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.platform.blobs_s3 import S3BlobStore, S3Location
from cloud_sync.platform.server import create_app
from cloud_sync.platform.settings import PlatformSettings
from cloud_sync.platform.store import LocalStore
from cloud_sync.registry_client import DownloadInterrupted, RegistryClient, RegistryError
from edge_agent.install import InstallOptions, install_from_registry
from tests.registry_helpers import (
    agent_cli,
    build,
    cli,
    ok,
    publish,
    serve_app,
    set_version,
    start_platform,
)
from tests.s3server import CREDENTIALS, S3Bucket, S3Server

pytestmark = pytest.mark.slow  # builds a bundle and starts platforms: ~15 s together


@dataclass(frozen=True)
class Bundle:
    path: Path
    key: Path
    digest: str
    size: int


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A signed Node function of ~3 MiB: more than two of the registry's 1 MiB reads."""
    root = tmp_path_factory.mktemp("s3bundle")
    ok(cli("keys", "create", "--out", root / "publisher.key"))
    fn_dir = root / "echo"
    ok(cli("fn", "new", "echo", "--runtime", "node", "--dir", fn_dir))
    (fn_dir / "blob.bin").write_bytes(os.urandom(3 << 20))  # random: does not compress
    set_version(fn_dir, "1.0.0")
    path = build(fn_dir, root / "publisher.key", root / "echo-1.0.0.efb")
    data = path.read_bytes()
    return Bundle(path, root / "publisher.key", hashlib.sha256(data).hexdigest(), len(data))


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    return urllib.request.urlopen(req, timeout=30)


def test_publish_download_and_resume_through_edge_cloud_serve(
    s3_bucket: S3Bucket, bundle: Bundle, tmp_path: Path
) -> None:
    data = bundle.path.read_bytes()
    # A generous start timeout: boto3's import adds a second or more on two busy cores.
    platform = start_platform(
        tmp_path / "cloud", "--no-mqtt", "--blobs", s3_bucket.url, timeout=120
    )
    try:
        publish(platform, bundle.path)
        key = f"sha256/{bundle.digest[:2]}/{bundle.digest}"
        head = s3_bucket.server.client().head_object(Bucket=s3_bucket.name, Key=key)
        assert head["ContentLength"] == bundle.size
        assert not list((tmp_path / "cloud" / "blobs" / "sha256").rglob("*"))  # not on disk

        client = RegistryClient(platform.url)
        info = client.resolve("echo", "1.0.0")
        whole = client.download(info, tmp_path / "whole.part", max_bytes=1 << 30)
        assert whole.read_bytes() == data

        part = tmp_path / "resumed.part"
        part.write_bytes(data[:1_500_000])  # a download cut inside the second chunk
        seen: list[int] = []
        client.download(info, part, max_bytes=1 << 30, progress=lambda d, t: seen.append(d))
        assert part.read_bytes() == data
        assert seen[0] > 1_500_000 and seen[-1] == bundle.size  # it did not start over

        url = f"{platform.url}/v1/registry/bundles/sha256:{bundle.digest}"
        with _get(url, {"Range": "bytes=-100"}) as resp:
            assert resp.status == 206
            assert (
                resp.headers["Content-Range"]
                == f"bytes {bundle.size - 100}-{bundle.size - 1}/{bundle.size}"
            )
            assert resp.read() == data[-100:]
        with _get(url, method="HEAD") as resp:
            assert int(resp.headers["Content-Length"]) == bundle.size
            assert resp.headers["ETag"] == f'"sha256:{bundle.digest}"'
    finally:
        platform.stop()


class _KillAfterFirstRead:
    """The real S3 store, except that right after a download's first read from S3 the S3
    server is SIGKILLed (once): the moment is the test's, the outage is real."""

    def __init__(self, inner: S3BlobStore, server: S3Server) -> None:
        self.inner, self.server, self.armed = inner, server, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_blob(self, digest: str) -> Any:
        f = self.inner.open_blob(digest)
        if not self.armed:
            return f
        self.armed = False
        outer = self

        class Reader:
            def seek(self, pos: int) -> int:
                return f.seek(pos)

            def read(self, n: int) -> bytes:
                chunk = f.read(n)
                if outer.server.running():
                    outer.server.kill()
                return chunk

            def close(self) -> None:
                f.close()

        return Reader()


class _NoFaults:
    def at(self, step: str, data_dir: Path) -> None:
        pass


@pytest.fixture
def s3_platform(s3_bucket: S3Bucket, bundle: Bundle, tmp_path: Path) -> Iterator[str]:
    settings = PlatformSettings(data_dir=tmp_path / "cloud", port=0, blobs_url=s3_bucket.url)
    s3 = S3BlobStore(S3Location.from_url(s3_bucket.url), tmp_path / "spool", connect_timeout_s=2)
    blobs = _KillAfterFirstRead(s3, s3_bucket.server)
    app = create_app(
        settings,
        store_factory=lambda: LocalStore(settings.db_path, settings.blobs_dir, blobs=blobs),
    )
    with serve_app(app) as url:
        token = settings.token_file.read_text().strip()
        ok(cli("fn", "publish", bundle.path, "--platform", url, "--token", token))
        yield url


def test_s3_killed_mid_download_then_back(
    s3_platform: str,
    s3_bucket: S3Bucket,
    bundle: Bundle,
    tmp_path: Path,
) -> None:
    url = s3_platform
    device = tmp_path / "device"
    ok(agent_cli("trust", "add", str(bundle.key) + ".pub", "--data-dir", device))
    said: list[str] = []
    opts = InstallOptions(data_dir=device, say=said.append, faults=_NoFaults())  # type: ignore[arg-type]
    part = device / "staging" / f"echo@{bundle.digest}.part"

    # 1. S3 dies after the platform's first read: the connection is cut short, part kept.
    with pytest.raises(DownloadInterrupted) as cut:
        install_from_registry(url, "echo", "1.0.0", opts)
    assert not s3_bucket.server.running()
    assert "run the install again to resume" in cut.value.message
    have = part.stat().st_size
    assert 0 < have < bundle.size

    # 2. S3 still down: a clear refusal with a stable code; the platform itself is fine.
    with pytest.raises(RegistryError) as down:
        install_from_registry(url, "echo", "1.0.0", opts)
    assert "blob_store_unavailable" in down.value.message and "503" in down.value.message
    assert part.stat().st_size == have  # nothing lost
    with _get(f"{url}/v1/health") as resp:
        assert json.load(resp)["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as raw:
        _get(f"{url}/v1/registry/bundles/sha256:{bundle.digest}")
    assert raw.value.code == 503 and raw.value.headers["Retry-After"]
    with raw.value:
        assert json.load(raw.value)["error"]["code"] == "blob_store_unavailable"

    # 3. S3 is back (moto starts empty: put the object back, as a real store would have kept it).
    s3_bucket.server.start()
    client = s3_bucket.server.client()
    client.create_bucket(Bucket=s3_bucket.name)
    client.upload_file(
        str(bundle.path), s3_bucket.name, f"sha256/{bundle.digest[:2]}/{bundle.digest}"
    )
    result = install_from_registry(url, "echo", "1.0.0", opts)
    assert result.outcome == "installed" and result.version == "1.0.0"
    assert f"resuming download of echo@1.0.0 at byte {have} of {bundle.size}" in said
    assert not part.exists()
    installed = device / "functions" / "echo"
    assert installed.is_dir()


def test_publish_while_s3_is_unreachable_is_503_and_records_nothing(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    settings = PlatformSettings(data_dir=tmp_path / "cloud", port=0)
    spool = tmp_path / "spool"
    app = create_app(
        settings,
        store_factory=lambda: LocalStore(
            settings.db_path,
            settings.blobs_dir,
            blobs=S3BlobStore(S3Location("b", dead), spool, connect_timeout_s=1, max_attempts=1),
        ),
    )
    with serve_app(app) as url:
        token = settings.token_file.read_text().strip()
        req = urllib.request.Request(
            f"{url}/v1/registry/bundles",
            data=bundle.path.read_bytes(),
            headers={"Authorization": f"Bearer {token}"},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=60)
        assert refused.value.code == 503
        with refused.value:
            assert json.load(refused.value)["error"]["code"] == "blob_store_unavailable"
        with pytest.raises(urllib.error.HTTPError) as listing:
            _get(f"{url}/v1/registry/functions/echo")
        listing.value.close()
        assert listing.value.code == 404  # nothing recorded without its bundle
    assert not list(spool.iterdir())  # the spooled upload is gone too

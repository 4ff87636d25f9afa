"""The device's registry client: find a published version, download its bundle, resumably.

Flow of an install from the registry (the agent's `edge_agent.install` drives it):

1. `RegistryClient.resolve(name, version)` asks `GET /v1/registry/functions/{name}/versions/{v}`
   (or the function's version list for the latest) and validates the answer strictly: a registry
   that answers garbage is an error naming the registry, never a guess;
2. the announced size is checked against the device's cap before a byte is downloaded;
3. `download(info, part_file)` streams `GET /v1/registry/bundles/sha256:<digest>` into
   `part_file`. If `part_file` already holds a prefix (an earlier download was cut), it asks for
   the rest with `Range: bytes=<have>-` and appends when the answer is a matching 206 (a 200
   starts over). It never writes more than the announced size; a connection that ends early
   raises `DownloadInterrupted` and keeps the part for the next attempt; a complete file whose
   sha256 differs from the registry's digest is deleted and raises `DigestMismatch`.

The digest only proves the bytes are what the registry announced; whether they may run is for
the device's signature check (`runtimes.verify`), which happens after this and before unpacking.

Blocking (`cloud_sync.http_client.SyncHttpClient`, stdlib urllib underneath): the install
command runs it directly; async code would use `asyncio.to_thread`. Every socket operation has a
timeout, so a stalled registry is an error. The helper's errors are converted here into this
module's `RegistryError` subtree, which names the registry.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.errors import Category, CloudSyncError
from cloud_sync.http_client import (
    BadAnswer,
    Endpoint,
    RemoteError,
    SyncHttpClient,
    Unreachable,
)
from runtimes.manifest import NAME_RE, SEMVER_RE

# Per socket operation (connect, each read), not per download: a slow link with a large bundle
# keeps going as long as bytes keep arriving.
DEFAULT_TIMEOUT_S = 30.0
# A version document is a few hundred bytes; a list of versions a few KiB per hundred versions.
MAX_METADATA_BYTES = 1 << 20
CHUNK = 64 * 1024
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")

Progress = Callable[[int, int], None]  # (bytes on disk, total)


class RegistryError(CloudSyncError):
    code = "registry_error"
    category: Category = "transport"


class RegistryUnreachable(RegistryError):
    code = "registry_unreachable"


class RegistryGarbage(RegistryError):
    """The registry answered something that is not what the API promises."""

    code = "registry_garbage"


class DownloadOverrun(RegistryGarbage):
    """The registry sends more bytes than the bundle's announced (or TUF-declared) length."""

    code = "download_overrun"


class NotPublished(RegistryError):
    code = "not_found"
    category = "config"


class DownloadInterrupted(RegistryError):
    """The connection ended before the whole bundle arrived; the part file is kept to resume."""

    code = "download_interrupted"


class DownloadTooLarge(RegistryError):
    code = "too_large"
    category = "config"


class DigestMismatch(RegistryError):
    code = "digest_mismatch"
    category = "internal"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    name: str
    version: str
    digest: str  # lowercase hex sha256 of the bundle file
    size: int
    arches: tuple[str, ...]


class RegistryClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str = "",
        cafile: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        fallback_urls: tuple[str, ...] = (),
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RegistryError(f"not a registry URL: {base_url!r}", code="bad_url")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = SyncHttpClient(
            Endpoint(
                self.base_url,
                token=token,
                cafile=cafile,
                ssl_context=ssl_context,
                timeout_s=timeout,
                name="the registry",
                fallback_urls=fallback_urls,
            )
        )

    # -- metadata ---------------------------------------------------------------------------

    def _get_json(self, path: str, what: str) -> Any:
        try:
            resp = self._http.request("GET", path, max_bytes=MAX_METADATA_BYTES)
        except BadAnswer:
            raise RegistryGarbage(f"registry at {self.base_url} sent an oversized answer") from None
        except Unreachable as exc:
            raise RegistryUnreachable(exc.message) from exc
        if resp.status == 404:
            raise NotPublished(f"{what} is not published at {self.base_url}")
        if resp.status >= 300:
            raise RegistryError(
                f"registry at {self.base_url} answered HTTP {resp.status} for {what}: "
                f"{_error_text(resp.error())}"
            )
        try:
            return resp.json()
        except BadAnswer:
            raise RegistryGarbage(
                f"registry at {self.base_url} returned garbage for {what} "
                f"(not JSON: {resp.body[:60]!r})"
            ) from None

    def resolve(self, name: str, version: str | None = None) -> VersionInfo:
        """The published `name@version` (None: the latest), validated."""
        if not NAME_RE.match(name):
            raise RegistryError(f"not a function name: {name!r}", code="bad_request")
        if version is None:
            listing = self._get_json(f"/v1/registry/functions/{name}", name)
            latest = listing.get("latest") if isinstance(listing, dict) else None
            if not isinstance(latest, str) or not SEMVER_RE.match(latest):
                raise RegistryGarbage(
                    f"registry at {self.base_url} returned garbage for {name}: no latest version"
                )
            version = latest
        if not SEMVER_RE.match(version):
            raise RegistryError(f"not a semantic version: {version!r}", code="bad_request")
        what = f"{name}@{version}"
        doc = self._get_json(f"/v1/registry/functions/{name}/versions/{version}", what)
        return self._version_info(doc, name, version)

    def _version_info(self, doc: Any, name: str, version: str) -> VersionInfo:
        def bad(why: str) -> RegistryGarbage:
            return RegistryGarbage(
                f"registry at {self.base_url} returned garbage for {name}@{version}: {why}"
            )

        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        if doc.get("name") != name or doc.get("version") != version:
            raise bad(f"it describes {doc.get('name')!r}@{doc.get('version')!r}")
        match = _DIGEST_RE.match(str(doc.get("digest", "")))
        if not match:
            raise bad("digest is not sha256:<64 hex digits>")
        size = doc.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise bad("size is not a positive integer")
        arches = doc.get("arches", [])
        if not isinstance(arches, list) or not all(isinstance(a, str) for a in arches):
            raise bad("arches is not a list of strings")
        return VersionInfo(name, version, match.group(1), size, tuple(arches))

    def bundle_url(self, digest: str) -> str:
        return f"{self.base_url}/v1/registry/bundles/sha256:{digest}"

    # -- download ---------------------------------------------------------------------------

    def download(
        self,
        info: VersionInfo,
        part: Path,
        *,
        max_bytes: int,
        progress: Progress | None = None,
    ) -> Path:
        """Download the bundle into `part` (resuming a prefix already there); checks the digest.

        Returns `part` once it holds exactly the announced bytes. Raises DownloadTooLarge before
        downloading when the registry announces more than `max_bytes`.
        """
        if info.size > max_bytes:
            raise DownloadTooLarge(
                f"{info.name}@{info.version} is {info.size} bytes, over this device's "
                f"limit of {max_bytes} bytes"
            )
        have = part.stat().st_size if part.exists() else 0
        if have > info.size:
            have = 0  # not a prefix of this bundle: start over
        if have < info.size:
            self._fetch(info, part, have, progress)
        digest = _sha256_file(part)
        if digest != info.digest:
            part.unlink(missing_ok=True)
            raise DigestMismatch(
                f"downloaded {info.name}@{info.version} has sha256 {digest}, the registry "
                f"announced {info.digest} (corrupted in transit or a misbehaving registry)"
            )
        return part

    def _fetch(self, info: VersionInfo, part: Path, have: int, progress: Progress | None) -> None:
        path = f"/v1/registry/bundles/sha256:{info.digest}"
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self._http.open("GET", path, headers=headers) as resp:
                self._receive(resp, info, part, have, progress)
        except RemoteError as exc:
            if exc.status == 416 and have:
                part.unlink(missing_ok=True)  # our prefix does not fit: start over next time
            raise RegistryError(
                f"registry at {self.base_url} answered HTTP {exc.status} for the bundle of "
                f"{info.name}@{info.version}: {_error_text(exc.remote)}"
            ) from None
        except Unreachable as exc:
            raise RegistryUnreachable(exc.message) from exc

    def _receive(
        self,
        resp: http.client.HTTPResponse,
        info: VersionInfo,
        part: Path,
        have: int,
        progress: Progress | None,
    ) -> None:
        start = 0
        if resp.status == 206:
            match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
            if not match or int(match.group(3)) != info.size or int(match.group(1)) != have:
                part.unlink(missing_ok=True)  # start over next time rather than loop
                raise RegistryGarbage(
                    f"registry at {self.base_url} answered a range request with "
                    f"Content-Range {resp.headers.get('Content-Range')!r}"
                )
            start = have
        elif resp.status != 200:
            raise RegistryGarbage(f"registry answered HTTP {resp.status} for a bundle")
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > info.size - start:
            raise DownloadOverrun(
                f"registry at {self.base_url} sends {length} bytes for a bundle it "
                f"announced as {info.size} bytes"
            )
        self._stream(resp, part, start, info, progress)

    def _stream(
        self,
        resp: http.client.HTTPResponse,
        part: Path,
        start: int,
        info: VersionInfo,
        progress: Progress | None,
    ) -> None:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "r+b") as out:
            out.truncate(start)
            out.seek(start)
            written = start
            try:
                while written < info.size:
                    chunk = resp.read(min(CHUNK, info.size - written))
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
                    if progress is not None:
                        out.flush()
                        progress(written, info.size)
                if written == info.size and resp.read(1):
                    raise DownloadOverrun(
                        f"registry at {self.base_url} sent more than the {info.size} bytes "
                        "it announced"
                    )
            except (OSError, http.client.HTTPException) as exc:
                _sync(out)
                raise DownloadInterrupted(
                    f"download of {info.name}@{info.version} interrupted after {written} of "
                    f"{info.size} bytes ({exc}); run the install again to resume"
                ) from exc
            _sync(out)
        if written < info.size:
            raise DownloadInterrupted(
                f"download of {info.name}@{info.version} interrupted after {written} of "
                f"{info.size} bytes (the registry closed the connection early); run the "
                "install again to resume"
            )


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _error_text(remote: tuple[str, str] | None) -> str:
    """The registry's own error (message and stable code), when it sent one."""
    return f"{remote[1]} ({remote[0]})" if remote else "no details"

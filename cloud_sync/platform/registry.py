"""The registry's HTTP API: publish signed bundles, list functions and versions, serve bundles.

Endpoints (docs/registry.md is the reference):

    POST /v1/registry/bundles                          publish (operator token)  201 / 200 / 4xx
    GET  /v1/registry/functions                        every function, its latest version
    GET  /v1/registry/functions/{name}                 its versions, oldest first
    GET  /v1/registry/functions/{name}/versions/{v}    one version: digest, size, arches, url
    GET  /v1/registry/bundles/sha256:{digest}          the bundle bytes; HEAD and Range work

Publish flow: check the bearer token before reading a byte of the body -> stream the body into a
spooled file with a size cap, hashing as it goes -> inspect it in a thread with the same code a
device uses (`runtimes.bundle`: layout, signatures present, manifest valid, publisher signed,
payload digests; and the signature itself when `<data_dir>/publishers/*.pub` exist) -> move the
blob into the content-addressed store -> record name@version. A bundle that fails inspection is
422 with the bundle module's error code; with TUF initialised (`cloud_sync.platform.tuf`) the
publisher's signed role claim must let this key publish this function (403/409/400 `tuf_*`), and
the new role version, snapshot and timestamp are committed with the blob under one lock;
name@version already published with another digest is 409 (versions are immutable, so a
device that pinned a version always gets the same bytes).

Downloads: one `bytes=` range per request (`a-b`, `a-`, `-n`) answered 206 with Content-Range, so
an interrupted device download resumes where it stopped; an unsatisfiable or malformed range is
416 with `Content-Range: bytes */size`. Bundles are immutable, so ETag is the digest. The bytes
come from the store's blob half (`blobs.py`: a directory or S3) in 1 MiB reads; a blob store that
cannot be reached is 503 `blob_store_unavailable` while the first chunk is still unsent, and a
connection cut short after that (the device resumes either way).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.auth import AuthResult, check_bearer
from cloud_sync.platform.blobs import BlobStoreUnavailable
from cloud_sync.platform.store import (
    DIGEST_RE,
    RegistryStore,
    StoreError,
    VersionConflict,
    VersionRecord,
)
from cloud_sync.platform.tuf.claim import claim_from_headers
from cloud_sync.platform.tuf.errors import TufError
from cloud_sync.platform.tuf.repository import TufRepository
from runtimes.bundle import (
    BundleManifest,
    RawBundle,
    check_payload,
    check_publisher,
    parse_signatures,
    read_bundle,
)
from runtimes.errors import BundleError
from runtimes.manifest import NAME_RE, SEMVER_RE
from runtimes.verify import Verifier

log = logging.getLogger("edgefn.registry")

BUNDLE_MEDIA_TYPE = "application/vnd.edgefn.bundle"
# Read and write in 1 MiB steps: few thread hops per bundle, bounded memory per request.
CHUNK = 1 << 20
# What a 503 for an unreachable blob store tells the device to wait: long enough not to hammer a
# store that is down, short enough that a blip costs little.
RETRY_AFTER_S = 5
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    """The platform's JSON error shape (same as the agent's API): {"error": {code, message}}."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


class RangeNotSatisfiable(CloudSyncError):
    """A `Range` header the registry cannot serve: answered 416."""

    code = "range_not_satisfiable"
    category = "request"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span a `Range` header asks for, or None for the whole body.

    One `bytes=` range only. Other units are ignored (RFC 9110 lets a server ignore Range);
    a malformed, multi-part or unsatisfiable bytes range raises RangeNotSatisfiable (416).
    """
    if header is None:
        return None
    header = header.strip()
    if not header.lower().startswith("bytes="):
        return None
    match = _RANGE_RE.match("bytes=" + header[6:].replace(" ", ""))
    if not match or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiable(header)
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiable(header)
    return start, end


def _inspect(path: Path, max_bytes: int, verifier: Verifier | None) -> BundleManifest:
    """What a device will check, minus trust (unless the registry has publisher keys)."""
    if verifier is not None:
        verified = verifier.verify(path, max_bytes=max_bytes)
        manifest, raw = verified.manifest, verified.raw
    else:
        raw = read_bundle(path, max_bytes=max_bytes)
        parse_signatures(raw.signature_bytes)  # present and well-formed
        manifest = BundleManifest.from_bytes(raw.manifest_bytes)
        check_publisher(manifest, raw.signature_bytes)
        check_payload(raw, manifest)
    dry_run_unpack(manifest, raw, path.parent)
    return manifest


def dry_run_unpack(manifest: BundleManifest, raw: RawBundle, scratch: Path) -> None:
    """Unpack every arch's payload exactly as a device would, into `scratch`, then delete it.

    A bundle no device can install (a `..` path, a link out of the tree, a missing entry
    file, a ratio over the device's bound) must never become `latest`: the device's own
    `runtimes.verify.VerifiedBundle.unpack` runs here and its BundleError codes are the
    refusal. The digests were checked above, so this only reads what was verified; the
    signatures are not re-checked (the registry may have no publisher keys).
    """
    import shutil
    import tempfile

    from runtimes.verify import VerifiedBundle

    bundle = VerifiedBundle(manifest, raw, signers=())
    work = Path(tempfile.mkdtemp(prefix="publish-check-", dir=scratch))
    try:
        for arch in manifest.arches or ("any",):  # common-only bundles install anywhere
            bundle.unpack(arch, work / arch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Registry:
    """Request handlers over a `RegistryStore`; built once by `server.create_app`."""

    def __init__(
        self,
        store: RegistryStore,
        token: str,
        *,
        max_bundle_bytes: int,
        verifier: Verifier | None = None,
        tuf: TufRepository | None = None,
    ) -> None:
        self.store = store
        self._token = token
        self._max = max_bundle_bytes
        self._verifier = verifier
        self._tuf = tuf  # with `tuf init` done, a publish must carry the publisher's role claim

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/registry/bundles", self.publish),
            web.get("/v1/registry/functions", self.list_functions),
            web.get("/v1/registry/functions/{name}", self.list_versions),
            web.get("/v1/registry/functions/{name}/versions/{version}", self.get_version),
            web.get("/v1/registry/bundles/{digest}", self.get_bundle),  # GET also answers HEAD
        ]

    # -- publish ----------------------------------------------------------------------------

    def _auth(self, request: web.Request) -> web.Response | None:
        result = check_bearer(request.headers.get("Authorization"), self._token)
        if result is AuthResult.MISSING:
            return error_response(
                401,
                "unauthorized",
                "publishing needs the operator token: Authorization: Bearer <token>",
                **{"WWW-Authenticate": 'Bearer realm="edgefn registry"'},
            )
        if result is AuthResult.WRONG:
            return error_response(403, "forbidden", "the operator token is wrong")
        return None

    async def publish(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth(request)
        if denied is not None:
            return denied
        if request.content_length is not None and request.content_length > self._max:
            return self._too_large()
        try:
            claim = claim_from_headers(request.headers)
        except TufError as exc:
            return error_response(exc.status, exc.code, exc.message)
        spooled = await asyncio.to_thread(self.store.new_upload)
        try:
            digest, size = await self._spool(request, spooled)
            if size > self._max:
                return self._too_large()
            try:
                manifest = await asyncio.to_thread(_inspect, spooled, self._max, self._verifier)
            except BundleError as exc:
                log.info("publish refused (%s): %s", exc.code, exc.message)
                return error_response(422, exc.code, exc.message)
            record = VersionRecord(
                name=manifest.name,
                version=manifest.version,
                digest=digest,
                size=size,
                runtime=manifest.function.runtime,
                arches=manifest.arches,
                publisher=manifest.publisher,
                created_at=manifest.created_at,
                published_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            existing = await asyncio.to_thread(self.store.get_version, record.name, record.version)
            if existing is not None and existing.digest != digest:
                return self._conflict(existing)

            def keep() -> bool:
                self.store.put_blob(spooled, digest)
                return self.store.add_version(record)

            try:
                if self._tuf is not None and self._tuf.initialised:
                    created = await asyncio.to_thread(
                        self._tuf.publish,
                        name=record.name,
                        version=record.version,
                        sha256=digest,
                        length=size,
                        publisher=manifest.publisher,
                        claim=claim,
                        store=keep,
                    )
                else:
                    created = await asyncio.to_thread(keep)
            except VersionConflict as exc:  # a racing publish of other bytes won
                return error_response(409, exc.code, exc.message)
            except TufError as exc:
                log.info("publish refused (%s): %s", exc.code, exc.message)
                return error_response(exc.status, exc.code, exc.message)
        except BlobStoreUnavailable as exc:
            return _unavailable(exc)
        except StoreError as exc:
            log.error("publish failed: %s", exc.message)
            return error_response(500, exc.code, exc.message)
        finally:
            await asyncio.to_thread(spooled.unlink, missing_ok=True)
        stored = await asyncio.to_thread(self.store.get_version, record.name, record.version)
        body = self._version_json(stored or record)
        log.info(
            "published %s@%s sha256:%s (%d bytes)%s",
            record.name,
            record.version,
            digest,
            size,
            "" if created else " (already there)",
        )
        return web.json_response(body, status=201 if created else 200)

    async def _spool(self, request: web.Request, spooled: Path) -> tuple[str, int]:
        """Stream the body to `spooled`; stops counting (not reading) once past the cap."""
        h = hashlib.sha256()
        size = 0
        buf = bytearray()
        f = await asyncio.to_thread(open, spooled, "wb")
        try:
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > self._max:
                    return "", size
                h.update(chunk)
                buf += chunk
                if len(buf) >= CHUNK:
                    await asyncio.to_thread(f.write, bytes(buf))
                    buf.clear()
            if buf:
                await asyncio.to_thread(f.write, bytes(buf))
        finally:
            await asyncio.to_thread(f.close)
        return h.hexdigest(), size

    def _too_large(self) -> web.Response:
        return error_response(
            413, "too_large", f"bundle is larger than this registry's limit of {self._max} bytes"
        )

    @staticmethod
    def _conflict(existing: VersionRecord) -> web.Response:
        return error_response(
            409,
            "version_conflict",
            f"{existing.name}@{existing.version} is already published with digest "
            f"sha256:{existing.digest}; versions are immutable, publish a new version",
        )

    # -- listing ----------------------------------------------------------------------------

    @staticmethod
    def _version_json(record: VersionRecord) -> dict[str, Any]:
        out = record.to_json()
        out["url"] = f"/v1/registry/bundles/sha256:{record.digest}"
        return out

    async def list_functions(self, request: web.Request) -> web.StreamResponse:
        items = await asyncio.to_thread(self.store.list_functions)
        return web.json_response(
            {
                "functions": [
                    {"name": f.name, "latest": f.latest, "versions": f.versions} for f in items
                ]
            }
        )

    async def list_versions(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not NAME_RE.match(name):
            return error_response(400, "bad_request", f"not a function name: {name!r}")
        records = await asyncio.to_thread(self.store.list_versions, name)
        if not records:
            return error_response(404, "not_found", f"no function {name!r} in this registry")
        return web.json_response(
            {
                "name": name,
                "latest": records[-1].version,
                "versions": [self._version_json(r) for r in records],
            }
        )

    async def get_version(self, request: web.Request) -> web.StreamResponse:
        name, version = request.match_info["name"], request.match_info["version"]
        if not NAME_RE.match(name) or not SEMVER_RE.match(version):
            return error_response(400, "bad_request", f"not a function@version: {name}@{version}")
        record = await asyncio.to_thread(self.store.get_version, name, version)
        if record is None:
            return error_response(404, "not_found", f"{name}@{version} is not published")
        return web.json_response(self._version_json(record))

    # -- download ---------------------------------------------------------------------------

    async def get_bundle(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"].removeprefix("sha256:")
        if not DIGEST_RE.match(digest):
            return error_response(400, "bad_request", "expected /v1/registry/bundles/sha256:<hex>")
        return await self.serve_blob(request, digest)

    async def serve_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        """The blob's bytes (GET/HEAD, one Range): bundles and TUF targets alike."""
        try:
            size = await asyncio.to_thread(self.store.blob_size, digest)
        except BlobStoreUnavailable as exc:
            return _unavailable(exc)
        if size is None:
            return error_response(404, "not_found", f"no bundle sha256:{digest}")
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": f'"sha256:{digest}"',
            "Cache-Control": "public, max-age=31536000, immutable",
            "Content-Type": BUNDLE_MEDIA_TYPE,
        }
        try:
            span = parse_range(request.headers.get("Range"), size)
        except RangeNotSatisfiable:
            return error_response(
                416,
                "range_not_satisfiable",
                f"bad or unsatisfiable range {request.headers.get('Range')!r} for {size} bytes",
                **{"Content-Range": f"bytes */{size}"},
            )
        start, end = span if span is not None else (0, size - 1)
        length = end - start + 1 if size else 0
        resp = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
        if span is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        resp.content_length = length
        if request.method == "HEAD" or length == 0:
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        # Open and read the first chunk before the status line goes out: a store that is down
        # is then a 503 the device understands, not a cut connection.
        try:
            f = await asyncio.to_thread(self.store.open_blob, digest)
        except BlobStoreUnavailable as exc:
            return _unavailable(exc)
        sent = 0
        try:
            try:
                await asyncio.to_thread(f.seek, start)
                chunk = await asyncio.to_thread(f.read, min(CHUNK, length))
            except BlobStoreUnavailable as exc:
                return _unavailable(exc)
            except StoreError as exc:
                log.error("cannot read bundle sha256:%s: %s", digest, exc.message)
                return error_response(500, exc.code, exc.message)
            await resp.prepare(request)
            while chunk:
                await resp.write(chunk)
                sent += len(chunk)
                if sent >= length:
                    break
                # Blob stores read in ranges (blobs_s3.py): only `CHUNK` bytes in memory.
                # An empty read (the blob shrank: impossible when immutable) ends the loop.
                chunk = await asyncio.to_thread(f.read, min(CHUNK, length - sent))
        except StoreError as exc:
            # The status line is sent: the honest signal left is a connection cut short of
            # Content-Length. The device keeps its part and resumes with Range; its next
            # request meets the 503 above until the store is back.
            log.warning("download of sha256:%s cut at byte %d: %s", digest, start + sent, exc)
            if request.transport is not None:
                request.transport.abort()
            return resp
        finally:
            await asyncio.to_thread(f.close)
        await resp.write_eof()
        return resp


def _unavailable(exc: StoreError) -> web.Response:
    """503 with a stable code: the blob store is down, the platform is not; retry later."""
    log.warning("blob store unavailable: %s", exc.message)
    return error_response(
        503,
        "blob_store_unavailable",
        "the bundle store is unreachable right now; retry later (a partial download resumes)",
        **{"Retry-After": str(RETRY_AFTER_S)},
    )


def publishers_verifier(directory: Path) -> Verifier | None:
    """A verifier over `<data_dir>/publishers/*.pub`, or None when none are configured."""
    from runtimes.verify import Ed25519Verifier

    keys = sorted(Path(directory).glob("*.pub")) if Path(directory).is_dir() else []
    return Ed25519Verifier.from_files(keys) if keys else None

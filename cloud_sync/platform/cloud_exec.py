"""Cloud execution: the platform runs the same published bundles, with the same `runtimes`
pools, for devices that route a call to the cloud (`cloud`, `local-then-cloud`,
`cloud-then-local`).

Flow of `POST /v1/functions/{name}/invoke`: authorize (operator or enrolled device) -> pick the
version (the one the device runs, sent as `X-Edgefn-Version`, else the newest published) ->
the first call of a name@version unpacks the stored bundle for this host's architecture under
`<data_dir>/exec/<name>/<version>/` and starts its warm pool (one start shared by concurrent
callers) -> invoke -> the same answer headers and JSON errors as the agent.

Trust: only an authenticated operator can publish, the blob is content-addressed (its sha256 is
checked again here) and the payload digests are checked while unpacking. When the platform has
publisher keys (`<data_dir>/publishers/`), signatures are verified as on a device.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cloud_sync.platform.auth import AuthResult
from cloud_sync.platform.store import RegistryStore, VersionRecord
from runtimes.bundle import (
    BundleManifest,
    check_payload,
    check_publisher,
    host_arch,
    parse_signatures,
    read_bundle,
)
from runtimes.errors import BundleError, RuntimeErrorBase
from runtimes.invocation import Executor, Invocation
from runtimes.launchers import make_executor
from runtimes.manifest import MANIFEST_NAME, load_manifest, semver_key
from runtimes.sandbox import Sandbox
from runtimes.verify import VerifiedBundle, Verifier

log = logging.getLogger("edgefn.cloud_exec")

# A device's local API token id (edge_agent.tokens: 8 hex digits) as sent in X-Edgefn-Caller;
# anything else is logged as "invalid" so a device cannot write arbitrary text into our log.
_CALLER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Invocations carry at most this much payload, like the agent's default limit.
MAX_BODY_BYTES = 6 * 1024 * 1024

Authorize = Callable[[web.Request], tuple[AuthResult, str]]


def _error(status: int, code: str, message: str, rid: str = "") -> web.Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if rid:
        body["error"]["request_id"] = rid
    return web.json_response(body, status=status, headers={"X-Request-Id": rid} if rid else None)


class CloudExec:
    def __init__(
        self,
        store: RegistryStore,
        exec_dir: Path,
        *,
        authorize: Authorize,
        verifier: Verifier | None = None,
    ) -> None:
        self._store = store
        self._dir = exec_dir
        self._authorize = authorize
        self._verifier = verifier
        self._sandbox = Sandbox()
        # name@version -> its pool and timeout in seconds
        self._executors: dict[tuple[str, str], tuple[Executor, float]] = {}
        self._starting: dict[tuple[str, str], asyncio.Future[tuple[Executor, float]]] = {}
        self._counter = 0

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/functions/{name}/invoke", self.invoke)]

    async def invoke(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        rid = request.headers.get("X-Request-Id") or self._new_id()
        result, who = self._authorize(request)
        if result is AuthResult.MISSING:
            return _error(401, "unauthorized", "send Authorization: Bearer <token>", rid)
        if result is AuthResult.WRONG:
            return _error(403, "forbidden", "that token may not invoke functions", rid)
        name = request.match_info["name"]
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(413, "payload_too_large", f"over {MAX_BODY_BYTES} bytes", rid)
        payload = await request.read()
        record = await asyncio.to_thread(
            self._pick, name, request.headers.get("X-Edgefn-Version", "")
        )
        if record is None:
            return _error(404, "unknown_function", f"no published function {name!r}", rid)
        try:
            executor, timeout_s = await self._executor(record)
            inv = Invocation(
                payload,
                rid,
                timeout_s,
                request.headers.get("X-Trace-Id", ""),
                request.headers.get("Content-Type", ""),
            )
            answer = await executor.invoke(inv)
            self._record(name, record.version, who, request, rid)
        except RuntimeErrorBase as exc:
            log.info("%s for %s failed: %s (%s)", name, who, exc.message, exc.code)
            return _error(exc.status, exc.code, exc.message, rid)
        return web.Response(
            body=answer.payload,
            headers={
                "Content-Type": answer.content_type,
                "X-Request-Id": rid,
                "X-Edgefn-Version": record.version,
                "X-Edgefn-Served-By": "cloud",
                "X-Edgefn-Duration-Ms": f"{(time.perf_counter() - started) * 1000:.3f}",
            },
        )

    def _record(self, name: str, version: str, who: str, request: web.Request, rid: str) -> None:
        """Audit one cloud call: the device whose rights were used, the local token behind it.

        A call forwarded by an agent with its LAN auth on carries `X-Edgefn-Caller` (the local
        token's id); without it the call came from the device itself or an agent with auth off.
        """
        caller = request.headers.get("X-Edgefn-Caller", "")
        if caller and not _CALLER_ID.fullmatch(caller):
            caller = "invalid"
        log.info(
            "cloud call %s@%s for %s, local caller %s (request %s)",
            name,
            version,
            who,
            caller or "-",
            rid,
        )

    def _new_id(self) -> str:
        self._counter += 1
        return f"cloud-{self._counter:x}"

    def _pick(self, name: str, wanted: str) -> VersionRecord | None:
        """The version the caller runs, or the newest one published (blocking: SQLite)."""
        if wanted:
            return self._store.get_version(name, wanted)
        versions = self._store.list_versions(name)
        return max(versions, key=lambda r: semver_key(r.version)) if versions else None

    async def _executor(self, record: VersionRecord) -> tuple[Executor, float]:
        key = (record.name, record.version)
        found = self._executors.get(key)
        if found is not None:
            return found
        pending = self._starting.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._start(record))
            self._starting[key] = pending
            pending.add_done_callback(lambda _: self._starting.pop(key, None))
        return await asyncio.shield(pending)

    async def _start(self, record: VersionRecord) -> tuple[Executor, float]:
        directory = await asyncio.to_thread(self._unpack, record)
        manifest = load_manifest(directory / MANIFEST_NAME)
        executor = make_executor(manifest, directory, sandbox=self._sandbox)
        await executor.start()
        entry = (executor, manifest.timeout_ms / 1000)
        self._executors[(record.name, record.version)] = entry
        log.info("cloud pool for %s@%s started", record.name, record.version)
        return entry

    def _unpack(self, record: VersionRecord) -> Path:
        dest = self._dir / record.name / record.version
        if (dest / MANIFEST_NAME).is_file():
            return dest
        with self._store.open_blob(record.digest) as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != record.digest:
            raise BundleError(
                f"stored bundle of {record.name} {record.version} does not match its digest",
                code="digest_mismatch",
            )
        verified = self._verify(data)
        if dest.exists():  # a half-unpacked leftover from a crash: unpack is all-or-nothing
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        verified.unpack(host_arch(), dest)
        return dest

    def _verify(self, data: bytes) -> VerifiedBundle:
        if self._verifier is not None:
            return self._verifier.verify(data)
        raw = read_bundle(data)
        parse_signatures(raw.signature_bytes)
        manifest = BundleManifest.from_bytes(raw.manifest_bytes)
        check_publisher(manifest, raw.signature_bytes)
        check_payload(raw, manifest)
        return VerifiedBundle(manifest, raw, signers=())

    def status(self) -> dict[str, Any]:
        return {f"{n}@{v}": ex.status() for (n, v), (ex, _) in self._executors.items()}

    async def close(self) -> None:
        executors, self._executors = [ex for ex, _ in self._executors.values()], {}
        await asyncio.gather(*(ex.close(2.0) for ex in executors), return_exceptions=True)
        await self._sandbox.close()

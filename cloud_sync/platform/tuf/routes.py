"""`/v1/tuf/`: the repository in the TUF specification's layout, unauthenticated.

    GET /v1/tuf/timestamp.json                         the one unversioned file
    GET /v1/tuf/{N}.{role}.json                        root, snapshot, targets, publisher-...
    GET /v1/tuf/targets/{name}/{sha256}.{version}.edgefn    a target (consistent snapshot:
                                                       python-tuf's ngclient puts the hash in
                                                       front of the file name part)

Metadata is signed, so it is public like the bundles themselves. A target is served from the
registry's blob store by the same code as `/v1/registry/bundles/sha256:{digest}` (Range, ETag),
only when the registry records `{name}@{version}` with that digest. Without `tuf init` every
route answers 404 `tuf_not_initialised`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from cloud_sync.platform.store import RegistryStore
from cloud_sync.platform.tuf.repository import TufRepository
from runtimes.manifest import NAME_RE, SEMVER_RE

ServeBlob = Callable[[web.Request, str], Awaitable[web.StreamResponse]]
_TARGET_RE = re.compile(r"^([0-9a-f]{64})\.(.+)\.edgefn$")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class TufRoutes:
    def __init__(self, repo: TufRepository, store: RegistryStore, serve_blob: ServeBlob) -> None:
        self.repo = repo
        self.store = store
        self._serve_blob = serve_blob

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/tuf/targets/{name}/{file}", self.target),
            web.get("/v1/tuf/{file}", self.metadata),
        ]

    def _not_initialised(self) -> web.Response | None:
        if self.repo.initialised:
            return None
        return _error(
            404, "tuf_not_initialised", "this registry has no TUF repository (edge-cloud tuf init)"
        )

    async def metadata(self, request: web.Request) -> web.StreamResponse:
        missing = self._not_initialised()
        if missing is not None:
            return missing
        name = request.match_info["file"]
        data = await asyncio.to_thread(self.repo.store.read, name)
        if data is None:
            return _error(404, "not_found", f"no TUF metadata file {name}")
        # Versioned files never change; the timestamp changes at least once per expiry period.
        cache = "no-cache" if name == "timestamp.json" else "public, max-age=31536000, immutable"
        return web.Response(
            body=data, content_type="application/json", headers={"Cache-Control": cache}
        )

    async def target(self, request: web.Request) -> web.StreamResponse:
        missing = self._not_initialised()
        if missing is not None:
            return missing
        name, file = request.match_info["name"], request.match_info["file"]
        match = _TARGET_RE.match(file)
        if not NAME_RE.match(name) or not match or not SEMVER_RE.match(match.group(2)):
            return _error(
                404, "not_found", "expected /v1/tuf/targets/{name}/{sha256}.{version}.edgefn"
            )
        digest, version = match.group(1), match.group(2)
        record = await asyncio.to_thread(self.store.get_version, name, version)
        if record is None or record.digest != digest:
            return _error(404, "not_found", f"no target {name}/{version}.edgefn with that hash")
        return await self._serve_blob(request, digest)

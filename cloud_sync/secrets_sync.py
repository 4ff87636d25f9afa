"""The device side of secret delivery: fetch sealed secrets, hand them over, acknowledge.

Flow (docs/building-blocks.md, "Secrets"; the platform side is cloud_sync/platform/secrets_api.py)::

    PUT  /v1/devices/{id}/secrets/key   {"cert_pem"}   once per start: the enrolment certificate,
                                                       whose P-256 key the platform seals to
    GET  /v1/devices/{id}/secrets       -> {"secrets": {name: {"version", "box"}}}
         apply(...)                     the agent's store opens every box, writes secrets.json
                                        atomically, then swaps the values its broker reads
    POST /v1/devices/{id}/secrets/ack   {"versions": {name: version}}   only after apply

So an acknowledged version is the one every later `secret(name)` call returns. The fetch runs at
start, every `poll_s`, and at once when `wake()` is called (an MQTT notification on
`edgefn/v1/devices/{id}/secrets`, see docs/mqtt-topics.md). Boxes are opaque here: this module
never sees a clear value, so nothing it logs can hold one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from cloud_sync.errors import CloudSyncError
from cloud_sync.http_client import AsyncHttpClient, Endpoint
from runtimes import tasks

log = logging.getLogger("edgefn.secrets")

POLL_S = 30.0
HTTP_TIMEOUT_S = 10.0

# apply(entries) makes them the device's secrets (raises when a box does not open);
# held() is what the device holds now: name -> version.
Apply = Callable[[dict[str, Any]], Awaitable[None]]
Held = Callable[[], dict[str, int]]


class SecretsSync:
    def __init__(
        self,
        platform_url: str,
        device_id: str,
        cert_pem: str,
        *,
        token: str,
        ssl_ctx: ssl.SSLContext | None,
        apply: Apply,
        held: Held,
        poll_s: float = POLL_S,
    ) -> None:
        self._http = AsyncHttpClient(
            Endpoint(
                platform_url.rstrip("/") + f"/v1/devices/{device_id}",
                token=token,
                ssl_context=ssl_ctx,
                timeout_s=HTTP_TIMEOUT_S,
                name="the platform",
            )
        )
        self._cert_pem = cert_pem
        self._apply = apply
        self._held = held
        self.poll_s = poll_s
        self._registered = False
        self._acked: dict[str, int] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="secrets sync")

    def wake(self) -> None:
        """Fetch now (the platform said a secret of this device changed)."""
        self._wake.set()

    async def close(self) -> None:
        await tasks.stop(self._task)
        await self._http.close()

    def status(self) -> dict[str, Any]:
        return {"held": self._held(), "rounds": self.rounds, "last_error": self.last_error}

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
                self.last_error = None
            except CloudSyncError as exc:
                self.last_error = exc.one_line()
                log.info("secrets: fetch failed, retried later: %s", self.last_error)
            except Exception:
                log.exception("secrets: sync round failed")
            self.rounds += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def sync_once(self) -> bool:
        """One round; True when the device's secrets changed."""
        if not self._registered:
            await self._http.call("PUT", "/secrets/key", {"cert_pem": self._cert_pem})
            self._registered = True
        answer = await self._http.call("GET", "/secrets")
        offered = answer.get("secrets") if isinstance(answer, dict) else None
        if not isinstance(offered, dict):
            raise CloudSyncError("the platform's secrets answer has no 'secrets' object")
        wanted = {n: e.get("version") for n, e in offered.items() if isinstance(e, dict)}
        changed = wanted != self._held()
        if changed:
            await self._apply(offered)
            log.info("secrets: now holding %s", self._held())
        held = self._held()
        if held != self._acked:
            await self._http.call("POST", "/secrets/ack", {"versions": held})
            self._acked = held
        return changed

"""The sync client's two paths to the platform behind one small interface.

`Transport.send(records)` takes a batch leased from the outbox and says, per record, whether it
was acknowledged (delete it), refused for good (discard it: sending it again cannot help), or
failed (release it for a later round, maybe on the other path). `SyncClient`'s sender picks the
transport per round; neither transport knows about the other or about the outbox.

* `MqttTransport`: one QoS 1 publish per record, concurrently, each carrying its outbox
  idempotency key and kind as MQTT 5 user properties. A PUBACK that says nobody subscribes
  (0x10: the broker restarted without the platform's session and the platform has not
  subscribed again) is a failure, not an acknowledgement: nobody got the record (`unheard`).
* `HttpTransport`: the platform's HTTP API (`POST /v1/devices/{id}/records`, one request per
  batch, all-or-nothing), and `fetch_desired()` for polling desired state while MQTT is down.
  It goes through `cloud_sync.http_client` with the device's mTLS context and token.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cloud_sync.errors import Category, CloudSyncError, NoSubscriber, PublishRefused
from cloud_sync.http_client import AsyncHttpClient, Endpoint, HttpClientError, RemoteError
from cloud_sync.mqtt import USER_PROPERTY_KEY, USER_PROPERTY_KIND, MqttSession
from cloud_sync.outbox import OutboxRecord

# HTTP requests to the platform: connect quickly, answer within this.
HTTP_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class SendResult:
    """Outbox ids of one round by outcome."""

    acked: list[int]
    refused: list[int]
    failed: list[int]
    # Of `failed`: how many the broker took with nobody subscribed (the platform is not back).
    unheard: int = 0


class Transport(Protocol):
    name: str

    async def send(self, records: list[OutboxRecord]) -> SendResult: ...


class MqttTransport:
    name = "mqtt"

    def __init__(self, session: MqttSession) -> None:
        self.session = session

    async def send(self, records: list[OutboxRecord]) -> SendResult:
        results = await asyncio.gather(
            *(
                self.session.publish(
                    r.topic,
                    r.payload,
                    user_properties=[(USER_PROPERTY_KEY, r.key), (USER_PROPERTY_KIND, r.kind)],
                    require_subscriber=True,
                )
                for r in records
            ),
            return_exceptions=True,
        )
        acked: list[int] = []
        refused: list[int] = []
        failed: list[int] = []
        unheard = 0
        for rec, res in zip(records, results, strict=True):
            if res is None:
                acked.append(rec.id)
            elif isinstance(res, PublishRefused) and res.permanent:
                refused.append(rec.id)
            else:
                failed.append(rec.id)
                unheard += isinstance(res, NoSubscriber)
        return SendResult(acked, refused, failed, unheard)


class HttpError(CloudSyncError):
    """An HTTP fallback call failed; `http_refused` when the platform denied the device."""

    code = "http_fallback_failed"
    category: Category = "transport"


class HttpTransport:
    """The platform's HTTP API as a transport: records out, desired documents in."""

    name = "http"

    def __init__(
        self,
        base_url: str,
        device_id: str,
        token: str,
        ssl_ctx: ssl.SSLContext | None,
        *,
        fallback_urls: tuple[str, ...] = (),
    ):
        suffix = f"/v1/devices/{device_id}"
        self._http = AsyncHttpClient(
            Endpoint(
                base_url.rstrip("/") + suffix,
                token=token,
                ssl_context=ssl_ctx,
                timeout_s=HTTP_TIMEOUT_S,
                name="the platform",
                # Other platform replicas (http_failover.py): the next one when this one fails.
                fallback_urls=tuple(u.rstrip("/") + suffix for u in fallback_urls),
            )
        )
        self.base = self._http.endpoint.base_url
        self.last_error: str | None = None
        self.last_error_code: str | None = None
        self.last_ok: float | None = None

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            answer = await self._http.call(method, path, body)
        except RemoteError as exc:
            denied = exc.status in (401, 403)
            raise self._failed(
                HttpError(
                    f"{method} {path}: {exc.message}", code="http_refused" if denied else None
                )
            ) from exc
        except HttpClientError as exc:
            raise self._failed(HttpError(f"{method} {path}: {exc.one_line()}")) from exc
        self.last_ok = time.time()
        self.last_error = self.last_error_code = None
        return answer

    def _failed(self, exc: HttpError) -> HttpError:
        """Remember the failure for the agent's health (`sync.http`), with its stable code."""
        self.last_error, self.last_error_code = exc.message, exc.code
        return exc

    async def send(self, records: list[OutboxRecord]) -> SendResult:
        body = {
            "records": [
                {"key": r.key, "kind": r.kind, "topic": r.topic, "payload": r.payload.decode()}
                for r in records
            ]
        }
        try:
            await self._call("POST", "/records", body)
        except HttpError:
            return SendResult([], [], [r.id for r in records])
        return SendResult([r.id for r in records], [], [])

    async def fetch_desired(self) -> Any:
        return await self._call("GET", "/desired")

"""Secrets over HTTP: the operator stores sealed values, devices fetch them sealed to themselves.

Operator (bearer token)::

    GET  /v1/secrets/key                  the platform's sealing public key (PEM)
    PUT  /v1/secrets/{name}               {"scope": "device"|"group", "target", "box", "size"}
                                          the box sealed to that key by `edge-cloud secret set`
    GET  /v1/secrets[?device=ID|group=G]  names, versions, targets, sizes, acknowledgements

Device (its token or client certificate; only its own id)::

    PUT  /v1/devices/{id}/secrets/key     {"cert_pem"}: its enrolment certificate; checked against
                                          the platform CA and the id, its P-256 key is kept
    GET  /v1/devices/{id}/secrets         {"secrets": {name: {"version", "box"}}}, every box
                                          sealed to that key, bound to (id, name, version)
    POST /v1/devices/{id}/secrets/ack     {"versions": {name: version}}: what it holds now

No clear value is in any body: operator boxes are sealed to the platform, device boxes to the
device. After a `PUT /v1/secrets/{name}` the platform publishes a retained notice (names and
versions, never a value) on `edgefn/v1/devices/{id}/secrets` of every device concerned, so online
devices fetch at once; the others fetch when they reconnect or poll. Logs name secrets, never
values.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_sync import topics
from cloud_sync.errors import MqttError
from cloud_sync.platform.device_auth import OPERATOR
from cloud_sync.platform.devices import DevicesApi
from cloud_sync.platform.registry import error_response
from cloud_sync.platform.secret_store import SecretStore, load_or_create_key
from cloud_sync.sealbox import (
    MAX_VALUE_BYTES,
    SealError,
    device_aad,
    open_box,
    platform_aad,
    public_key_from_pem,
    public_pem,
    seal,
)
from runtimes.permissions import valid_secret_name

log = logging.getLogger("edgefn.secrets")

MAX_BODY_BYTES = 4 * MAX_VALUE_BYTES  # a box is base64 of the value plus a little


class SecretsApi:
    def __init__(
        self, store: SecretStore, key: ec.EllipticCurvePrivateKey, devices: DevicesApi
    ) -> None:
        self.store = store
        self._key = key
        self._devices = devices
        self._public_pem = public_pem(key)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/secrets/key", self.platform_key),
            web.put("/v1/secrets/{name}", self.set_secret),
            web.get("/v1/secrets", self.list_secrets),
            web.put("/v1/devices/{id}/secrets/key", self.register_key),
            web.get("/v1/devices/{id}/secrets", self.device_secrets),
            web.post("/v1/devices/{id}/secrets/ack", self.ack),
        ]

    def _need(self, request: web.Request, device: str | None = None) -> str | web.Response:
        return self._devices._need(request, device=device)

    async def _json(self, request: web.Request) -> dict[str, Any] | web.Response:
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return error_response(413, "too_large", f"a secrets body is at most {MAX_BODY_BYTES}")
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "bad_request", "body must be JSON")
        if not isinstance(body, dict):
            return error_response(400, "bad_request", "body must be a JSON object")
        return body

    # ---- operator ----------------------------------------------------------------------

    async def platform_key(self, request: web.Request) -> web.Response:
        who = self._need(request)
        if isinstance(who, web.Response):
            return who
        return web.json_response({"public_pem": self._public_pem})

    async def set_secret(self, request: web.Request) -> web.Response:
        if isinstance(who := self._need(request), web.Response):
            return who
        if who != OPERATOR:
            return error_response(403, "forbidden", "only the operator sets secrets")
        name = request.match_info["name"]
        if not valid_secret_name(name):
            return error_response(
                400, "bad_secret_name", f"{name!r}: use 1-63 of a-z 0-9 _ -, starting a-z0-9"
            )
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        scope, target, box, size = (body.get(k) for k in ("scope", "target", "box", "size"))
        if scope not in ("device", "group") or not isinstance(target, str):
            return error_response(400, "bad_request", 'expected "scope": device|group, "target"')
        try:
            topics.validate_id(target, f"{scope} id")
        except Exception as exc:  # TopicError: the message says what is allowed
            return error_response(400, "bad_target", str(exc))
        if not isinstance(box, dict) or not isinstance(size, int) or size < 0:
            return error_response(400, "bad_request", 'expected "box" (sealed) and "size"')
        try:  # refuse what could never be delivered: sealed to another key, or altered
            await asyncio.to_thread(open_box, self._key, box, platform_aad(scope, target, name))
        except SealError as exc:
            return error_response(400, exc.code, exc.message)
        version = await asyncio.to_thread(self.store.set, name, scope, target, box, size)
        log.info("secret %s set for %s %s: version %d (%d bytes)", name, scope, target, version,
                 size)  # fmt: skip
        await self._notify(scope, target)
        return web.json_response(
            {"name": name, "scope": scope, "target": target, "version": version}
        )

    async def list_secrets(self, request: web.Request) -> web.Response:
        if isinstance(who := self._need(request), web.Response):
            return who
        if who != OPERATOR:
            return error_response(403, "forbidden", "only the operator lists secrets")
        device, group = request.query.get("device"), request.query.get("group")
        if device:
            groups = await asyncio.to_thread(self._groups, device)
            rows = list((await asyncio.to_thread(self.store.for_device, device, groups)).values())
        elif group:
            rows = await asyncio.to_thread(self.store.rows, "group", group)
        else:
            rows = await asyncio.to_thread(self.store.rows)
        acks = await asyncio.to_thread(self.store.acks)
        out = []
        for r in rows:
            entry = r.listing()
            entry["acknowledged"] = acks.get(r.name, {})
            out.append(entry)
        return web.json_response({"secrets": out})

    # ---- device ------------------------------------------------------------------------

    async def register_key(self, request: web.Request) -> web.Response:
        device = request.match_info["id"]
        if isinstance(who := self._need(request, device), web.Response):
            return who
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        cert_pem = body.get("cert_pem")
        if not isinstance(cert_pem, str):
            return error_response(400, "bad_request", 'expected {"cert_pem": str}')
        problem = self._check_cert(cert_pem, device)
        if problem:
            return error_response(400, "bad_device_certificate", problem)
        pem = public_pem(public_key_from_pem(cert_pem))
        await asyncio.to_thread(self.store.register_key, device, pem)
        return web.json_response({"device": device, "registered": True})

    def _check_cert(self, cert_pem: str, device: str) -> str | None:
        """None when the certificate is this device's, issued by the platform CA."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            cert.verify_directly_issued_by(self._devices.ca.cert)
        except (ValueError, TypeError) as exc:
            return f"not a certificate issued by this platform ({exc})"
        except Exception as exc:  # InvalidSignature
            return f"not signed by this platform's CA ({type(exc).__name__})"
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cns or cns[0].value != device:
            return f"the certificate does not name device {device!r}"
        try:
            public_key_from_pem(cert_pem)
        except SealError as exc:
            return exc.message
        return None

    async def device_secrets(self, request: web.Request) -> web.Response:
        device = request.match_info["id"]
        if isinstance(who := self._need(request, device), web.Response):
            return who
        pem = await asyncio.to_thread(self.store.device_key, device)
        if pem is None:
            return error_response(
                409, "no_device_key", "register the device key first (PUT .../secrets/key)"
            )
        groups = await asyncio.to_thread(self._groups, device)
        rows = await asyncio.to_thread(self.store.for_device, device, groups)
        recipient = public_key_from_pem(pem)

        def reseal() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, r in rows.items():
                value = open_box(self._key, r.sealed, platform_aad(r.scope, r.target, name))
                box = seal(recipient, value, device_aad(device, name, r.version))
                out[name] = {"version": r.version, "box": box}
            return out

        try:
            secrets = await asyncio.to_thread(reseal)
        except SealError as exc:  # a row sealed to another platform key (restored elsewhere)
            log.error("secrets for %s cannot be delivered: %s", device, exc.message)
            return error_response(500, exc.code, exc.message)
        return web.json_response({"secrets": secrets})

    async def ack(self, request: web.Request) -> web.Response:
        device = request.match_info["id"]
        if isinstance(who := self._need(request, device), web.Response):
            return who
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        versions = body.get("versions")
        if not isinstance(versions, dict) or not all(
            valid_secret_name(k) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in versions.items()
        ):
            return error_response(400, "bad_request", 'expected {"versions": {name: int}}')
        await asyncio.to_thread(self.store.ack, device, versions)
        log.info("device %s holds secrets %s", device, versions)
        return web.json_response({"device": device, "versions": versions})

    # ---- helpers -----------------------------------------------------------------------

    def _groups(self, device: str) -> list[str]:
        found = self._devices.store.describe(device)
        group = found[0]["labels"].get("group") if found else None
        return [group] if group else []

    async def _notify(self, scope: str, target: str) -> None:
        """A retained "fetch" notice for each device concerned; no value, names only."""
        intake = self._devices.intake
        if intake is None:
            return
        if scope == "device":
            devices = [target]
        else:
            described = await asyncio.to_thread(self._devices.store.describe)
            devices = [d["id"] for d in described if d["labels"].get("group") == target]
        for device in devices:
            groups = await asyncio.to_thread(self._groups, device)
            rows = await asyncio.to_thread(self.store.for_device, device, groups)
            notice = json.dumps({"versions": {n: r.version for n, r in rows.items()}})
            try:
                await intake.session.publish(
                    topics.device_topic(device, "secrets"), notice.encode(), retain=True
                )
            except MqttError as exc:
                log.info("secrets notice for %s not sent now (%s): it polls", device, exc)


def mount_secrets(app: web.Application, data_dir: Path, devices: DevicesApi) -> SecretsApi:
    """Open `<data_dir>/secrets.db` and the secrets key, add the routes, close on cleanup."""
    store = SecretStore(data_dir / "secrets.db")
    api = SecretsApi(store, load_or_create_key(data_dir), devices)
    app.add_routes(api.routes())

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(store.close)

    app.on_cleanup.append(close)
    return api

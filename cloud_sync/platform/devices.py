"""Devices on the platform's HTTP API: enrolment, registry, desired config, metrics, fallback.

Operator endpoints (operator token):

    POST /v1/devices                      enrol {"id", "labels"} -> 201 the credentials document
    GET  /v1/devices                      every device (the `edge-cloud devices` view)
    POST /v1/devices/{id}/config          {"set": {"dotted.key": value}} -> new desired version
    POST /v1/groups/{name}/config         the same for a group's desired document
    POST /v1/devices/{id}/revoke          revoke its certificate and token
    GET  /v1/devices/{id}/records?kind=K  the latest stored records (events, reported, ...)

Operator or the device itself:

    GET  /v1/devices/{id}                 one device
    GET  /v1/devices/{id}/metrics?function=F   totals per function, latest system gauges

The device itself (the HTTP fallback of MQTT, docs/sync.md):

    GET  /v1/devices/{id}/desired         {"device": instruction | null,
                                           "group": {"name", **instruction} | null}
                                          (instructions: signed envelopes, `director.py`)
    POST /v1/devices/{id}/records         {"records": [{key, kind, topic, payload}]} -> stored

Identity (`DeviceAuth`; `auth(request) -> str | None`, and `auth.result(request)` in the
`(AuthResult, identity)` shape cloud execution takes): the operator token -> "operator"; a device
token issued at enrolment (`Authorization: Bearer`, stored hashed, looked up in the database
and cached briefly: `device_auth.py`) -> the device id; or, when the platform serves HTTPS
(`--tls`), a client certificate verified against the platform CA whose CN is an enrolled,
unrevoked device.

Enrolment issues an EC key + certificate (CN = id, labels as OU) from the platform CA and a
256-bit token, and returns everything the agent needs in one credentials document (the file
format of `cloud_sync/credentials.py` plus `token`, `groups`, `mqtt_protocol` and
`director_key`, the public key that signs every desired document the device will accept).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from cloud_sync import topics
from cloud_sync.credentials import DeviceCredentials, from_dict
from cloud_sync.errors import CloudSyncError, ConfigError, PkiError, TopicError
from cloud_sync.platform.device_auth import OPERATOR, DeviceAuth
from cloud_sync.platform.director import Director
from cloud_sync.platform.fleet_store import (
    DeviceExists,
    FleetStore,
    UnknownDevice,
    apply_assignments,
)
from cloud_sync.platform.intake import MqttIntake
from cloud_sync.platform.pki import IssuedCert, PlatformCA
from cloud_sync.platform.registry import error_response
from cloud_sync.state import validate_config

log = logging.getLogger("edgefn.devices")

# One HTTP fallback batch: what the agent sends per request (its outbox lease size is smaller).
MAX_RECORDS_PER_POST = 500
DEVICE_KINDS_IN = ("reported", "metrics", "events", "rollout")


def _json_error(exc: CloudSyncError, status: int) -> web.Response:
    return error_response(status, exc.code, exc.message)


class DevicesApi:
    def __init__(
        self,
        store: FleetStore,
        ca: PlatformCA,
        auth: DeviceAuth,
        intake: MqttIntake | None,
        *,
        device_broker_url: str,
        public_url: str = "",
        tuf_root: Callable[[], dict[str, Any] | None] | None = None,
        director: Director | None = None,
    ) -> None:
        self.store = store
        self.director = director
        self.ca = ca
        self.auth = auth
        self.intake = intake
        self.device_broker_url = device_broker_url
        self.public_url = public_url
        self._tuf_root = tuf_root  # the TUF root devices pin, None while TUF is not initialised

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/devices", self.enroll),
            web.get("/v1/devices", self.list_devices),
            web.get("/v1/devices/{id}", self.get_device),
            web.post("/v1/devices/{id}/config", self.set_config),
            web.post("/v1/groups/{name}/config", self.set_group_config),
            web.post("/v1/devices/{id}/revoke", self.revoke),
            web.get("/v1/devices/{id}/metrics", self.metrics),
            web.get("/v1/devices/{id}/records", self.list_records),
            web.get("/v1/devices/{id}/desired", self.desired),
            web.post("/v1/devices/{id}/records", self.post_records),
        ]

    # ---- access ------------------------------------------------------------------------

    def _need(self, request: web.Request, *, device: str | None = None) -> str | web.Response:
        who = self.auth(request)
        if who is None:
            if request.headers.get("Authorization"):
                return error_response(403, "forbidden", "credentials not accepted")
            return error_response(
                401, "unauthorized", "send a bearer token", **{"WWW-Authenticate": "Bearer"}
            )
        if who == OPERATOR or (device is not None and who == device):
            return who
        return error_response(403, "forbidden", f"{who} may not do this")

    # ---- operator ----------------------------------------------------------------------

    async def enroll(self, request: web.Request) -> web.Response:
        who = self._need(request)
        if isinstance(who, web.Response):
            return who
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "bad_request", "body must be JSON")
        device_id = body.get("id") if isinstance(body, dict) else None
        labels = body.get("labels") or {} if isinstance(body, dict) else {}
        if not isinstance(device_id, str) or not isinstance(labels, dict):
            return error_response(400, "bad_request", 'expected {"id": str, "labels": {k: v}}')
        labels = {str(k): str(v) for k, v in labels.items()}
        san = body.get("san", [])
        if not isinstance(san, list) or not all(isinstance(n, str) and n for n in san):
            return error_response(400, "bad_request", '"san" must be a list of names or IPs')
        try:
            doc = await asyncio.to_thread(
                self._enroll, device_id, labels, self._platform_url(request), san
            )
        except DeviceExists as exc:
            return _json_error(exc, 409)
        except (PkiError, TopicError) as exc:
            return _json_error(exc, 400)
        await asyncio.to_thread(self.auth.refresh)
        log.info("enrolled device %s (labels %s)", device_id, labels)
        return web.json_response(doc, status=201)

    def _platform_url(self, request: web.Request) -> str:
        return self.public_url or str(request.url.origin())

    def _enroll(
        self, device_id: str, labels: dict[str, str], platform_url: str, san: Sequence[str] = ()
    ) -> dict[str, Any]:
        topics.validate_id(device_id)
        group = labels.get("group")
        if group is not None:
            topics.validate_id(group, "group name")
        if self.store.exists(device_id):
            raise DeviceExists(f"device {device_id!r} is already enrolled")
        issued = self.ca.issue_device_cert(device_id, labels)
        server = self._server_cert(device_id, san)
        token = secrets.token_urlsafe(32)
        creds = DeviceCredentials(
            device_id=device_id,
            platform_url=platform_url,
            broker_url=self.device_broker_url,
            ca_pem=self.ca.cert_pem,
            cert_pem=issued.cert_pem,
            key_pem=issued.key_pem,
        )
        from_dict(json.loads(creds.to_json()))  # never hand out what the agent would refuse
        self.store.enroll(device_id, labels, token, issued.serial)
        doc: dict[str, Any] = json.loads(creds.to_json())
        doc["token"] = token
        doc["groups"] = [group] if group else []
        doc["mqtt_protocol"] = "3.1.1" if self.intake and self.intake.mqtt311 else "5"
        doc["server_cert_pem"] = server.cert_pem
        doc["server_key_pem"] = server.key_pem
        tuf_root = self._tuf_root() if self._tuf_root is not None else None
        if tuf_root is not None:
            doc["tuf_root"] = tuf_root  # the device's pinned trust in the registry's metadata
        if self.director is not None:
            doc["director_key"] = self.director.public_pem
        return doc

    def _server_cert(self, device_id: str, san: Sequence[str]) -> IssuedCert:
        """The certificate the agent's LAN listener serves (`edge-agent run --tls auto`).

        From the fleet CA, so LAN clients pin that CA and an impostor found through spoofed mDNS
        cannot pass for the device. It names the device id (what discovery reports) plus the
        names and IPs the operator gives (what clients dial).
        """
        ips, names = [], [device_id]
        for item in san:
            try:
                ips.append(str(ipaddress.ip_address(item)))
            except ValueError:
                names.append(item)
        return self.ca.issue_server_cert(hostnames=tuple(names), ips=tuple(ips))

    async def list_devices(self, request: web.Request) -> web.Response:
        who = self._need(request)
        if isinstance(who, web.Response):
            return who
        return web.json_response({"devices": await asyncio.to_thread(self.store.describe)})

    async def get_device(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        who = self._need(request, device=device_id)
        if isinstance(who, web.Response):
            return who
        found = await asyncio.to_thread(self.store.describe, device_id)
        if not found:
            return error_response(404, "unknown_device", f"no device {device_id!r}")
        return web.json_response(found[0])

    async def _assignments(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The operator's `{"set": {"dotted.key": value}}`, or the refusal (auth, body) to send."""
        who = self._need(request)
        if isinstance(who, web.Response):
            return who
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "bad_request", "body must be JSON")
        sets = body.get("set") if isinstance(body, dict) else None
        if not isinstance(sets, dict) or not sets:
            return error_response(400, "bad_request", 'expected {"set": {"dotted.key": value}}')
        return sets

    async def set_config(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        sets = await self._assignments(request)
        if isinstance(sets, web.Response):
            return sets
        try:
            current = await asyncio.to_thread(self.store.desired, device_id)
            config = apply_assignments(current.config, sets)
            validate_config(config, f"config for {device_id}")
        except UnknownDevice as exc:
            return _json_error(exc, 404)
        except ConfigError as exc:
            return web.json_response({"error": exc.to_dict()}, status=422)
        desired = await asyncio.to_thread(self.store.set_desired, device_id, config)
        published = await self.intake.publish_desired(device_id) if self.intake else False
        return web.json_response({**desired.document(), "published": published})

    async def set_group_config(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        sets = await self._assignments(request)
        if isinstance(sets, web.Response):
            return sets
        try:
            topics.validate_id(name, "group name")
            current = await asyncio.to_thread(self.store.group_desired, name)
            config = apply_assignments(current.config if current else {}, sets)
            validate_config(config, f"config for group {name}")
        except TopicError as exc:
            return _json_error(exc, 400)
        except ConfigError as exc:
            return web.json_response({"error": exc.to_dict()}, status=422)
        desired = await asyncio.to_thread(self.store.set_group_desired, name, config)
        published = await self.intake.publish_group(name) if self.intake else False
        return web.json_response({**desired.document(), "published": published})

    async def revoke(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        who = self._need(request)
        if isinstance(who, web.Response):
            return who
        try:
            serial = await asyncio.to_thread(self.store.revoke, device_id)
        except UnknownDevice as exc:
            return _json_error(exc, 404)
        await asyncio.to_thread(self.ca.revoke, serial, "revoked by operator")
        await asyncio.to_thread(self.auth.refresh)
        return web.json_response(
            {"device": device_id, "revoked_serial": f"{serial:x}", "crl": str(self.ca.crl_path)}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        who = self._need(request, device=device_id)
        if isinstance(who, web.Response):
            return who
        function = request.query.get("function") or None
        try:
            summary = await asyncio.to_thread(self.store.metrics_summary, device_id, function)
        except UnknownDevice as exc:
            return _json_error(exc, 404)
        return web.json_response(summary)

    async def list_records(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        who = self._need(request)
        if isinstance(who, web.Response):
            return who
        kind = request.query.get("kind") or None
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return error_response(400, "bad_request", "limit must be an integer")
        items = await asyncio.to_thread(self.store.records, device_id, kind, limit)
        counts = await asyncio.to_thread(self.store.record_counts, device_id)
        return web.json_response({"device": device_id, "counts": counts, "records": items})

    # ---- the device's HTTP fallback ----------------------------------------------------

    async def desired(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        who = self._need(request, device=device_id)
        if isinstance(who, web.Response):
            return who
        try:
            mine = await asyncio.to_thread(self.store.desired, device_id)
            info = await asyncio.to_thread(self.store.describe, device_id)
        except UnknownDevice as exc:
            return _json_error(exc, 404)
        await asyncio.to_thread(self.store.seen, device_id, via="http")
        group_name = (info[0]["labels"] if info else {}).get("group")
        group = None
        if group_name:
            g = await asyncio.to_thread(self.store.group_desired, group_name)
            if g is not None:
                gdoc = g.document()
                if self.director is not None:
                    gdoc = await asyncio.to_thread(self.director.for_group, group_name, gdoc)
                group = {"name": group_name, **gdoc}
        device: dict[str, Any] | None = None
        if mine.version > 0:
            device = mine.document()
            if self.director is not None:
                device = await asyncio.to_thread(self.director.for_device, device_id, device)
        return web.json_response({"device": device, "group": group})

    async def post_records(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        who = self._need(request, device=device_id)
        if isinstance(who, web.Response):
            return who
        try:
            body = await request.json()
            records = body["records"]
            if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_POST:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return error_response(
                400,
                "bad_request",
                f'expected {{"records": [...]}} (at most {MAX_RECORDS_PER_POST})',
            )
        parsed = []
        for rec in records:
            try:
                topic = topics.parse(str(rec["topic"]))
                payload = str(rec["payload"]).encode()
                key = rec.get("key")
            except (KeyError, TypeError, TopicError) as exc:
                return error_response(400, "bad_record", f"bad record: {exc}")
            if (
                topic.scope != "device"
                or topic.id != device_id
                or topic.kind not in DEVICE_KINDS_IN
            ):
                return error_response(403, "forbidden", f"{device_id} may not write {topic}")
            parsed.append((topic, payload, key if isinstance(key, str) else None))
        stored = duplicates = 0
        for topic, payload, key in parsed:
            new = await asyncio.to_thread(
                self.store.ingest, device_id, topic.kind, str(topic), payload, key=key, via="http"
            )
            stored += new
            duplicates += not new
        if not parsed:
            await asyncio.to_thread(self.store.seen, device_id, via="http")
        return web.json_response({"stored": stored, "duplicates": duplicates})

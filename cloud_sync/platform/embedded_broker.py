"""The default MQTT broker: amqtt (pure Python) inside the platform process, on loopback.

`edge-cloud serve` without `--broker` starts one so a laptop demo (`make run`) needs nothing
installed. It enforces the same rules as the generated Mosquitto config
(`broker_config.py`), with two small plugins instead of config lines:

* `CertIdentityAuth`: a TLS client certificate signed by the platform CA is required (the
  listener verifies it; amqtt asks for it with CERT_OPTIONAL, so a client without one reaches
  this plugin and is refused here). Its CN must equal the MQTT client id and its serial must not
  be revoked. The CN becomes the session's username (Mosquitto's `use_identity_as_username`).
* `SubtreeAcl`: the ACL of `broker_config.render_acl`: a device publishes and receives only in
  `edgefn/v1/devices/<its id>/`, reads `edgefn/v1/groups/...`; the platform identity everything.

amqtt speaks MQTT 3.1.1 only, so sessions to it run with `mqtt311=True` (no user properties:
the platform dedupes those records by payload digest). It carried ~1.8 k QoS 1 msg/s sharing the
platform's loop: the default for one host, not for a fleet -- use `--broker mqtts://...` there.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.contexts import Action  # type: ignore[import-untyped]
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # type: ignore[import-untyped]
from amqtt.session import Session  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.x509.oid import NameOID

from cloud_sync.platform.pki import PLATFORM_IDENTITY, PlatformCA
from cloud_sync.topics import PREFIX
from runtimes.fsio import atomic_write

log = logging.getLogger("edgefn.broker")


def _cert_identity(session: Session) -> tuple[str, int] | None:
    obj = session.ssl_object
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(cns[0].value), cert.serial_number) if cns else None


class CertIdentityAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Client certificate CN = client id, not revoked; the CN becomes the username."""

    @dataclass
    class Config:
        pki_dir: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        ident = _cert_identity(session)
        if ident is None:
            log.info("refused %s: no client certificate", session.client_id)
            return False
        cn, serial = ident
        if cn != session.client_id:
            log.info("refused %s: certificate is for %s", session.client_id, cn)
            return False
        ca_dir = Path(self.config.pki_dir)
        revoked = await asyncio.to_thread(_is_revoked, ca_dir, serial)
        if revoked:
            log.info("refused %s: certificate %x is revoked", cn, serial)
            return False
        session.username = cn
        return True


def _is_revoked(pki_dir: Path, serial: int) -> bool:
    # PlatformCA.is_revoked without loading the CA key: read the same revoked.json.
    import json

    try:
        data = json.loads((pki_dir / "revoked.json").read_text())
    except FileNotFoundError:
        return False
    return any(int(r["serial"]) == serial for r in data.get("revoked", []))


class SubtreeAcl(BaseTopicPlugin):  # type: ignore[misc]
    """`pattern readwrite edgefn/v1/devices/%u/#`, `pattern read edgefn/v1/groups/#`."""

    @dataclass
    class Config:
        platform_identity: str = PLATFORM_IDENTITY

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        user = session.username if session is not None else None
        if not user or topic is None:
            return False
        if user == self.config.platform_identity:
            return True
        if topic.startswith(f"{PREFIX}/devices/{user}/"):
            return True
        return action != Action.PUBLISH and topic.startswith(f"{PREFIX}/groups/")


@dataclass(frozen=True, slots=True)
class EmbeddedBroker:
    broker: Broker
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.broker.shutdown()


async def start_embedded_broker(ca: PlatformCA, directory: Path, port: int) -> EmbeddedBroker:
    """Issue the listener's certificate, start amqtt on 127.0.0.1:`port` (0 picks one)."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True, mode=0o700)
    if port == 0:
        port = await asyncio.to_thread(free_port)
    server = await asyncio.to_thread(ca.issue_server_cert)
    certfile, keyfile = directory / "server.crt", directory / "server.key"
    await asyncio.to_thread(atomic_write, certfile, server.cert_pem.encode(), mode=0o644)
    await asyncio.to_thread(atomic_write, keyfile, server.key_pem.encode(), mode=0o600)
    config: dict[str, Any] = {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"127.0.0.1:{port}",
                "ssl": True,
                "cafile": str(ca.cert_path),
                "certfile": str(certfile),
                "keyfile": str(keyfile),
            }
        },
        "plugins": {
            f"{__name__}.CertIdentityAuth": {"pki_dir": str(ca.directory)},
            f"{__name__}.SubtreeAcl": {},
        },
    }
    broker = Broker(config)
    await broker.start()
    log.info("embedded MQTT broker (amqtt, MQTT 3.1.1, TLS) on 127.0.0.1:%d", port)
    return EmbeddedBroker(broker, "127.0.0.1", port)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

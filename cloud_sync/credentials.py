"""Device credentials: one JSON file the platform hands out at enrolment, and the TLS context.

The file (`credentials.json` in the agent's data dir, mode 0600)::

    {
      "format": 1,
      "device_id": "edge-01",
      "platform_url": "https://platform.example:8443",
      "broker_url": "mqtts://broker.example:8883",
      "ca_pem": "-----BEGIN CERTIFICATE-----...",      # the platform CA: trusts broker/platform
      "cert_pem": "-----BEGIN CERTIFICATE-----...",    # this device, CN = device_id
      "key_pem": "-----BEGIN PRIVATE KEY-----..."
    }

Enrolment adds extras beside these (`load_credentials_extras` below reads them):
`token`, `groups`, `mqtt_protocol`, and `director_key`, the PEM public key that signs every
desired document the device accepts (`cloud_sync.director_check`).

`save` writes it atomically (temp file in the same directory, fsync, rename, fsync the directory)
and never lets the key exist with a wider mode, not even for a moment. `load` checks everything it
can without the network -- JSON shape, id syntax, URLs, that the certificate parses, names this
device, and matches the key -- and says which field is wrong. `ssl_context` builds the client
context from the PEMs held in memory: the key is handed to OpenSSL through an anonymous memfd, so
it is never written anywhere else on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from cloud_sync.errors import CredentialsError, TopicError
from cloud_sync.topics import validate_id
from runtimes.fsio import atomic_write

FORMAT = 1
FILE_NAME = "credentials.json"
MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def server_cert_paths(credentials_file: Path) -> tuple[Path, Path]:
    """Where enrolment puts the device's LAN server certificate and key: beside the credentials.

    `credentials.json` -> `credentials.server.crt`, `credentials.server.key`. Derived from the
    credentials file's name so that an operator enrolling several devices into one directory
    gets one pair per device; `edge-agent run --tls auto` finds them the same way.
    """
    stem = credentials_file.with_suffix("")
    return stem.with_name(stem.name + ".server.crt"), stem.with_name(stem.name + ".server.key")


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    device_id: str
    platform_url: str
    broker_url: str
    ca_pem: str
    cert_pem: str
    key_pem: str

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2).encode() + b"\n"

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker_url(self.broker_url)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl_context(self.ca_pem, self.cert_pem, self.key_pem)


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtts://host[:8883]` (TLS) or `mqtt://host[:1883]` (plain, development only)."""
    parts = urlsplit(url)
    if parts.scheme not in MQTT_PORTS or not parts.hostname:
        raise CredentialsError(
            f"broker_url must look like mqtts://host:8883 (or mqtt://host:1883), got {url!r}"
        )
    try:
        port = parts.port or MQTT_PORTS[parts.scheme]
    except ValueError as exc:
        raise CredentialsError(f"broker_url has a bad port: {url!r}") from exc
    return BrokerAddress(parts.hostname, port, parts.scheme == "mqtts")


def from_dict(data: Any, where: str = "credentials") -> DeviceCredentials:
    """Validate a decoded credentials document; every problem is named with its field."""
    if not isinstance(data, dict):
        raise CredentialsError(f"{where}: must be a JSON object")
    if data.get("format", FORMAT) != FORMAT:
        raise CredentialsError(f"{where}: unsupported format {data.get('format')!r}")
    problems: list[str] = []
    fields = ("device_id", "platform_url", "broker_url", "ca_pem", "cert_pem", "key_pem")
    for name in fields:
        if not isinstance(data.get(name), str) or not data[name]:
            problems.append(f"'{name}' is missing or not a string")
    if problems:
        raise CredentialsError(f"{where}: " + "; ".join(problems))
    creds = DeviceCredentials(**{name: data[name] for name in fields})
    try:
        validate_id(creds.device_id)
    except TopicError as exc:
        problems.append(f"'device_id': {exc.message}")
    try:
        parse_broker_url(creds.broker_url)
    except CredentialsError as exc:
        problems.append(exc.message)
    if urlsplit(creds.platform_url).scheme not in ("http", "https"):
        problems.append(f"'platform_url' must be an http(s) URL, got {creds.platform_url!r}")
    try:
        x509.load_pem_x509_certificates(creds.ca_pem.encode())
    except ValueError as exc:
        problems.append(f"'ca_pem' is not a PEM certificate ({exc})")
    try:
        cert = x509.load_pem_x509_certificate(creds.cert_pem.encode())
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else None
        if cn != creds.device_id:
            problems.append(f"'cert_pem' is for CN={cn!r}, not device {creds.device_id!r}")
    except ValueError as exc:
        problems.append(f"'cert_pem' is not a PEM certificate ({exc})")
    if problems:
        raise CredentialsError(f"{where}: " + "; ".join(problems))
    ssl_context(creds.ca_pem, creds.cert_pem, creds.key_pem, where=where)  # key matches cert?
    return creds


def load(path: Path | str) -> DeviceCredentials:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise CredentialsError(
            f"no device credentials at {path}: enrol the device first", code="not_enrolled"
        ) from exc
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CredentialsError(f"{path}: not valid JSON ({exc})") from exc
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CredentialsError(
            f"{path} is readable by others (mode {mode:o}); it holds the device key: chmod 600"
        )
    return from_dict(data, str(path))


def save(path: Path | str, creds: DeviceCredentials) -> None:
    """Write atomically with mode 0600 from the first byte."""
    from_dict(json.loads(creds.to_json()))  # never persist something `load` would refuse
    atomic_write(Path(path), creds.to_json(), mode=0o600)


@contextlib.contextmanager
def _pem_paths(*pems: str) -> Iterator[list[str]]:
    """Paths OpenSSL can read for in-memory PEMs: memfds on Linux, a private temp dir otherwise."""
    fds: list[int] = []
    if hasattr(os, "memfd_create"):
        try:
            for pem in pems:
                fd = os.memfd_create("edgefn-pem", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, pem.encode())
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="edgefn-pem-") as d:  # pragma: no cover (non-Linux)
        paths = []
        for i, pem in enumerate(pems):
            p = Path(d) / f"{i}.pem"
            p.touch(mode=0o600)
            p.write_text(pem)
            paths.append(str(p))
        yield paths


def ssl_context(
    ca_pem: str, cert_pem: str, key_pem: str, *, where: str = "credentials"
) -> ssl.SSLContext:
    """A TLS client context: trust only the platform CA, present the device certificate.

    Hostname checking stays on (the broker's certificate must name the host we dial, e.g.
    localhost/127.0.0.1 for the embedded broker). TLS 1.2 is the floor.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise CredentialsError(f"{where}: 'ca_pem' cannot be loaded ({exc})") from exc
    try:
        with _pem_paths(cert_pem, key_pem) as (cert_path, key_path):
            ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise CredentialsError(
            f"{where}: 'cert_pem'/'key_pem' cannot be used together ({exc.reason or exc})"
        ) from exc
    return ctx


def read_tuf_root(path: Path | str) -> bytes | None:
    """The TUF root pinned at enrolment (`"tuf_root"`: the root.json document), or None.

    Read on its own, without the rest of `load`'s checks: `edge-agent fn install --credentials`
    needs only this field, and a device enrolled before TUF has none (then it is None, and
    `update_security` decides whether that is acceptable). Returned as JSON bytes for
    python-tuf (signatures cover the canonical form of `signed`, so re-encoding is harmless).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise CredentialsError(
            f"no device credentials at {path}: enrol the device first", code="not_enrolled"
        ) from exc
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise CredentialsError(f"{path}: not valid JSON ({exc})") from exc
    root = data.get("tuf_root") if isinstance(data, dict) else None
    if root is None:
        return None
    if not isinstance(root, dict) or not isinstance(root.get("signed"), dict):
        raise CredentialsError(f"{path}: 'tuf_root' is not a TUF root.json document")
    return json.dumps(root, separators=(",", ":")).encode()


def load_credentials_extras(path: Path) -> dict[str, Any]:
    """The enrolment extras next to the standard fields: token, groups, mqtt_protocol,
    director_key."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    groups = data.get("groups") or []
    return {
        "token": data.get("token") if isinstance(data.get("token"), str) else "",
        "groups": tuple(str(g) for g in groups if isinstance(g, str)),
        "mqtt311": data.get("mqtt_protocol") == "3.1.1",
        "director_key": data.get("director_key")
        if isinstance(data.get("director_key"), str)
        else "",
    }

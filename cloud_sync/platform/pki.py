"""The platform's certificate authority: device identities for mutual TLS on the broker.

Layout under `<data_dir>/pki/`::

    ca.key        CA private key (0600, EC P-256)
    ca.crt        CA certificate (what devices and the broker trust)
    revoked.json  {"crl_number": n, "revoked": [{"serial", "revoked_at", "reason"}]}
    crl.pem       the current CRL, regenerated on every revocation (Mosquitto `crlfile`)

Flow: `PlatformCA.load_or_create(data_dir)` once at platform start (it also refreshes a CRL that
is past half its life -- OpenSSL refuses *every* client once the CRL's nextUpdate passes);
`issue_device_cert(device_id, labels)` at enrolment (CN = device id, so Mosquitto's
`use_identity_as_username` makes the ACL's `%u` the device id); `issue_server_cert()` for the
broker and the platform's HTTPS listener; `revoke(serial)` rewrites crl.pem -- the broker reads it
at start and on SIGHUP, so signal or restart it after revoking.

EC P-256 keys: fast to make (tests issue dozens), small on the wire, supported by every TLS stack
we meet (Mosquitto/OpenSSL, Python ssl, Go, Node).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_sync.errors import PkiError, TopicError
from cloud_sync.topics import validate_id
from runtimes.fsio import atomic_write

# The platform's own MQTT identity (certificate CN -> broker username). The ACL gives it the whole
# tree, so no device may ever be issued this name.
PLATFORM_IDENTITY = "edgefn-platform"
RESERVED_IDENTITIES = frozenset({PLATFORM_IDENTITY})

CA_DAYS = 3650
DEVICE_CERT_DAYS = 825  # the CA/Browser Forum's old maximum: long enough for a fleet, not forever
SERVER_CERT_DAYS = 397
CRL_DAYS = 30  # nextUpdate: an expired CRL locks every device out, so refresh at half-life
CLOCK_SKEW = dt.timedelta(minutes=5)  # devices with slightly wrong clocks must accept new certs
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class IssuedCert:
    common_name: str
    serial: int
    not_after: dt.datetime
    cert_pem: str
    key_pem: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class PlatformCA:
    """Create with `load_or_create`; every method is synchronous and quick (~ms)."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.directory = directory
        self._key = key
        self.cert = cert

    # ---- files ---------------------------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def _revoked_path(self) -> Path:
        return self.directory / "revoked.json"

    @property
    def cert_pem(self) -> str:
        return _cert_pem(self.cert)

    @classmethod
    def load_or_create(
        cls, data_dir: Path | str, *, common_name: str = "edgefn platform CA"
    ) -> PlatformCA:
        directory = Path(data_dir) / "pki"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(directory / ".lock"):
            key_path, cert_path = directory / "ca.key", directory / "ca.crt"
            if key_path.exists() != cert_path.exists():
                raise PkiError(f"{directory}: ca.key and ca.crt must both exist or both be absent")
            exists = key_path.exists()
            ca = cls._load(directory) if exists else cls._create(directory, common_name)
            if ca._crl_due():
                ca._write_crl(ca._read_revoked())
            return ca

    @classmethod
    def _load(cls, directory: Path) -> PlatformCA:
        key_path = directory / "ca.key"
        if key_path.stat().st_mode & 0o077:
            raise PkiError(f"{key_path} is readable by others: chmod 600")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot load the platform CA from {directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path}: expected an EC private key")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise PkiError(f"{directory}: ca.key does not match ca.crt")
        return cls(directory, key, cert)

    @classmethod
    def _create(cls, directory: Path, common_name: str) -> PlatformCA:
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefn"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash between the two writes leaves a key without a cert, which
        # load_or_create reports instead of silently minting a second CA.
        atomic_write(directory / "ca.key", _key_pem(key).encode(), mode=0o600)
        atomic_write(directory / "ca.crt", _cert_pem(cert).encode(), mode=0o644)
        return cls(directory, key, cert)

    # ---- issuing -------------------------------------------------------------------------------

    def issue_device_cert(
        self,
        device_id: str,
        labels: Mapping[str, str] | None = None,
        *,
        days: int = DEVICE_CERT_DAYS,
    ) -> IssuedCert:
        """A client certificate with CN = device id; labels ride along as `OU=key=value`.

        Labels in the certificate are informational (who/what this device was enrolled as);
        rollout targeting reads the platform's device registry, which can change without
        re-issuing.
        """
        try:
            validate_id(device_id)
        except TopicError as exc:
            raise PkiError(exc.message, code="bad_device_id") from exc
        if device_id in RESERVED_IDENTITIES:
            raise PkiError(f"{device_id!r} is reserved for the platform", code="bad_device_id")
        extra: list[x509.NameAttribute[str]] = []
        for k, v in sorted((labels or {}).items()):
            if not LABEL_RE.match(str(k)) or not LABEL_RE.match(str(v)):
                raise PkiError(f"label {k!r}={v!r}: use letters, digits, '.', '_', '-' (1-63)")
            extra.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{k}={v}"))
        return self._issue(device_id, extra, client=True, days=days)

    def issue_client_cert(self, common_name: str, *, days: int = DEVICE_CERT_DAYS) -> IssuedCert:
        """A client certificate for a non-device identity, e.g. `PLATFORM_IDENTITY`."""
        validate_id(common_name, "identity")
        return self._issue(common_name, [], client=True, days=days)

    def issue_server_cert(
        self,
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1", "::1"),
        *,
        days: int = SERVER_CERT_DAYS,
    ) -> IssuedCert:
        """For the broker / platform HTTPS: clients check the host they dial against the SAN."""
        if not hostnames and not ips:
            raise PkiError("a server certificate needs at least one hostname or IP")
        try:
            san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
            san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise PkiError(f"bad server name: {exc}") from exc
        cn = hostnames[0] if hostnames else ips[0]
        return self._issue(cn, [], client=False, days=days, san=san)

    def _issue(
        self,
        cn: str,
        extra: list[x509.NameAttribute[str]],
        *,
        client: bool,
        days: int,
        san: list[x509.GeneralName] | None = None,
    ) -> IssuedCert:
        key = _new_key()
        now = _now()
        not_after = now + dt.timedelta(days=days)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefn"),
                        *extra,
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(not_after, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCert(
            common_name=cn,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
            cert_pem=_cert_pem(cert),
            key_pem=_key_pem(key),
        )

    # ---- revocation ----------------------------------------------------------------------------

    def revoke(self, cert_or_serial: int | str, reason: str = "unspecified") -> None:
        """Add a certificate (PEM or serial) to the CRL and rewrite crl.pem."""
        if isinstance(cert_or_serial, str):
            try:
                serial = x509.load_pem_x509_certificate(cert_or_serial.encode()).serial_number
            except ValueError as exc:
                raise PkiError(f"not a PEM certificate: {exc}") from exc
        else:
            serial = cert_or_serial
        with _locked(self.directory / ".lock"):
            state = self._read_revoked()
            if any(r["serial"] == serial for r in state["revoked"]):
                return
            state["revoked"].append(
                {"serial": serial, "revoked_at": _now().isoformat(), "reason": reason}
            )
            self._write_revoked(state)
            self._write_crl(state)

    def is_revoked(self, serial: int) -> bool:
        return any(r["serial"] == serial for r in self._read_revoked()["revoked"])

    def refresh_crl(self, *, force: bool = False) -> bool:
        """Rewrite crl.pem if forced or past half its validity; True if it was rewritten."""
        with _locked(self.directory / ".lock"):
            if not force and not self._crl_due():
                return False
            self._write_crl(self._read_revoked())
        return True

    def _crl_due(self) -> bool:
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return True
        next_update = crl.next_update_utc
        return next_update is None or next_update - _now() < dt.timedelta(days=CRL_DAYS / 2)

    def crl_pem(self) -> bytes:
        return self.crl_path.read_bytes()

    def _read_revoked(self) -> dict[str, Any]:
        try:
            data = json.loads(self._revoked_path.read_text())
        except FileNotFoundError:
            return {"crl_number": 0, "revoked": []}
        except (OSError, ValueError) as exc:
            raise PkiError(f"{self._revoked_path}: unreadable ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("revoked"), list):
            raise PkiError(f"{self._revoked_path}: unexpected content")
        return data

    def _write_revoked(self, state: Mapping[str, Any]) -> None:
        atomic_write(self._revoked_path, json.dumps(state, indent=2).encode(), mode=0o600)

    def _write_crl(self, state: dict[str, Any]) -> None:
        state["crl_number"] = int(state.get("crl_number", 0)) + 1
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(state["crl_number"]), critical=False)
        )
        for entry in state["revoked"]:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"]))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        self._write_revoked(state)
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise CA writes between platform processes sharing one data dir."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

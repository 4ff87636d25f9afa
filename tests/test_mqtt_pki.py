"""Platform CA, device credentials file and the generated Mosquitto config/ACL."""

from __future__ import annotations

import json
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_sync import credentials
from cloud_sync.credentials import DeviceCredentials, parse_broker_url
from cloud_sync.errors import CredentialsError, PkiError
from cloud_sync.platform.broker_config import render_acl, render_config, write_broker_files
from cloud_sync.platform.pki import PLATFORM_IDENTITY, PlatformCA


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_ca_is_created_once_with_a_private_key(tmp_path: Path) -> None:
    ca = PlatformCA.load_or_create(tmp_path)
    assert mode(ca.key_path) == 0o600
    assert ca.crl_path.exists()
    again = PlatformCA.load_or_create(tmp_path)
    assert again.cert_pem == ca.cert_pem
    ca.key_path.chmod(0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        PlatformCA.load_or_create(tmp_path)
    ca.key_path.chmod(0o600)
    other = PlatformCA.load_or_create(tmp_path / "other")
    ca.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        PlatformCA.load_or_create(tmp_path)


def test_device_certificate_names_the_device(tmp_path: Path) -> None:
    ca = PlatformCA.load_or_create(tmp_path)
    issued = ca.issue_device_cert("edge-01", {"site": "lyon", "hw": "rpi4"})
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-01"
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    assert ous == ["hw=rpi4", "site=lyon"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert issued.serial == cert.serial_number


@pytest.mark.parametrize("bad", [PLATFORM_IDENTITY, "a/b", "+", "#", ""])
def test_reserved_or_unsafe_device_ids_are_not_issued(tmp_path: Path, bad: str) -> None:
    ca = PlatformCA.load_or_create(tmp_path)
    with pytest.raises(PkiError):
        ca.issue_device_cert(bad)


def test_server_certificate_covers_loopback(tmp_path: Path) -> None:
    ca = PlatformCA.load_or_create(tmp_path)
    cert = x509.load_pem_x509_certificate(ca.issue_server_cert().cert_pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_revocation_lands_in_the_crl(tmp_path: Path) -> None:
    ca = PlatformCA.load_or_create(tmp_path)
    a, b = ca.issue_device_cert("a"), ca.issue_device_cert("b")
    number_before = x509.load_pem_x509_crl(ca.crl_pem()).extensions.get_extension_for_class(
        x509.CRLNumber
    )
    ca.revoke(a.cert_pem)
    ca.revoke(a.serial)  # idempotent
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(a.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(b.serial) is None
    assert len(list(crl)) == 1
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > number_before.value.crl_number
    assert ca.is_revoked(a.serial) and not ca.is_revoked(b.serial)
    # A fresh load keeps the revocation.
    assert PlatformCA.load_or_create(tmp_path).is_revoked(a.serial)


def make_creds(tmp_path: Path, device_id: str = "edge-01") -> DeviceCredentials:
    ca = PlatformCA.load_or_create(tmp_path / "platform")
    issued = ca.issue_device_cert(device_id)
    return DeviceCredentials(
        device_id=device_id,
        platform_url="https://platform.example:8443",
        broker_url="mqtts://broker.example",
        ca_pem=ca.cert_pem,
        cert_pem=issued.cert_pem,
        key_pem=issued.key_pem,
    )


def test_credentials_round_trip_with_mode_0600(tmp_path: Path) -> None:
    creds = make_creds(tmp_path)
    path = tmp_path / "agent" / credentials.FILE_NAME
    credentials.save(path, creds)
    assert mode(path) == 0o600
    assert sorted(os.listdir(path.parent)) == [credentials.FILE_NAME]  # no temp file left
    assert credentials.load(path) == creds
    assert json.loads(path.read_text())["format"] == credentials.FORMAT
    ctx = creds.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert creds.broker == parse_broker_url("mqtts://broker.example:8883")


def test_credentials_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    with pytest.raises(CredentialsError) as info:
        credentials.load(path)
    assert info.value.code == "not_enrolled"
    path.write_text("{")
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match="not valid JSON"):
        credentials.load(path)
    creds = make_creds(tmp_path)
    credentials.save(path, creds)
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        credentials.load(path)
    other = make_creds(tmp_path, "edge-02")
    doc = json.loads(creds.to_json())
    cases = {
        "cert_pem": (other.cert_pem, "CN='edge-02'"),
        "key_pem": (other.key_pem, "cannot be used together"),
        "broker_url": ("http://x", "broker_url"),
        "device_id": ("a/b", "device_id"),
        "ca_pem": ("nope", "ca_pem"),
    }
    for field, (value, expected) in cases.items():
        with pytest.raises(CredentialsError, match=expected):
            credentials.from_dict({**doc, field: value})
    with pytest.raises(CredentialsError, match="'key_pem' is missing"):
        credentials.from_dict({k: v for k, v in doc.items() if k != "key_pem"})


def test_acl_confines_devices_to_their_subtree() -> None:
    acl = render_acl().splitlines()
    assert "pattern readwrite edgefn/v1/devices/%u/#" in acl
    assert "pattern read edgefn/v1/groups/#" in acl
    i = acl.index(f"user {PLATFORM_IDENTITY}")
    assert acl[i + 1] == "topic readwrite edgefn/#"
    assert not any(line.startswith("topic") for line in acl[:i])


def test_config_requires_client_certificates(tmp_path: Path) -> None:
    ca = PlatformCA.load_or_create(tmp_path / "platform")
    files = write_broker_files(ca, tmp_path / "broker", port=18883, persistence=True)
    text = files.config.read_text().splitlines()
    for line in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        f"crlfile {files.crlfile}",
        f"acl_file {files.acl}",
        "listener 18883 127.0.0.1",
        "persistence true",
    ):
        assert line in text
    assert mode(files.keyfile) == 0o600
    with pytest.raises(ValueError, match="whitespace"):
        render_config(
            port=1,
            cafile=Path("/a b"),
            certfile=files.certfile,
            keyfile=files.keyfile,
            crlfile=files.crlfile,
            acl_file=files.acl,
        )

"""Sealed boxes: encrypt a small value to one P-256 public key (ECIES), for secrets.

Why this shape: secrets (docs/building-blocks.md, "Secrets") must never be in clear in an HTTP
body, on the broker, in a log, or at rest. Every holder already has a P-256 key pair -- a device
has the one from its enrolment certificate (`cloud_sync/credentials.py`), the platform keeps one
for secrets (`cloud_sync/platform/secret_store.py`) -- so a value is sealed to the recipient's
public key and only its private key opens it:

    ephemeral P-256 key e;  z = ECDH(e, recipient)
    key = HKDF-SHA256(z, salt = e's public point, info = "edgefn sealbox v1", 32 bytes)
    ct  = AES-256-GCM(key, random 96-bit nonce, value, associated data)

The associated data names what the value is (device id, secret name, version), so a sealed box
cannot be replayed as another secret, for another device, or as an older version: it would not
open. A fresh ephemeral key per box means the AES key is never reused; GCM's random nonce is then
belt and braces. The envelope is a JSON-able dict of base64 strings.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloud_sync.errors import CloudSyncError

ALG = "ECIES-P256-HKDF-SHA256-A256GCM"
_INFO = b"edgefn sealbox v1"
# Secrets are API keys and passwords, not files: 64 KiB bounds what a box may hold.
MAX_VALUE_BYTES = 64 * 1024


class SealError(CloudSyncError):
    """A sealed box cannot be opened (wrong key, altered, wrong associated data) or built."""

    code = "sealed_box_invalid"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise SealError(f"sealed box: field {field!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise SealError(f"sealed box: field {field!r} is not base64") from exc


def _derive(shared: bytes, epk: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk, info=_INFO).derive(shared)


def public_key_from_pem(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from a PEM public key or certificate."""
    from cryptography import x509

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        if b"CERTIFICATE" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SealError(f"not a PEM public key or certificate ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SealError("sealed boxes need a P-256 (secp256r1) key")
    return key


def private_key_from_pem(pem: str | bytes) -> ec.EllipticCurvePrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SealError(f"not a PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SealError("sealed boxes need a P-256 (secp256r1) key")
    return key


def public_pem(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def seal(recipient: ec.EllipticCurvePublicKey, value: bytes, aad: bytes) -> dict[str, str]:
    """A box only `recipient`'s private key opens, and only with the same `aad`."""
    if len(value) > MAX_VALUE_BYTES:
        raise SealError(f"a sealed value is at most {MAX_VALUE_BYTES} bytes, got {len(value)}")
    eph = ec.generate_private_key(ec.SECP256R1())
    epk = eph.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key = _derive(eph.exchange(ec.ECDH(), recipient), epk)
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, value, aad)
    return {"alg": ALG, "epk": _b64(epk), "nonce": _b64(nonce), "ct": _b64(ct)}


def open_box(private: ec.EllipticCurvePrivateKey, box: Mapping[str, Any], aad: bytes) -> bytes:
    """The value in `box`; SealError when it was not sealed to `private` with this `aad`."""
    if not isinstance(box, Mapping) or box.get("alg") != ALG:
        raise SealError(f"sealed box: expected alg {ALG!r}")
    epk = _unb64(box.get("epk"), "epk")
    nonce = _unb64(box.get("nonce"), "nonce")
    ct = _unb64(box.get("ct"), "ct")
    if len(nonce) != 12:
        raise SealError("sealed box: the nonce must be 12 bytes")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), epk)
    except ValueError as exc:
        raise SealError("sealed box: 'epk' is not a P-256 point") from exc
    key = _derive(private.exchange(ec.ECDH(), peer), epk)
    try:
        return AESGCM(key).decrypt(nonce, ct, aad)
    except InvalidTag:
        raise SealError(
            "sealed box does not open: another recipient, altered, or for another secret"
        ) from None


def device_aad(device_id: str, name: str, version: int) -> bytes:
    """What a box delivered to a device is bound to: that device, that secret, that version."""
    return f"edgefn-secret\x00{device_id}\x00{name}\x00{version}".encode()


def platform_aad(scope: str, target: str, name: str) -> bytes:
    """What a box sealed to the platform (by `edge-cloud secret set`) is bound to."""
    return f"edgefn-secret-set\x00{scope}\x00{target}\x00{name}".encode()

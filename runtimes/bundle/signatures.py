"""Detached Ed25519 signatures over a manifest's digest (`manifest.sig`): make, parse, check."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtimes.bundle.layout import (
    KEY_ID_RE,
    MAX_SIGNATURES,
    SIGNATURE_CONTEXT,
    SIGNATURE_MEMBER,
    fail,
)
from runtimes.bundle.manifest import BundleManifest
from runtimes.bundle.strict_json import canonical_json, loads_strict
from runtimes.signing import key_id


def signing_message(manifest_bytes: bytes) -> bytes:
    """What Ed25519 signs: the context string followed by sha256(manifest.json)."""
    return SIGNATURE_CONTEXT + hashlib.sha256(manifest_bytes).digest()


def sign_manifest(manifest_bytes: bytes, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The `manifest.sig` member: one signature per key, sorted by key id."""
    if not keys:
        raise ValueError("at least one signing key is needed")
    msg = signing_message(manifest_bytes)
    sigs = {key_id(k): base64.b64encode(k.sign(msg)).decode("ascii") for k in keys}
    return canonical_json({"signatures": [{"keyid": i, "sig": s} for i, s in sorted(sigs.items())]})


def parse_signatures(data: bytes) -> list[tuple[str, bytes]]:
    """Decode `manifest.sig` into (key id, 64-byte signature) pairs."""
    where = SIGNATURE_MEMBER
    obj = loads_strict(data, where)
    if not isinstance(obj, dict) or set(obj) != {"signatures"}:
        raise fail("malformed_bundle", f"{where}: must be an object with only 'signatures'")
    entries = obj["signatures"]
    if not isinstance(entries, list) or len(entries) > MAX_SIGNATURES:
        raise fail("malformed_bundle", f"{where}: 'signatures' must be a list (<= 16)")
    if not entries:
        raise fail("missing_signature", f"{where}: no signatures")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"keyid", "sig"}:
            raise fail("malformed_bundle", f"{where}: entry {i} must have exactly keyid and sig")
        kid, sig = e["keyid"], e["sig"]
        if not isinstance(kid, str) or not KEY_ID_RE.match(kid) or not isinstance(sig, str):
            raise fail("malformed_bundle", f"{where}: entry {i} has a bad keyid or sig")
        try:
            raw = base64.b64decode(sig, validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 64:
            raise fail("malformed_bundle", f"{where}: entry {i}: sig is not 64 bytes of base64")
        out.append((kid, raw))
    return out


def verify_signatures(
    manifest_bytes: bytes,
    signature_bytes: bytes,
    trusted: Mapping[str, Sequence[Ed25519PublicKey]],
    *,
    threshold: int = 1,
) -> tuple[str, ...]:
    """Key ids of trusted keys with a valid signature; raises unless at least `threshold`.

    Signatures by keys we do not trust are skipped (during a rotation a bundle carries the old
    and the new key's signatures, and a device may know only one). A trusted key's signature that
    does not verify is `bad_signature` even when others suffice: that is tampering or a bug.
    """
    msg = signing_message(manifest_bytes)
    valid: set[str] = set()
    bad: set[str] = set()
    found: list[str] = []
    for kid, sig in parse_signatures(signature_bytes):
        found.append(kid)
        for pub in trusted.get(kid, ()):
            try:
                pub.verify(sig, msg)
            except InvalidSignature:
                bad.add(kid)
            else:
                valid.add(kid)
                break
    if bad - valid:
        raise fail(
            "bad_signature",
            f"{SIGNATURE_MEMBER}: signature by trusted key {sorted(bad - valid)[0]} does not "
            "match manifest.json (tampered or corrupted)",
        )
    if len(valid) >= threshold:
        return tuple(sorted(valid))
    if valid:
        raise fail(
            "unknown_signer",
            f"{SIGNATURE_MEMBER}: {len(valid)} trusted signature(s), {threshold} required",
        )
    raise fail(
        "unknown_signer",
        f"{SIGNATURE_MEMBER}: signed by {', '.join(found)}; none of them is a trusted key "
        f"(trusted: {', '.join(sorted(trusted)) or 'none'})",
    )


def check_publisher(manifest: BundleManifest, signature_bytes: bytes) -> None:
    """The publisher named in the manifest must have signed it.

    Its signature was verified if the verifier trusts that key (a bad one is refused by
    `verify_signatures`); a device that only trusts a rotated-in key still accepts the bundle.
    """
    present = {kid for kid, _ in parse_signatures(signature_bytes)}
    if manifest.publisher not in present:
        raise fail(
            "bad_signature",
            f"manifest names publisher {manifest.publisher}, which has no signature in "
            f"{SIGNATURE_MEMBER} (signed by {', '.join(sorted(present))})",
        )

"""The publisher's side of a TUF publish: fetch its role, sign the next version (`claim.py`).

`edge-cloud fn publish BUNDLE --key KEY` calls `make_claim` before uploading. The key signs
only the publisher's own delegated role, never a bundle it did not build: the role names the
bundle's target path with its length and sha256, computed here from the file being uploaded.
The metadata read here is not trusted for anything: the registry rebuilds the role from its own
copy and a signature over anything else does not verify.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from cloud_sync.http_client import RemoteError, SyncHttpClient
from cloud_sync.platform.tuf import claim as claims
from cloud_sync.platform.tuf.keys import role_name


def bundle_facts(path: Path) -> tuple[str, str, str, int]:
    """(name, version, sha256 hex, length) of a bundle file."""
    from runtimes.bundle import BundleManifest, read_bundle

    raw = read_bundle(path, max_bytes=path.stat().st_size)
    manifest = BundleManifest.from_bytes(raw.manifest_bytes)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return manifest.name, manifest.version, h.hexdigest(), path.stat().st_size


def _get(client: SyncHttpClient, path: str) -> Any:
    return client.call("GET", path)[1]


def tuf_enabled(client: SyncHttpClient) -> bool:
    """Whether the platform serves TUF metadata (404 `tuf_not_initialised` means no)."""
    try:
        _get(client, "/v1/tuf/timestamp.json")
    except RemoteError as exc:
        if exc.code == "tuf_not_initialised":
            return False
        raise
    return True


def current_role(client: SyncHttpClient, role: str) -> Metadata[Targets] | None:
    ts = Metadata[Timestamp].from_dict(_get(client, "/v1/tuf/timestamp.json"))
    version = ts.signed.snapshot_meta.version
    snap = Metadata[Snapshot].from_dict(_get(client, f"/v1/tuf/{version}.snapshot.json"))
    meta = snap.signed.meta.get(f"{role}.json")
    if meta is None:
        return None
    return Metadata[Targets].from_dict(_get(client, f"/v1/tuf/{meta.version}.{role}.json"))


def make_claim(client: SyncHttpClient, key: Ed25519PrivateKey, bundle: Path) -> claims.Claim:
    """Sign the next version of this key's role with `bundle` added."""
    signer = CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))
    public = signer.public_key
    assert isinstance(public, SSlibKey)
    role = role_name(public)
    name, version, sha256, length = bundle_facts(bundle)
    current = current_role(client, role)
    md = claims.next_role(
        current,
        claims.target_path(name, version),
        length,
        sha256,
        version=current.signed.version + 1 if current else 1,
        expires=claims.utc_in(claims.ROLE_EXPIRY),
    )
    return claims.sign(md, role, signer)

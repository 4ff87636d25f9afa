"""A publisher's signature over the next version of its delegated targets role.

TUF's point is that the registry cannot add a target to a publisher's role: only the publisher
key can. So the publish client (`edge-cloud fn publish --key`) fetches its current role from
`/v1/tuf/`, builds the next version with the new bundle's target, signs it and sends, with the
bundle, the four headers below. The registry builds the same next version from the role it holds
and the bundle it received (length and sha256 of the bytes it hashed), attaches the signature and
checks it against the key the top-level targets role delegates to. Both sides build the role with
`next_role`, so the signed bytes are the same; the signature covers the bundle's length and hash.
Four short headers instead of the whole role document keep the request's size bounded however
many targets a role holds.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from securesystemslib.signer import CryptoSigner, Signature
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import CanonicalJSONSerializer

from cloud_sync.platform.tuf.errors import BadClaim

HEADER_ROLE = "X-Edgefn-Tuf-Role"
HEADER_VERSION = "X-Edgefn-Tuf-Version"
HEADER_EXPIRES = "X-Edgefn-Tuf-Expires"
HEADER_SIGNATURE = "X-Edgefn-Tuf-Signature"
HEADERS = (HEADER_ROLE, HEADER_VERSION, HEADER_EXPIRES, HEADER_SIGNATURE)
# A publisher role's life: each publish renews it.
ROLE_EXPIRY = dt.timedelta(days=365)
MAX_ROLE_EXPIRY = dt.timedelta(days=2 * 366)
_ROLE_RE = re.compile(r"^publisher-[0-9a-f]{16}$")
_SIG_RE = re.compile(r"^([0-9a-f]{64}):([0-9a-f]{128})$")
_EXPIRES_FMT = "%Y-%m-%dT%H:%M:%SZ"


def target_path(name: str, version: str) -> str:
    """The TUF target path of a bundle: `{name}/{version}.edgefn`."""
    return f"{name}/{version}.edgefn"


def utc_in(delta: dt.timedelta) -> dt.datetime:
    """Now plus `delta`, whole seconds (TUF's date format has no fraction)."""
    return (dt.datetime.now(dt.UTC) + delta).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class Claim:
    role: str
    version: int
    expires: dt.datetime
    keyid: str
    signature: str  # hex

    def headers(self) -> dict[str, str]:
        return {
            HEADER_ROLE: self.role,
            HEADER_VERSION: str(self.version),
            HEADER_EXPIRES: self.expires.strftime(_EXPIRES_FMT),
            HEADER_SIGNATURE: f"{self.keyid}:{self.signature}",
        }


def claim_from_headers(headers: Mapping[str, str]) -> Claim | None:
    """The claim a publish request carries; None without any of the headers; BadClaim if some
    are there but not all, or one is malformed."""
    values = {h: headers.get(h) for h in HEADERS}
    if all(v is None for v in values.values()):
        return None
    missing = [h for h, v in values.items() if not v]
    if missing:
        raise BadClaim(f"TUF publish headers incomplete: missing {', '.join(missing)}")
    role, version, expires, sig = (str(values[h]) for h in HEADERS)
    if not _ROLE_RE.match(role):
        raise BadClaim(f"{HEADER_ROLE}: not a publisher role name: {role!r}")
    if not version.isdigit() or not 0 < int(version) < 1 << 62:
        raise BadClaim(f"{HEADER_VERSION}: not a version number: {version!r}")
    try:
        when = dt.datetime.strptime(expires, _EXPIRES_FMT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise BadClaim(
            f"{HEADER_EXPIRES}: expected YYYY-MM-DDTHH:MM:SSZ, got {expires!r}"
        ) from None
    match = _SIG_RE.match(sig)
    if not match:
        raise BadClaim(f"{HEADER_SIGNATURE}: expected <keyid hex>:<ed25519 signature hex>")
    return Claim(role, int(version), when, match.group(1), match.group(2))


def next_role(
    current: Metadata[Targets] | None,
    path: str,
    length: int,
    sha256: str,
    *,
    version: int,
    expires: dt.datetime,
) -> Metadata[Targets]:
    """The role's next version with `path` added: unsigned, the same on client and registry."""
    if current is None:
        md = Metadata(Targets(version=version, expires=expires))
    else:
        md = Metadata[Targets].from_bytes(current.to_bytes())
        md.signatures.clear()
        md.signed.version = version
        md.signed.expires = expires
    md.signed.targets[path] = TargetFile(length, {"sha256": sha256}, path)
    return md


def payload(md: Metadata[Targets]) -> bytes:
    """The bytes a signature covers: the canonical JSON of `signed`."""
    return CanonicalJSONSerializer().serialize(md.signed)


def sign(md: Metadata[Targets], role: str, signer: CryptoSigner) -> Claim:
    """The publisher's side: sign the next role version and describe it as a claim."""
    sig = signer.sign(payload(md))
    return Claim(role, md.signed.version, md.signed.expires, sig.keyid, sig.signature)


def attach(md: Metadata[Targets], claim: Claim) -> None:
    """The registry's side: put the claimed signature on the role it rebuilt."""
    md.signatures[claim.keyid] = Signature(claim.keyid, claim.signature)

"""The device's TUF checks that need no network: the target, the verifier, the offline view.

TUF (The Update Framework) metadata on the registry says which bundle bytes were published:
`targets` (and the per-publisher roles it delegates to) name each bundle by the target path
`{name}/{version}.edgefn` with its length and sha256; `snapshot` and `timestamp` pin which
versions of those documents belong together and keep them fresh; `root` holds the keys. The
refresh that downloads and checks them (`cloud_sync.tuf_client`, with python-tuf's ngclient)
ends in a `TufTarget`. This module holds what follows from that, all pure:

* `TufVerifier` wraps the Ed25519 verifier (`runtimes.verify`): the bundle file must have exactly
  the target's length and sha256 first, then the bundle signature is checked as before. Two
  independent keys stand behind an install: the registry's TUF roles and the publisher's.
* `check_expected_digest`: a director instruction (Uptane's fleet role) names a digest; it must
  be the target's, else the instruction and the repository disagree and nothing is installed.
* `TrustedView`: what the cached, already-verified metadata says, read offline for
  `edge-agent fn list` (expiry, and whether an installed version is still a published target).
* `tuf_error`: python-tuf's exceptions as `TufError` with this project's stable codes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib import parse

from tuf.api import exceptions as tuf_exc

# tuf.api.metadata re-exports these from tuf.api._payload without listing them in __all__.
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from runtimes.bundle import DEFAULT_MAX_BUNDLE_BYTES
from runtimes.errors import BundleError
from runtimes.verify import VerifiedBundle, Verifier

TARGET_SUFFIX = ".edgefn"
# Delegations deeper than this are refused when walked offline (ngclient's own default is 32;
# edgefn delegates one level, top-level targets -> publisher roles).
MAX_WALK = 32


class TufError(BundleError):
    """An install refused by the TUF checks. The instance code says which check (see CODES)."""

    code = "tuf_refused"


# The stable codes, each with what it means (docs/update-security.md has the attack table).
CODES = {
    "tuf_unknown_target": "the bundle is not a target in the trusted metadata",
    "tuf_rollback": "the registry offered metadata older than what the device already trusts",
    "tuf_expired": "the newest metadata the registry offers has expired",
    "tuf_mix_and_match": "metadata files that were not published together",
    "tuf_too_large": "metadata or bundle larger than declared",
    "tuf_unsigned": "metadata without the required threshold of valid signatures",
    "tuf_length_mismatch": "the bundle's length is not the target's",
    "tuf_hash_mismatch": "the bundle's sha256 is not the target's",
    "tuf_director_mismatch": "the fleet instruction names other bytes than the target",
    "tuf_bad_metadata": "metadata that fails another TUF check",
    "tuf_unavailable": "the platform serves no TUF metadata",
    "tuf_no_root": "no pinned root: the device was not enrolled with one",
    "tuf_unreachable": "the metadata could not be downloaded",
    "tuf_cache": "the trusted metadata in the data dir cannot be written",
}
# Codes that say something went wrong on the way, not that the bundle was refused.
FAILURE_CODES = frozenset({"tuf_unreachable", "tuf_cache"})


def target_path(name: str, version: str) -> str:
    """The TUF target path of `name@version` (the registry's contract)."""
    return f"{name}/{version}{TARGET_SUFFIX}"


@dataclass(frozen=True, slots=True)
class TufTarget:
    """One bundle as the trusted targets metadata describes it."""

    path: str
    length: int
    sha256: str  # lowercase hex
    role: str = "targets"  # the role that signed it (for messages and `fn list`)

    @classmethod
    def from_target_file(cls, tf: TargetFile, role: str = "targets") -> TufTarget:
        digest = tf.hashes.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise TufError(
                f"target {tf.path} in role {role} has no sha256 hash", code="tuf_bad_metadata"
            )
        return cls(tf.path, tf.length, digest, role)


def check_expected_digest(target: TufTarget, expected: str | None) -> None:
    """A director instruction's digest (hex, `sha256:` prefix allowed) must be the target's."""
    if expected is None:
        return
    want = expected.removeprefix("sha256:").lower()
    if want != target.sha256:
        raise TufError(
            f"the fleet instruction names {target.path} with sha256 {want}, but the trusted "
            f"targets metadata ({target.role}) says {target.sha256}: refusing both",
            code="tuf_director_mismatch",
        )


class TufVerifier(Verifier):
    """Length and sha256 against the TUF target, then the wrapped (Ed25519) verifier."""

    def __init__(self, inner: Verifier, target: TufTarget) -> None:
        self.inner = inner
        self.target = target

    def verify(
        self,
        bundle: Path | bytes,
        *,
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        expect_name: str | None = None,
        expect_version: str | None = None,
    ) -> VerifiedBundle:
        t = self.target
        length, digest = _measure(bundle, t.length)
        if length != t.length:
            size = f"more than {t.length}" if length > t.length else str(length)
            raise TufError(
                f"bundle for {t.path} is {size} bytes; the trusted targets metadata "
                f"({t.role}) says {t.length}",
                code="tuf_length_mismatch",
            )
        if digest != t.sha256:
            raise TufError(
                f"bundle for {t.path} has sha256 {digest}; the trusted targets metadata "
                f"({t.role}) says {t.sha256}",
                code="tuf_hash_mismatch",
            )
        return self.inner.verify(
            bundle, max_bytes=max_bytes, expect_name=expect_name, expect_version=expect_version
        )


def _measure(bundle: Path | bytes, limit: int) -> tuple[int, str]:
    """(length, sha256) reading at most `limit` + 1 bytes: endless data stops at the bound."""
    h = hashlib.sha256()
    if isinstance(bundle, bytes):
        h.update(bundle[: limit + 1])
        return min(len(bundle), limit + 1), h.hexdigest()
    n = 0
    with open(bundle, "rb") as f:
        while n <= limit and (chunk := f.read(min(1 << 20, limit + 1 - n))):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


# ---------------------------------------------------------------------------------------------
# python-tuf's exceptions -> stable codes

# ngclient's BadVersionNumberError says which check failed only in its message (tuf 7.0.1,
# tuf/ngclient/_internal/trusted_metadata_set.py); tests/test_tuf_attacks.py pins each one.
_ROLLBACK_RE = re.compile(r"must\s+be >=|^Expected \S+\.json version ")
_MIX_RE = re.compile(r"^Expected snapshot version |^Expected \S+ v\d+, got v\d+")


def tuf_error(exc: Exception, where: str) -> TufError:
    """`exc` (from python-tuf) as a TufError naming `where` (the registry)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        code, why = "tuf_expired", f"{text}: no new install until the registry re-signs it"
    elif isinstance(exc, tuf_exc.BadVersionNumberError):
        if _ROLLBACK_RE.search(text):
            code, why = "tuf_rollback", text
        elif _MIX_RE.search(text):
            code, why = "tuf_mix_and_match", text
        else:
            code, why = "tuf_bad_metadata", text
    elif isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        code, why = "tuf_mix_and_match", text
    elif isinstance(exc, tuf_exc.UnsignedMetadataError):
        code, why = "tuf_unsigned", text
    elif isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        code, why = "tuf_too_large", text
    elif isinstance(exc, tuf_exc.DownloadError):
        code, why = "tuf_unreachable", text
    else:
        code, why = "tuf_bad_metadata", text
    return TufError(f"TUF metadata from {where} refused ({CODES[code]}): {why}", code=code)


# ---------------------------------------------------------------------------------------------
# The cached metadata, offline


@dataclass(frozen=True, slots=True)
class RoleExpiry:
    role: str
    version: int
    expires: datetime

    @property
    def expired(self) -> bool:
        return self.expires <= datetime.now(UTC)


class TrustedView:
    """The metadata a completed refresh left in a directory (ngclient's layout), read offline.

    Every document was verified when the refresh stored it; the walk checks each delegated
    role's signatures against its delegator again, so a file changed on disk is not believed.
    Expiry is reported, not enforced: this view answers `fn list`, never an install.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.root = self._load("root", Root)
        self.timestamp = self._load("timestamp", Timestamp)
        self.snapshot = self._load("snapshot", Snapshot)
        self.targets = self._load("targets", Targets)
        self.root.verify_delegate("targets", self.targets)

    def _load(self, role: str, kind: type) -> Metadata:  # type: ignore[type-arg]
        path = self.dir / f"{parse.quote(role, '')}.json"
        md = Metadata.from_bytes(path.read_bytes())
        if not isinstance(md.signed, kind):
            raise TufError(f"{path} is not {role} metadata", code="tuf_bad_metadata")
        return md

    def expiries(self) -> list[RoleExpiry]:
        out = []
        for role, md in (
            ("root", self.root),
            ("timestamp", self.timestamp),
            ("snapshot", self.snapshot),
            ("targets", self.targets),
        ):
            exp = md.signed.expires
            out.append(RoleExpiry(role, md.signed.version, exp.replace(tzinfo=exp.tzinfo or UTC)))
        return out

    def earliest_expiry(self) -> RoleExpiry:
        return min(self.expiries(), key=lambda e: e.expires)

    def find(self, path: str) -> TufTarget | None:
        """The target at `path` as the trusted roles say, walking delegations like ngclient."""
        for role, md in self._walk(path):
            tf = md.signed.targets.get(path)
            if tf is not None:
                return TufTarget.from_target_file(tf, role)
        return None

    def versions_of(self, name: str) -> list[str]:
        """Every version of `name` a trusted role may sign and does, oldest first."""
        from runtimes.manifest import SEMVER_RE, semver_key

        prefix = f"{name}/"
        candidates = {
            p
            for _, md in self._walk(f"{prefix}{TARGET_SUFFIX}")
            for p in md.signed.targets
            if p.startswith(prefix) and p.endswith(TARGET_SUFFIX)
        }
        versions = []
        for p in candidates:
            version = p[len(prefix) : -len(TARGET_SUFFIX)]
            # find() walks for that exact path: a role listing a path it was not delegated
            # vouches for nothing.
            if SEMVER_RE.match(version) and self.find(p) is not None:
                versions.append(version)
        return sorted(versions, key=semver_key)

    def _walk(self, path: str) -> Iterator[tuple[str, Metadata[Targets]]]:
        stack: list[tuple[str, Metadata[Targets]]] = [("targets", self.targets)]
        seen: set[str] = set()
        while stack and len(seen) < MAX_WALK:
            role, md = stack.pop()
            if role in seen:
                continue
            seen.add(role)
            yield role, md
            delegations = md.signed.delegations
            if delegations is None:
                continue
            children = []
            for child, terminating in delegations.get_roles_for_target(path):
                try:
                    child_md = self._load(child, Targets)
                    md.verify_delegate(child, child_md)
                except (OSError, ValueError, tuf_exc.RepositoryError, TufError):
                    continue  # not fetched (or not valid): it vouches for nothing
                children.append((child, child_md))
                if terminating:
                    break
            stack.extend(reversed(children))

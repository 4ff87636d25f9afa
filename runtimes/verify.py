"""Deciding whether a bundle may be installed: the `Verifier` interface and its Ed25519 version.

Flow of `Ed25519Verifier.verify`:
  1. `read_bundle`: outer layout only, bounded, nothing extracted or parsed as JSON yet;
  2. `verify_signatures`: manifest.sig against the trusted keys (threshold, default 1);
  3. `BundleManifest.from_bytes`: only now is the (signed) manifest parsed and validated;
     the publisher it names must have a signature in manifest.sig (`check_publisher`);
  4. `check_payload`: payload members are exactly the signed list, sizes and sha256 match;
  5. optional expectations (the name/version the caller asked for), then a `VerifiedBundle`.
`VerifiedBundle.unpack(arch, dest)` extracts common + that arch's payload with `runtimes.unpack`,
re-hashing while it reads, and writes the edgefn.toml generated from the signed manifest.

The interface is the seam for a stronger trust model: a TUF/Uptane verifier would check the bundle
file against signed, expiring targets metadata (freshness, rollback, key rotation, thresholds)
and return the same `VerifiedBundle`. Callers only depend on `Verifier.verify`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runtimes.bundle import (
    DEFAULT_MAX_BUNDLE_BYTES,
    BundleManifest,
    RawBundle,
    check_payload,
    check_publisher,
    read_bundle,
    verify_signatures,
)
from runtimes.errors import BundleError
from runtimes.manifest import MANIFEST_NAME
from runtimes.signing import key_id, load_public_key
from runtimes.unpack import DEFAULT_LIMITS, UnpackLimits, UnpackResult, unpack_archives


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and digests were checked; only a `Verifier` should make one."""

    manifest: BundleManifest
    raw: RawBundle
    signers: tuple[str, ...]  # key ids whose signatures verified

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def arches(self) -> tuple[str, ...]:
        return self.manifest.arches

    def unpack(
        self, arch: str, dest: Path, *, limits: UnpackLimits = DEFAULT_LIMITS
    ) -> UnpackResult:
        """Install the payload for `arch` into the new directory `dest`, all or nothing.

        `dest` gets common.tar.gz (if any), then artifacts/<arch>.tar.gz, then `edgefn.toml`
        generated from the signed manifest (a payload carrying its own is refused). The entry
        file must be present.
        """
        m = self.manifest
        if not m.supports(arch):
            raise BundleError(
                f"{m.name} {m.version} has no payload for {arch}; it has: {', '.join(m.arches)}",
                code="wrong_arch",
            )
        archives = []
        if m.common is not None:
            archives.append(self.raw.archive_input(m.common.file, m.common.sha256))
        if arch in m.artifacts:
            art = m.artifacts[arch]
            archives.append(self.raw.archive_input(art.file, art.sha256))
        return unpack_archives(
            archives,
            Path(dest),
            limits=limits,
            extra_files={MANIFEST_NAME: m.edgefn_toml().encode("utf-8")},
            require_files=[m.function.entry],
        )


def check_expected(
    manifest: BundleManifest, *, expect_name: str | None, expect_version: str | None
) -> None:
    """Refuse a validly signed bundle that is not the one asked for (a swapped download)."""
    if expect_name is not None and manifest.name != expect_name:
        raise BundleError(
            f"bundle is {manifest.name} {manifest.version}, expected {expect_name}",
            code="unexpected_bundle",
        )
    if expect_version is not None and manifest.version != expect_version:
        raise BundleError(
            f"bundle is {manifest.name} {manifest.version}, expected version {expect_version}",
            code="unexpected_bundle",
        )


class Verifier(abc.ABC):
    """Turns bundle bytes into a `VerifiedBundle` or a `BundleError` with a stable code."""

    @abc.abstractmethod
    def verify(
        self,
        bundle: Path | bytes,
        *,
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        expect_name: str | None = None,
        expect_version: str | None = None,
    ) -> VerifiedBundle:
        """Check `bundle` (a file or its bytes); pass the name/version the caller asked for."""


class Ed25519Verifier(Verifier):
    """Trusts a fixed set of Ed25519 public keys; `threshold` of them must have signed."""

    def __init__(self, trusted_keys: Iterable[Ed25519PublicKey], *, threshold: int = 1) -> None:
        keys: dict[str, list[Ed25519PublicKey]] = {}
        for k in trusted_keys:
            keys.setdefault(key_id(k), []).append(k)
        if not keys:
            raise ValueError("no trusted keys: every bundle would be refused")
        if not 1 <= threshold <= len(keys):
            raise ValueError(f"threshold {threshold} needs between 1 and {len(keys)} keys")
        self._keys: Mapping[str, Sequence[Ed25519PublicKey]] = keys
        self.threshold = threshold

    @classmethod
    def from_files(cls, paths: Iterable[Path], *, threshold: int = 1) -> Ed25519Verifier:
        """Trust the `.pub` files at `paths` (as written by `runtimes.signing.create_keypair`)."""
        return cls([load_public_key(Path(p)) for p in paths], threshold=threshold)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def verify(
        self,
        bundle: Path | bytes,
        *,
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        expect_name: str | None = None,
        expect_version: str | None = None,
    ) -> VerifiedBundle:
        raw = read_bundle(bundle, max_bytes=max_bytes)
        signers = verify_signatures(
            raw.manifest_bytes, raw.signature_bytes, self._keys, threshold=self.threshold
        )
        manifest = BundleManifest.from_bytes(raw.manifest_bytes)
        check_publisher(manifest, raw.signature_bytes)
        check_payload(raw, manifest)
        check_expected(manifest, expect_name=expect_name, expect_version=expect_version)
        return VerifiedBundle(manifest=manifest, raw=raw, signers=signers)

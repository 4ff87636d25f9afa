"""The install path's TUF step: what the registry download must deliver, from trusted metadata.

`edge_agent.install.install_from_registry` calls `what_to_download` before the function's lock
and the version checks, so they see the digest it returns. With `update_security = "signatures"`
that is the registry's version document (and a fleet instruction's digest must match it); with
"tuf" (`edge_agent.update_security`), `tuf_checked`:

1. the version: the one asked for, or for a bare `NAME` the highest version the trusted
   metadata names (`refresh_versions`; the registry's own "latest" is not asked);
2. `cloud_sync.tuf_client.refresh_target`: refresh the metadata (all or nothing on disk) and
   find `{name}/{version}.edgefn`;
3. a fleet instruction's digest must be the target's sha256 (`tuf_director_mismatch`);
4. the download then asks the registry's bundle URL for exactly that sha256 and length (the
   existing resumable client stops at the declared length), and the verifier checks both again
   before the Ed25519 signature check it wraps (`runtimes.tuf_verify.TufVerifier`).

The bundle bytes come from `/v1/registry/bundles/sha256:{digest}` (the same bytes the TUF
targets URL serves), so resuming an interrupted download keeps working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.registry_client import (
    DigestMismatch,
    DownloadOverrun,
    RegistryClient,
    RegistryError,
    VersionInfo,
)
from runtimes.tuf_verify import TufError, TufVerifier, check_expected_digest, target_path
from runtimes.verify import Verifier

if TYPE_CHECKING:
    from edge_agent.install import InstallOptions


def what_to_download(
    client: RegistryClient,
    name: str,
    version: str | None,
    verifier: Verifier,
    opts: InstallOptions,
    expected_digest: str | None,
) -> tuple[VersionInfo, Verifier]:
    """(the bundle to download, the verifier for it) under the device's update security."""
    if opts.security.tuf:
        return tuf_checked(client, name, version, verifier, opts, expected_digest)
    from edge_agent.staging import InstallError

    info = client.resolve(name, version)
    want = expected_digest.removeprefix("sha256:") if expected_digest is not None else None
    if want is not None and want != info.digest:
        raise InstallError(
            f"the instruction names {name}@{info.version} with sha256 {want}, the registry "
            f"has {info.digest}",
            code="digest_mismatch",
        )
    return info, verifier


@contextlib.contextmanager
def download_refusals(part: Path, info: VersionInfo, *, tuf: bool) -> Iterator[None]:
    """Around the download: endless data leaves no part behind; under TUF, TUF's codes."""
    try:
        yield
    except DownloadOverrun as exc:  # nothing of it is worth resuming
        part.unlink(missing_ok=True)
        if tuf:
            raise overrun(exc, info) from None
        raise
    except DigestMismatch as exc:
        if tuf:
            raise hash_mismatch(exc, info) from None
        raise


def tuf_checked(
    client: RegistryClient,
    name: str,
    version: str | None,
    verifier: Verifier,
    opts: InstallOptions,
    expected_digest: str | None,
) -> tuple[VersionInfo, Verifier]:
    """(what to download, how to verify it) for `name@version`, from fresh TUF metadata."""
    from cloud_sync.tuf_client import refresh_target
    from runtimes.manifest import NAME_RE, SEMVER_RE

    if not NAME_RE.match(name) or (version is not None and not SEMVER_RE.match(version)):
        raise RegistryError(f"not NAME@VERSION: {name!r}@{version!r}", code="bad_request")
    policy = opts.security
    if version is None:
        from cloud_sync.tuf_client import refresh_versions

        opts.tell(f"refreshing TUF metadata from {client.base_url} for the latest {name}")
        versions = refresh_versions(
            opts.data_dir, client.base_url, name, pinned_root=policy.pinned_root,
            token=policy.token, ssl_context=policy.ssl_context,
        )  # fmt: skip
        if not versions:
            raise TufError(
                f"the trusted TUF metadata of {client.base_url} names no version of {name}",
                code="tuf_unknown_target",
            )
        version = versions[-1]
    opts.tell(f"refreshing TUF metadata from {client.base_url}")
    target = refresh_target(
        opts.data_dir,
        client.base_url,
        target_path(name, version),
        pinned_root=policy.pinned_root,
        token=policy.token,
        ssl_context=policy.ssl_context,
    )
    check_expected_digest(target, expected_digest)
    opts.tell(f"{target.path}: {target.length} bytes, sha256 {target.sha256[:16]} ({target.role})")
    info = VersionInfo(name, version, target.sha256, target.length, ())
    return info, TufVerifier(verifier, target)


def overrun(exc: RegistryError, info: VersionInfo) -> TufError:
    return TufError(
        f"endless data: the registry sent more than the {info.size} bytes the trusted TUF "
        f"metadata declares for {target_path(info.name, info.version)} ({exc.message})",
        code="tuf_too_large",
    )


def hash_mismatch(exc: RegistryError, info: VersionInfo) -> TufError:
    return TufError(
        f"the bundle the registry sent for {target_path(info.name, info.version)} is not the "
        f"target in the trusted TUF metadata ({exc.message})",
        code="tuf_hash_mismatch",
    )

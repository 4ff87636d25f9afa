"""The signed function bundle (`.efb`): format, manifest, signatures, building and reading.

A bundle is an uncompressed POSIX ustar archive whose members are, in this order:

    manifest.json                     canonical JSON, the signed source of truth
    manifest.sig                      JSON list of detached Ed25519 signatures over the manifest
    artifacts/<arch>.tar.gz           per-arch payload, e.g. artifacts/linux-x86_64.tar.gz (0..n)
    common.tar.gz                     arch-independent payload (optional)

Building (`build_bundle`): pack each payload dir deterministically, hash it, write the manifest
listing every payload member's sha256 and size, sign it, write the archive atomically.

Reading (`read_bundle`): walk the outer headers with the strict parser from `runtimes.unpack`,
never extracting anything: only regular files with the names above, bounded sizes. The caller
(`runtimes.verify`) then checks the signature (`verify_signatures`) before parsing the manifest
(`BundleManifest.from_bytes`), then the payload digests (`check_payload`), and only then unpacks.
`docs/bundle-format.md` is the byte-level description; this package is its implementation, one
module per job:

    layout        member names, arch keys, bounds, the signature context
    strict_json   canonical JSON (what is signed) and the strict parser
    toml_writer   the edgefn.toml generated from a signed manifest
    manifest      BundleManifest and Artifact: the decoded manifest.json
    versions      version order for installs (no downgrade unless a rollback)
    signatures    manifest.sig: make, parse, verify, publisher check
    reader        read_bundle (outer layout, nothing extracted) and check_payload
    writer        the one writer of bundle bytes (new, or re-signed)
    builder       build_bundle: pack payload dirs deterministically, sign, write

Import from `runtimes.bundle`; the submodules are its layout, not its interface.
"""

from __future__ import annotations

from runtimes.bundle.builder import (
    build_bundle,
)
from runtimes.bundle.layout import (
    ARCH_RE,
    BUILD_ONLY_TABLES,
    COMMON_MEMBER,
    DEFAULT_MAX_BUNDLE_BYTES,
    FORMAT,
    MANIFEST_MEMBER,
    MAX_ARCHES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_SIGNATURES,
    SIGNATURE_CONTEXT,
    SIGNATURE_MEMBER,
    SUFFIX,
    artifact_member,
    host_arch,
)
from runtimes.bundle.manifest import (
    Artifact,
    BundleManifest,
    manifest_to_table,
)
from runtimes.bundle.reader import (
    Member,
    RawBundle,
    check_payload,
    read_bundle,
)
from runtimes.bundle.signatures import (
    check_publisher,
    parse_signatures,
    sign_manifest,
    signing_message,
    verify_signatures,
)
from runtimes.bundle.strict_json import (
    canonical_json,
    loads_strict,
)
from runtimes.bundle.toml_writer import (
    toml_dumps,
)
from runtimes.bundle.versions import (
    check_version_order,
    compare_versions,
)
from runtimes.bundle.writer import (
    rewrite_signatures,
    write_outer,
)

__all__ = [
    "ARCH_RE",
    "BUILD_ONLY_TABLES",
    "COMMON_MEMBER",
    "DEFAULT_MAX_BUNDLE_BYTES",
    "FORMAT",
    "MANIFEST_MEMBER",
    "MAX_ARCHES",
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_CONTEXT",
    "SIGNATURE_MEMBER",
    "SUFFIX",
    "Artifact",
    "BundleManifest",
    "Member",
    "RawBundle",
    "artifact_member",
    "build_bundle",
    "canonical_json",
    "check_payload",
    "check_publisher",
    "check_version_order",
    "compare_versions",
    "host_arch",
    "loads_strict",
    "manifest_to_table",
    "parse_signatures",
    "read_bundle",
    "rewrite_signatures",
    "sign_manifest",
    "signing_message",
    "toml_dumps",
    "verify_signatures",
    "write_outer",
]

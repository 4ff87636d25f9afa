"""The bundle's fixed vocabulary: member names, arch keys, bounds, the signature context.

Everything the reader, writer and builder must agree on byte for byte lives here, once.
"""

from __future__ import annotations

import re

from hardware.arch import host_arch as _host_arch
from runtimes.errors import BundleError
from runtimes.signing import KEY_ID_HEX

FORMAT = 1
SUFFIX = ".efb"
MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
COMMON_MEMBER = "common.tar.gz"
# Domain separation: a signature made with the same key for anything else (a config document, a
# future format) can never pass as a bundle signature.
SIGNATURE_CONTEXT = b"edgefn-bundle-manifest-v1\x00"

# Arch keys look like linux-x86_64, linux-aarch64, linux-armv7 (`hardware.arch` names them),
# optionally with a libc suffix (linux-x86_64-musl). They become member names, so the alphabet
# is small on purpose.
ARCH_RE = re.compile(r"^[a-z0-9]+-[a-z0-9_]+(?:-[a-z0-9]+)?$")
PAYLOAD_RE = re.compile(
    r"^(?:artifacts/([a-z0-9]+-[a-z0-9_]+(?:-[a-z0-9]+)?)\.tar\.gz|common\.tar\.gz)$"
)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
KEY_ID_RE = re.compile(rf"^[0-9a-f]{{{KEY_ID_HEX}}}$")
CREATED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")

# Bounds applied before anything is trusted. A manifest is a few KiB; 1 MiB leaves room for
# large config schemas. 16 arches is more than there are Linux ABIs we could target.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_SIGNATURES = 16
MAX_ARCHES = 16
DEFAULT_MAX_BUNDLE_BYTES = 512 << 20
# Tables of an authoring edgefn.toml that describe how to build, not how to run: not signed.
BUILD_ONLY_TABLES = frozenset({"build"})


def fail(code: str, message: str) -> BundleError:
    """The BundleError to raise, with its stable code first (what the agent reports)."""
    return BundleError(message, code=code)


def host_arch() -> str:
    """This machine's arch key (e.g. linux-x86_64), as used in `artifacts/<arch>.tar.gz`.

    The names come from `hardware.arch`, the same table devices report theirs from.
    """
    return _host_arch().bundle_key


def artifact_member(arch: str) -> str:
    return f"artifacts/{arch}.tar.gz"

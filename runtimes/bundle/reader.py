"""Reading a bundle's outer archive without extracting anything, and checking payload digests."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from runtimes.bundle.layout import (
    DEFAULT_MAX_BUNDLE_BYTES,
    MANIFEST_MEMBER,
    MAX_ARCHES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    PAYLOAD_RE,
    SIGNATURE_MEMBER,
    fail,
)
from runtimes.bundle.manifest import BundleManifest
from runtimes.unpack import (
    BLOCK,
    ArchiveInput,
    padded,
    parse_header,
)


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    offset: int  # of the data in the bundle file
    size: int


@dataclass(frozen=True)
class RawBundle:
    """A bundle's outer structure, nothing trusted yet: manifest and signature bytes in memory,
    payload members as (offset, size) windows of the source."""

    source: Path | bytes = field(repr=False)
    size: int
    manifest_bytes: bytes = field(repr=False)
    signature_bytes: bytes = field(repr=False)
    members: Mapping[str, Member]

    def open(self) -> BinaryIO:
        if isinstance(self.source, bytes):
            return io.BytesIO(self.source)
        return self.source.open("rb")

    def archive_input(self, name: str, sha256: str) -> ArchiveInput:
        m = self.members[name]
        return ArchiveInput(
            label=name, source=self.source, offset=m.offset, length=m.size, sha256=sha256
        )


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise fail("truncated", f"bundle ends inside {what}")
    return data


def read_bundle(source: Path | bytes, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> RawBundle:
    """Walk the outer archive without extracting: member layout plus manifest and signature.

    Refuses anything that is not exactly our layout: other names, non-regular members, a
    manifest.json that is not first or a manifest.sig that is not second (so a streaming
    verifier can check the signature before it reads any payload), data after the end marker.
    """
    if isinstance(source, bytes):
        f: BinaryIO = io.BytesIO(source)
        total = len(source)
    else:
        source = Path(source)
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang us in open().
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise fail("malformed_bundle", f"{source}: cannot open: {exc}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise fail("malformed_bundle", f"{source}: not a regular file")
        f = os.fdopen(fd, "rb")
        total = st.st_size
    with f:
        if total > max_bytes:
            raise fail("too_large", f"bundle is {total} bytes, over the {max_bytes} byte limit")
        if total < BLOCK:
            raise fail("malformed_bundle", f"not a bundle: only {total} bytes")
        manifest = signature = None
        members: dict[str, Member] = {}
        pos = 0
        index = 0
        while True:
            where = f"bundle member {index}"
            header = parse_header(_read_exact(f, BLOCK, f"header of member {index}"), where)
            pos += BLOCK
            if header is None:
                if _read_exact(f, BLOCK, "end-of-archive marker") != bytes(BLOCK):
                    raise fail("malformed_bundle", f"{where}: lone zero block in the bundle")
                for chunk in iter(lambda: f.read(64 * 1024), b""):
                    if chunk.strip(b"\0"):
                        raise fail("malformed_bundle", "data after the end of the bundle archive")
                break
            name = header.name
            if header.kind != "file":
                raise fail("malformed_bundle", f"{where}: unexpected directory {name!r}")
            if pos + padded(header.size) > total:
                raise fail("truncated", f"bundle ends inside member {name!r}")
            if index == 0:
                if name != MANIFEST_MEMBER:
                    raise fail("malformed_bundle", f"first member must be manifest.json: {name!r}")
                if header.size > MAX_MANIFEST_BYTES:
                    raise fail("too_large", f"manifest.json is {header.size} bytes")
                manifest = _read_exact(f, header.size, name)
            elif index == 1:
                if name != SIGNATURE_MEMBER:
                    raise fail(
                        "missing_signature", f"manifest.sig must follow manifest.json, got {name!r}"
                    )
                if header.size > MAX_SIGNATURE_BYTES:
                    raise fail("too_large", f"manifest.sig is {header.size} bytes")
                signature = _read_exact(f, header.size, name)
            else:
                if name in members or name in (MANIFEST_MEMBER, SIGNATURE_MEMBER):
                    raise fail("duplicate_entry", f"bundle member {name!r} appears twice")
                if not PAYLOAD_RE.match(name):
                    raise fail("malformed_bundle", f"unexpected bundle member {name!r}")
                if len(members) >= MAX_ARCHES + 1:
                    raise fail("malformed_bundle", "too many payload members")
                members[name] = Member(name=name, offset=pos, size=header.size)
            pos += padded(header.size)
            f.seek(pos)
            index += 1
        if manifest is None:
            raise fail("malformed_bundle", "empty archive: no manifest.json")
        if signature is None:
            raise fail("missing_signature", "bundle has no manifest.sig")
    return RawBundle(
        source=source,
        size=total,
        manifest_bytes=manifest,
        signature_bytes=signature,
        members=members,
    )


def _sha256_window(f: BinaryIO, offset: int, size: int) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    left = size
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise fail("truncated", "bundle ends inside a payload member")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def check_payload(raw: RawBundle, manifest: BundleManifest) -> None:
    """Payload members are exactly the signed list, each with the signed size and sha256."""
    expected = manifest.payload
    extra = sorted(set(raw.members) - set(expected))
    if extra:
        raise fail("malformed_bundle", f"members not listed in the signed manifest: {extra}")
    missing = sorted(set(expected) - set(raw.members))
    if missing:
        raise fail("malformed_bundle", f"members listed in the manifest are missing: {missing}")
    with raw.open() as f:
        for name, art in sorted(expected.items()):
            m = raw.members[name]
            if m.size != art.size:
                raise fail(
                    "digest_mismatch", f"{name}: {m.size} bytes, the manifest says {art.size}"
                )
            digest = _sha256_window(f, m.offset, m.size)
            if digest != art.sha256:
                raise fail("digest_mismatch", f"{name}: sha256 {digest} != signed {art.sha256}")

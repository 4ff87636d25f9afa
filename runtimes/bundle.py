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
`docs/bundle-format.md` is the byte-level description; this module is its implementation.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import math
import os
import platform
import re
import stat
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtimes.errors import BundleError, ManifestError
from runtimes.manifest import MANIFEST_NAME, Manifest, parse_manifest, semver_key
from runtimes.signing import KEY_ID_HEX, key_id
from runtimes.unpack import (
    BLOCK,
    DEFAULT_LIMITS,
    ArchiveInput,
    UnpackLimits,
    check_name,
    file_mode_for,
    padded,
    parse_header,
    scan_archive,
)

FORMAT = 1
SUFFIX = ".efb"
MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
COMMON_MEMBER = "common.tar.gz"
# Domain separation: a signature made with the same key for anything else (a config document, a
# future format) can never pass as a bundle signature.
SIGNATURE_CONTEXT = b"edgefn-bundle-manifest-v1\x00"

# Arch keys look like linux-x86_64, linux-aarch64, linux-armv7l, optionally a libc suffix
# (linux-x86_64-musl). They become member names, so the alphabet is small on purpose.
ARCH_RE = re.compile(r"^[a-z0-9]+-[a-z0-9_]+(?:-[a-z0-9]+)?$")
_PAYLOAD_RE = re.compile(
    r"^(?:artifacts/([a-z0-9]+-[a-z0-9_]+(?:-[a-z0-9]+)?)\.tar\.gz|common\.tar\.gz)$"
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID_RE = re.compile(rf"^[0-9a-f]{{{KEY_ID_HEX}}}$")
_CREATED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")

# Bounds applied before anything is trusted. A manifest is a few KiB; 1 MiB leaves room for
# large config schemas. 16 arches is more than there are Linux ABIs we could target.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_SIGNATURES = 16
MAX_ARCHES = 16
DEFAULT_MAX_BUNDLE_BYTES = 512 << 20
# Tables of an authoring edgefn.toml that describe how to build, not how to run: not signed.
BUILD_ONLY_TABLES = frozenset({"build"})

_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def _fail(code: str, message: str) -> BundleError:
    return BundleError(message, code=code)


def host_arch() -> str:
    """This machine's arch key (e.g. linux-x86_64), as used in `artifacts/<arch>.tar.gz`."""
    machine = platform.machine().lower()
    return f"{platform.system().lower()}-{_MACHINE_ALIASES.get(machine, machine)}"


def artifact_member(arch: str) -> str:
    return f"artifacts/{arch}.tar.gz"


# ---------------------------------------------------------------------------------------------
# Canonical JSON


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity: one byte string per value."""
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise _fail("bad_manifest", f"value cannot be stored in a bundle manifest: {exc}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # JSON parsers disagree on which duplicate wins; a signed document must mean one thing.
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def loads_strict(data: bytes, where: str) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity and invalid UTF-8."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_finite,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail("malformed_bundle", f"{where}: not valid JSON: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# edgefn.toml generated from the signed manifest

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _toml_str(s: str, where: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:
            raise _fail("malformed_bundle", f"{where}: lone surrogate in string {s!r}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k: str, where: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_str(k, where)


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if not _INT64[0] <= v <= _INT64[1]:
            raise _fail("malformed_bundle", f"{where}: integer {v} does not fit TOML's 64 bits")
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _fail("malformed_bundle", f"{where}: non-finite number")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v, where)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    if isinstance(v, dict):
        items = (f"{_toml_key(k, where)} = {_toml_value(x, where)}" for k, x in sorted(v.items()))
        return "{" + ", ".join(items) + "}"
    raise _fail("malformed_bundle", f"{where}: {type(v).__name__} value cannot be written as TOML")


def toml_dumps(table: Mapping[str, Any], where: str = MANIFEST_NAME) -> str:
    """TOML for a JSON-like table (what tomllib gives back equals the input); sorted keys."""
    lines: list[str] = []

    def emit(path: list[str], t: Mapping[str, Any]) -> None:
        subtables = []
        for k in sorted(t):
            v = t[k]
            if isinstance(v, dict):
                subtables.append(k)
            else:
                lines.append(f"{_toml_key(k, where)} = {_toml_value(v, f'{where} {k!r}')}")
        for k in subtables:
            sub = [*path, k]
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p, where) for p in sub) + "]")
            emit(sub, t[k])

    emit([], table)
    return "\n".join(lines).lstrip("\n") + "\n"


def manifest_to_table(m: Manifest) -> dict[str, Any]:
    """The function's manifest as a table, every default spelled out (the signed form).

    Explicit defaults make the signed manifest mean the same on an agent whose defaults changed.
    """
    table: dict[str, Any] = {
        "name": m.name,
        "version": m.version,
        "runtime": m.runtime,
        "entry": m.entry,
        "timeout_ms": m.timeout_ms,
        "handler": m.handler,
        "isolation": m.isolation,
        "inline": m.inline,
        "pool": {
            "min_instances": m.pool.min_instances,
            "max_instances": m.pool.max_instances,
            "concurrency": m.pool.concurrency,
            "idle_timeout_s": m.pool.idle_timeout_s,
            "max_queue": m.pool.max_queue,
        },
        "limits": {
            "memory_mb": m.limits.memory_mb,
            "cpu_seconds": m.limits.cpu_seconds,
            "open_files": m.limits.open_files,
            "processes": m.limits.processes,
        },
        "env": dict(m.env),
    }
    for k, v in m.extra.items():
        if k not in BUILD_ONLY_TABLES:
            table[k] = v
    return table


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True, slots=True)
class Artifact:
    file: str  # member name in the bundle
    sha256: str  # of the member's bytes (the .tar.gz as stored)
    size: int  # of the member's bytes
    unpacked_size: int  # sum of file sizes inside: lets the installer check free space first

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "unpacked_size": self.unpacked_size,
        }


def _int_field(obj: Mapping[str, Any], key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _fail("malformed_bundle", f"{where}: '{key}' must be a non-negative integer")
    return v


def _artifact(obj: Any, expected_file: str, where: str) -> Artifact:
    if not isinstance(obj, dict) or set(obj) != {"file", "sha256", "size", "unpacked_size"}:
        raise _fail(
            "malformed_bundle", f"{where}: must have exactly file, sha256, size, unpacked_size"
        )
    if obj["file"] != expected_file:
        raise _fail("malformed_bundle", f"{where}: file must be {expected_file!r}")
    sha = obj["sha256"]
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise _fail("malformed_bundle", f"{where}: sha256 must be 64 lowercase hex digits")
    return Artifact(
        file=expected_file,
        sha256=sha,
        size=_int_field(obj, "size", where),
        unpacked_size=_int_field(obj, "unpacked_size", where),
    )


_MANIFEST_KEYS = {"format", "function", "artifacts", "common", "created_at", "publisher"}


@dataclass(frozen=True)
class BundleManifest:
    """The decoded `manifest.json`. Build one with `build_bundle`, read one with `from_bytes`."""

    function: Manifest
    artifacts: Mapping[str, Artifact]  # arch -> artifact; empty for an arch-independent bundle
    common: Artifact | None
    created_at: str  # RFC 3339 UTC, seconds: 2026-11-27T12:00:00Z
    publisher: str  # key id of the publisher's signing key (it must have signed)
    format: int = FORMAT
    raw: bytes = field(default=b"", repr=False, compare=False)  # the exact signed bytes

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def version(self) -> str:
        return self.function.version

    @property
    def arches(self) -> tuple[str, ...]:
        return tuple(sorted(self.artifacts))

    @property
    def payload(self) -> dict[str, Artifact]:
        """Every payload member by name."""
        out = {a.file: a for a in self.artifacts.values()}
        if self.common is not None:
            out[self.common.file] = self.common
        return out

    def supports(self, arch: str) -> bool:
        return arch in self.artifacts or (not self.artifacts and self.common is not None)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format": self.format,
            "function": manifest_to_table(self.function),
            "artifacts": {arch: a.to_json() for arch, a in self.artifacts.items()},
            "created_at": self.created_at,
            "publisher": self.publisher,
        }
        if self.common is not None:
            obj["common"] = self.common.to_json()
        return obj

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def edgefn_toml(self) -> str:
        """The `edgefn.toml` installed next to the payload, generated from the signed manifest.

        Checked to load back into exactly `self.function`, so the agent runs what was signed.
        """
        header = (
            f"# Generated from the signed manifest of {self.name} {self.version}\n"
            f"# (publisher key {self.publisher}). Do not edit: the bundle is the source of truth.\n"
        )
        table = manifest_to_table(self.function)
        text = header + toml_dumps(table)
        try:
            again = parse_manifest(tomllib.loads(text), MANIFEST_NAME)
            signed = parse_manifest(table, MANIFEST_MEMBER)
        except (tomllib.TOMLDecodeError, ManifestError) as exc:
            raise _fail(
                "malformed_bundle", f"generated {MANIFEST_NAME} does not load: {exc}"
            ) from exc
        if again != signed:
            raise _fail("malformed_bundle", f"generated {MANIFEST_NAME} differs from the manifest")
        return text

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleManifest:
        """Decode and validate `manifest.json`. Call only on bytes whose signature was checked."""
        where = MANIFEST_MEMBER
        obj = loads_strict(data, where)
        if not isinstance(obj, dict):
            raise _fail("malformed_bundle", f"{where}: must be a JSON object")
        unknown = set(obj) - _MANIFEST_KEYS
        if unknown:
            raise _fail("malformed_bundle", f"{where}: unknown fields {sorted(unknown)}")
        fmt = obj.get("format")
        if fmt != FORMAT or isinstance(fmt, bool):
            raise _fail(
                "malformed_bundle", f"{where}: bundle format {fmt!r}; this code reads {FORMAT}"
            )
        fn = obj.get("function")
        if not isinstance(fn, dict):
            raise _fail("malformed_bundle", f"{where}: 'function' must be an object")
        try:
            function = parse_manifest(fn, f"{where} [function]")
        except ManifestError as exc:
            raise _fail("malformed_bundle", exc.message) from exc
        arts = obj.get("artifacts")
        if not isinstance(arts, dict) or len(arts) > MAX_ARCHES:
            raise _fail("malformed_bundle", f"{where}: 'artifacts' must be an object (<= 16)")
        artifacts: dict[str, Artifact] = {}
        for arch, a in sorted(arts.items()):
            if not ARCH_RE.match(arch):
                raise _fail("malformed_bundle", f"{where}: bad arch key {arch!r}")
            artifacts[arch] = _artifact(a, artifact_member(arch), f"{where} artifacts.{arch}")
        common = None
        if "common" in obj:
            common = _artifact(obj["common"], COMMON_MEMBER, f"{where} common")
        if not artifacts and common is None:
            raise _fail("malformed_bundle", f"{where}: no payload (neither artifacts nor common)")
        created = obj.get("created_at")
        if not isinstance(created, str) or not _CREATED_RE.match(created):
            raise _fail(
                "malformed_bundle", f"{where}: created_at must look like 2026-01-31T12:00:00Z"
            )
        publisher = obj.get("publisher")
        if not isinstance(publisher, str) or not _KEY_ID_RE.match(publisher):
            raise _fail("malformed_bundle", f"{where}: publisher must be a 16-hex-digit key id")
        bm = cls(
            function=function,
            artifacts=artifacts,
            common=common,
            created_at=created,
            publisher=publisher,
            raw=bytes(data),
        )
        bm.edgefn_toml()  # refuse now what could not be installed later
        return bm


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as semver `a` sorts before, equal to or after `b`."""
    ka, kb = semver_key(a), semver_key(b)
    return (ka > kb) - (ka < kb)


def check_version_order(new: str, installed: str | None, *, allow_rollback: bool = False) -> None:
    """The installer's downgrade rule: versions only move forward unless a rollback says so.

    Installing the same version again is allowed (idempotent retries); whether its bytes match
    the installed copy is for the installer to compare by digest.
    """
    if installed is not None and compare_versions(new, installed) < 0 and not allow_rollback:
        raise _fail(
            "downgrade",
            f"version {new} is older than the installed {installed}; only a rollback may do that",
        )


# ---------------------------------------------------------------------------------------------
# Signatures


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
        raise _fail("malformed_bundle", f"{where}: must be an object with only 'signatures'")
    entries = obj["signatures"]
    if not isinstance(entries, list) or len(entries) > MAX_SIGNATURES:
        raise _fail("malformed_bundle", f"{where}: 'signatures' must be a list (<= 16)")
    if not entries:
        raise _fail("missing_signature", f"{where}: no signatures")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"keyid", "sig"}:
            raise _fail("malformed_bundle", f"{where}: entry {i} must have exactly keyid and sig")
        kid, sig = e["keyid"], e["sig"]
        if not isinstance(kid, str) or not _KEY_ID_RE.match(kid) or not isinstance(sig, str):
            raise _fail("malformed_bundle", f"{where}: entry {i} has a bad keyid or sig")
        try:
            raw = base64.b64decode(sig, validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 64:
            raise _fail("malformed_bundle", f"{where}: entry {i}: sig is not 64 bytes of base64")
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
        raise _fail(
            "bad_signature",
            f"{SIGNATURE_MEMBER}: signature by trusted key {sorted(bad - valid)[0]} does not "
            "match manifest.json (tampered or corrupted)",
        )
    if len(valid) >= threshold:
        return tuple(sorted(valid))
    if valid:
        raise _fail(
            "unknown_signer",
            f"{SIGNATURE_MEMBER}: {len(valid)} trusted signature(s), {threshold} required",
        )
    raise _fail(
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
        raise _fail(
            "bad_signature",
            f"manifest names publisher {manifest.publisher}, which has no signature in "
            f"{SIGNATURE_MEMBER} (signed by {', '.join(sorted(present))})",
        )


# ---------------------------------------------------------------------------------------------
# Reading


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
        raise _fail("truncated", f"bundle ends inside {what}")
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
            raise _fail("malformed_bundle", f"{source}: cannot open: {exc}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _fail("malformed_bundle", f"{source}: not a regular file")
        f = os.fdopen(fd, "rb")
        total = st.st_size
    with f:
        if total > max_bytes:
            raise _fail("too_large", f"bundle is {total} bytes, over the {max_bytes} byte limit")
        if total < BLOCK:
            raise _fail("malformed_bundle", f"not a bundle: only {total} bytes")
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
                    raise _fail("malformed_bundle", f"{where}: lone zero block in the bundle")
                for chunk in iter(lambda: f.read(64 * 1024), b""):
                    if chunk.strip(b"\0"):
                        raise _fail("malformed_bundle", "data after the end of the bundle archive")
                break
            name = header.name
            if header.kind != "file":
                raise _fail("malformed_bundle", f"{where}: unexpected directory {name!r}")
            if pos + padded(header.size) > total:
                raise _fail("truncated", f"bundle ends inside member {name!r}")
            if index == 0:
                if name != MANIFEST_MEMBER:
                    raise _fail("malformed_bundle", f"first member must be manifest.json: {name!r}")
                if header.size > MAX_MANIFEST_BYTES:
                    raise _fail("too_large", f"manifest.json is {header.size} bytes")
                manifest = _read_exact(f, header.size, name)
            elif index == 1:
                if name != SIGNATURE_MEMBER:
                    raise _fail(
                        "missing_signature", f"manifest.sig must follow manifest.json, got {name!r}"
                    )
                if header.size > MAX_SIGNATURE_BYTES:
                    raise _fail("too_large", f"manifest.sig is {header.size} bytes")
                signature = _read_exact(f, header.size, name)
            else:
                if name in members or name in (MANIFEST_MEMBER, SIGNATURE_MEMBER):
                    raise _fail("duplicate_entry", f"bundle member {name!r} appears twice")
                if not _PAYLOAD_RE.match(name):
                    raise _fail("malformed_bundle", f"unexpected bundle member {name!r}")
                if len(members) >= MAX_ARCHES + 1:
                    raise _fail("malformed_bundle", "too many payload members")
                members[name] = Member(name=name, offset=pos, size=header.size)
            pos += padded(header.size)
            f.seek(pos)
            index += 1
        if manifest is None:
            raise _fail("malformed_bundle", "empty archive: no manifest.json")
        if signature is None:
            raise _fail("missing_signature", "bundle has no manifest.sig")
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
            raise _fail("truncated", "bundle ends inside a payload member")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def check_payload(raw: RawBundle, manifest: BundleManifest) -> None:
    """Payload members are exactly the signed list, each with the signed size and sha256."""
    expected = manifest.payload
    extra = sorted(set(raw.members) - set(expected))
    if extra:
        raise _fail("malformed_bundle", f"members not listed in the signed manifest: {extra}")
    missing = sorted(set(expected) - set(raw.members))
    if missing:
        raise _fail("malformed_bundle", f"members listed in the manifest are missing: {missing}")
    with raw.open() as f:
        for name, art in sorted(expected.items()):
            m = raw.members[name]
            if m.size != art.size:
                raise _fail(
                    "digest_mismatch", f"{name}: {m.size} bytes, the manifest says {art.size}"
                )
            digest = _sha256_window(f, m.offset, m.size)
            if digest != art.sha256:
                raise _fail("digest_mismatch", f"{name}: sha256 {digest} != signed {art.sha256}")


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True, slots=True)
class _Packed:
    path: Path
    sha256: str
    size: int
    unpacked_size: int
    files: frozenset[str]
    dirs: frozenset[str]


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, Path, os.stat_result]]:
    """(archive name, path, lstat) of every entry below `root`, sorted, symlinks not followed."""
    for name in sorted(os.listdir(root / rel if rel else root)):
        arc = f"{rel}/{name}" if rel else name
        path = root / arc
        st = os.lstat(path)
        yield arc, path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, arc)


def _add_entry(
    tar: tarfile.TarFile, arc: str, path: Path, st: os.stat_result, where: str, lim: UnpackLimits
) -> int:
    """Add one entry with normalised metadata; returns the file size (0 for a directory)."""
    info = tarfile.TarInfo(arc)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISLNK(st.st_mode):
        raise _fail(
            "link_in_archive", f"{where}: symlinks cannot go into a bundle; copy the target instead"
        )
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return 0
    if not stat.S_ISREG(st.st_mode):
        raise _fail("special_file", f"{where}: not a regular file or directory")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        info.size = os.fstat(fd).st_size
        info.mode = file_mode_for(st.st_mode)
        if info.size > lim.max_file_bytes:
            raise _fail("too_large", f"{where}: {info.size} bytes is over the per-file cap")
        tar.addfile(info, fh)
    return info.size


def _pack_dir(src: Path, out: Path, label: str, limits: UnpackLimits) -> _Packed:
    """Deterministic .tar.gz of `src`: sorted, mtime 0, owner 0, modes 0o644/0o755 only."""
    if not src.is_dir():
        raise _fail("bad_payload", f"{label}: {src} is not a directory")
    files: set[str] = set()
    dirs: set[str] = set()
    total = 0
    # filename="" and mtime=0: no name or time in the gzip header, so equal inputs, equal bytes.
    with (
        out.open("wb") as raw_out,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw_out, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for arc, path, st in _walk(src):
            if arc == MANIFEST_NAME:
                continue  # generated from the signed manifest at install time
            where = f"{label}: {path}"
            check_name(arc, where, max_depth=limits.max_depth)
            try:
                size = _add_entry(tar, arc, path, st, where, limits)
            except ValueError as exc:  # tarfile: name too long for ustar
                raise _fail("unsafe_path", f"{where}: {exc}") from exc
            (dirs if stat.S_ISDIR(st.st_mode) else files).add(arc)
            total += size
    scan_archive(ArchiveInput(label=label, source=out), limits)  # e.g. a ratio devices refuse
    h = hashlib.sha256()
    with out.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return _Packed(
        path=out,
        sha256=h.hexdigest(),
        size=out.stat().st_size,
        unpacked_size=total,
        files=frozenset(files),
        dirs=frozenset(dirs),
    )


def _created_at(value: str | None) -> str:
    if value is not None:
        return value
    # SOURCE_DATE_EPOCH (reproducible-builds.org) makes the whole bundle reproducible.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _check_combined(
    function: Manifest, arch: str, common: _Packed | None, part: _Packed | None, lim: UnpackLimits
) -> None:
    """Refuse at build time what a device would refuse at install time."""
    parts = [p for p in (common, part) if p is not None]
    files = [f for p in parts for f in p.files]
    entries = len(files) + len({d for p in parts for d in p.dirs})
    if len(files) != len(set(files)):
        dup = sorted({f for f in files if files.count(f) > 1})
        raise _fail("duplicate_entry", f"{arch}: files both in common and arch payload: {dup}")
    if entries + 1 > lim.max_entries:  # +1: the generated edgefn.toml
        raise _fail("too_many_entries", f"{arch}: {entries} entries, limit {lim.max_entries}")
    total = sum(p.unpacked_size for p in parts)
    if total > lim.max_total_bytes:
        raise _fail("too_large", f"{arch}: {total} bytes unpacked, limit {lim.max_total_bytes}")
    if function.entry not in files:
        raise _fail("bad_payload", f"{arch}: entry {function.entry!r} is not in the payload")


def build_bundle(
    manifest_fields: Manifest | Mapping[str, Any],
    arch_payload_dirs: Mapping[str, Path],
    common_dir: Path | None,
    key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
    out: Path,
    *,
    created_at: str | None = None,
    limits: UnpackLimits = DEFAULT_LIMITS,
) -> Path:
    """Pack, sign and write a bundle to `out` (atomically replaced). Same inputs, same bytes.

    `manifest_fields` is the function's manifest (a `Manifest`, or a table as in edgefn.toml).
    A top-level edgefn.toml in a payload dir is skipped: the device gets one generated from the
    signed manifest. Symlinks and special files in payload dirs are refused, not followed.
    With several keys, the first is the publisher; all sign.
    """
    function = (
        manifest_fields
        if isinstance(manifest_fields, Manifest)
        else parse_manifest(manifest_fields, "manifest_fields")
    )
    keys = [key] if isinstance(key, Ed25519PrivateKey) else list(key)
    if not keys:
        raise ValueError("at least one signing key is needed")
    for arch in arch_payload_dirs:
        if not ARCH_RE.match(arch):
            raise _fail("bad_payload", f"arch key {arch!r} must look like linux-x86_64")
    if len(arch_payload_dirs) > MAX_ARCHES:
        raise _fail("bad_payload", f"more than {MAX_ARCHES} arches")
    if not arch_payload_dirs and common_dir is None:
        raise _fail("bad_payload", "nothing to bundle: no arch payloads and no common dir")
    created = _created_at(created_at)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".efb-build-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        common = None
        if common_dir is not None:
            common = _pack_dir(Path(common_dir), tmp / "common.tar.gz", "common", limits)
        packed: dict[str, _Packed] = {}
        for arch, d in sorted(arch_payload_dirs.items()):
            packed[arch] = _pack_dir(Path(d), tmp / f"{arch}.tar.gz", arch, limits)
        if packed:
            for arch, part in packed.items():
                _check_combined(function, arch, common, part, limits)
        else:
            _check_combined(function, "common", common, None, limits)

        def art(p: _Packed, name: str) -> Artifact:
            return Artifact(name, p.sha256, p.size, p.unpacked_size)

        draft = BundleManifest(
            function=function,
            artifacts={a: art(p, artifact_member(a)) for a, p in packed.items()},
            common=art(common, COMMON_MEMBER) if common else None,
            created_at=created,
            publisher=key_id(keys[0]),
        )
        manifest_bytes = draft.to_bytes()
        BundleManifest.from_bytes(manifest_bytes)  # exactly what a verifier will do
        sig_bytes = sign_manifest(manifest_bytes, keys)
        payload = {artifact_member(a): p.path for a, p in packed.items()}
        if common is not None:
            payload[COMMON_MEMBER] = common.path
        tmp_out = tmp / "bundle.efb"
        _write_outer(tmp_out, manifest_bytes, sig_bytes, payload)
        os.replace(tmp_out, out)
    return out


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_outer(
    out: Path, manifest_bytes: bytes, sig_bytes: bytes, payload: Mapping[str, Path]
) -> None:
    with out.open("wb") as raw_out:
        with tarfile.open(fileobj=raw_out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in ((MANIFEST_MEMBER, manifest_bytes), (SIGNATURE_MEMBER, sig_bytes)):
                tar.addfile(_member_info(name, len(data)), io.BytesIO(data))
            for name, path in sorted(payload.items()):
                with path.open("rb") as fh:
                    tar.addfile(_member_info(name, path.stat().st_size), fh)
        raw_out.flush()
        os.fsync(raw_out.fileno())

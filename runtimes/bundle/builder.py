"""Building a bundle: pack payload dirs deterministically, write the manifest, sign, write."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtimes.bundle.layout import ARCH_RE, COMMON_MEMBER, MAX_ARCHES, artifact_member, fail
from runtimes.bundle.manifest import Artifact, BundleManifest
from runtimes.bundle.signatures import sign_manifest
from runtimes.bundle.writer import write_outer
from runtimes.manifest import MANIFEST_NAME, Manifest, parse_manifest
from runtimes.signing import key_id
from runtimes.sources import rfc3339, source_epoch
from runtimes.unpack import (
    DEFAULT_LIMITS,
    ArchiveInput,
    UnpackLimits,
    check_name,
    file_mode_for,
    scan_archive,
)


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
        raise fail(
            "link_in_archive", f"{where}: symlinks cannot go into a bundle; copy the target instead"
        )
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return 0
    if not stat.S_ISREG(st.st_mode):
        raise fail("special_file", f"{where}: not a regular file or directory")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        info.size = os.fstat(fd).st_size
        info.mode = file_mode_for(st.st_mode)
        if info.size > lim.max_file_bytes:
            raise fail("too_large", f"{where}: {info.size} bytes is over the per-file cap")
        tar.addfile(info, fh)
    return info.size


def _pack_dir(src: Path, out: Path, label: str, limits: UnpackLimits) -> _Packed:
    """Deterministic .tar.gz of `src`: sorted, mtime 0, owner 0, modes 0o644/0o755 only."""
    if not src.is_dir():
        raise fail("bad_payload", f"{label}: {src} is not a directory")
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
                raise fail("unsafe_path", f"{where}: {exc}") from exc
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


def _created_at(value: str | None, dirs: Sequence[Path]) -> str:
    """`value`, else SOURCE_DATE_EPOCH, else the payload's newest mtime: never the clock.

    The clock would make every build of the same inputs a different signed manifest (and a
    registry refuses a second, different bundle for one version).
    """
    if value is not None:
        return value
    return rfc3339(max((source_epoch(d) for d in dirs), default=0))


def _check_combined(
    function: Manifest, arch: str, common: _Packed | None, part: _Packed | None, lim: UnpackLimits
) -> None:
    """Refuse at build time what a device would refuse at install time."""
    parts = [p for p in (common, part) if p is not None]
    files = [f for p in parts for f in p.files]
    entries = len(files) + len({d for p in parts for d in p.dirs})
    if len(files) != len(set(files)):
        dup = sorted({f for f in files if files.count(f) > 1})
        raise fail("duplicate_entry", f"{arch}: files both in common and arch payload: {dup}")
    if entries + 1 > lim.max_entries:  # +1: the generated edgefn.toml
        raise fail("too_many_entries", f"{arch}: {entries} entries, limit {lim.max_entries}")
    total = sum(p.unpacked_size for p in parts)
    if total > lim.max_total_bytes:
        raise fail("too_large", f"{arch}: {total} bytes unpacked, limit {lim.max_total_bytes}")
    if function.entry not in files:
        raise fail("bad_payload", f"{arch}: entry {function.entry!r} is not in the payload")


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
    With several keys, the first is the publisher; all sign. `created_at` defaults to
    SOURCE_DATE_EPOCH, else the newest mtime in the payload dirs (`runtimes.sources`).
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
            raise fail("bad_payload", f"arch key {arch!r} must look like linux-x86_64")
    if len(arch_payload_dirs) > MAX_ARCHES:
        raise fail("bad_payload", f"more than {MAX_ARCHES} arches")
    if not arch_payload_dirs and common_dir is None:
        raise fail("bad_payload", "nothing to bundle: no arch payloads and no common dir")
    dirs = [Path(d) for d in (*arch_payload_dirs.values(), common_dir) if d is not None]
    created = _created_at(created_at, dirs)
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
        write_outer(tmp_out, manifest_bytes, sig_bytes, payload)
        os.replace(tmp_out, out)
    return out

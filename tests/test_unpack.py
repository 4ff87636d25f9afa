"""Safe extraction: hostile archives crafted with tarfile are refused with a specific code, and
nothing (no dest, no staging dir) is left behind; well-formed archives extract exactly."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from runtimes.errors import BundleError
from runtimes.unpack import (
    ArchiveInput,
    UnpackLimits,
    parse_header,
    remove_stale_staging,
    unpack_archives,
    unpack_tar_gz,
)

Entry = tuple[tarfile.TarInfo, bytes | None]


class _Zeros(io.RawIOBase):
    """A file of `n` zero bytes that never exists in memory at once."""

    def __init__(self, n: int) -> None:
        self.n = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def info(
    name: str, data: bytes | None = b"", *, type: bytes = tarfile.REGTYPE, mode: int = 0o644
) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.mode = mode
    if data is not None and type == tarfile.REGTYPE:
        ti.size = len(data)
    return ti, data


def link(name: str, target: str, *, hard: bool = False) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    ti.linkname = target
    return ti, None


def tgz(entries: list[Entry], *, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "functions"
    d.mkdir()
    (d / "existing-sibling").mkdir()
    return d


def assert_refused(
    archive: bytes, work: Path, code: str, *, limits: UnpackLimits | None = None
) -> BundleError:
    dest = work / "fn"
    before = listing(work)
    with pytest.raises(BundleError) as info_:
        if limits is None:
            unpack_tar_gz(archive, dest)
        else:
            unpack_tar_gz(archive, dest, limits=limits)
    assert info_.value.code == code, info_.value.message
    assert not os.path.lexists(dest)
    assert listing(work) == before  # no staging dir left behind
    return info_.value


# --- happy path ---------------------------------------------------------------------------------


def test_extracts_files_dirs_and_normalises_modes(work: Path) -> None:
    archive = tgz(
        [
            info("bin", None, type=tarfile.DIRTYPE, mode=0o700),
            info("bin/run", b"#!/bin/sh\necho hi\n", mode=0o700),
            info("lib/deep/data.txt", b"data", mode=0o666),  # parents implicit
            info("empty", None, type=tarfile.DIRTYPE, mode=0o777),
            info("bin", None, type=tarfile.DIRTYPE),  # repeated dir: harmless
        ]
    )
    old = os.umask(0o077)  # the result must not depend on the umask
    try:
        res = unpack_tar_gz(archive, work / "fn")
    finally:
        os.umask(old)
    dest = work / "fn"
    assert (dest / "bin/run").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "lib/deep/data.txt").read_bytes() == b"data"
    assert stat.S_IMODE((dest / "bin/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "lib/deep/data.txt").stat().st_mode) == 0o644
    for d in ("", "bin", "lib", "lib/deep", "empty"):
        assert stat.S_IMODE((dest / d).stat().st_mode) == 0o755, d
    assert (res.files, res.bytes) == (2, len(b"#!/bin/sh\necho hi\n") + 4)
    assert listing(work) == ["existing-sibling", "fn"]


def test_small_highly_compressible_archive_is_within_the_grace(work: Path) -> None:
    # 512 KiB of zeros inflates ~1000x, but below ratio_grace_bytes: a normal tiny payload.
    archive = tgz([info("zeros.bin", bytes(512 * 1024))])
    unpack_tar_gz(archive, work / "fn")
    assert (work / "fn/zeros.bin").stat().st_size == 512 * 1024


def test_several_archives_merge_and_extra_files(work: Path) -> None:
    common = tgz([info("lib", None, type=tarfile.DIRTYPE), info("lib/common.js", b"c")])
    arch = tgz([info("lib", None, type=tarfile.DIRTYPE), info("lib/native.node", b"n")])
    unpack_archives(
        [ArchiveInput("common", common), ArchiveInput("arch", arch)],
        work / "fn",
        extra_files={"edgefn.toml": b"name = 'x'\n"},
        require_files=["lib/native.node"],
    )
    assert sorted(p.name for p in (work / "fn/lib").iterdir()) == ["common.js", "native.node"]
    assert (work / "fn/edgefn.toml").read_bytes() == b"name = 'x'\n"


def test_reads_a_window_of_a_file_and_checks_its_digest(work: Path, tmp_path: Path) -> None:
    archive = tgz([info("a.txt", b"hello")])
    container = tmp_path / "container.bin"
    container.write_bytes(b"X" * 1000 + archive + b"Y" * 77)
    digest = hashlib.sha256(archive).hexdigest()
    window = ArchiveInput("member", container, offset=1000, length=len(archive), sha256=digest)
    unpack_archives([window], work / "fn")
    assert (work / "fn/a.txt").read_bytes() == b"hello"

    bad = ArchiveInput("member", container, offset=1000, length=len(archive), sha256="0" * 64)
    with pytest.raises(BundleError) as exc:
        unpack_archives([bad], work / "fn2")
    assert exc.value.code == "digest_mismatch"
    assert not (work / "fn2").exists()
    assert listing(work) == ["existing-sibling", "fn"]


# --- hostile archives ---------------------------------------------------------------------------

HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "tar slip ../x": (lambda: tgz([info("../x", b"evil")]), "unsafe_path"),
    "nested slip a/../../x": (lambda: tgz([info("a/../../x", b"evil")]), "unsafe_path"),
    "absolute path": (lambda: tgz([info("/tmp/edgefn-evil", b"evil")]), "unsafe_path"),
    "dot component": (lambda: tgz([info("a/./b", b"x")]), "unsafe_path"),
    "backslash": (lambda: tgz([info("..\\..\\evil", b"x")]), "unsafe_path"),
    "NUL in name": (lambda: tgz([info("ok\x00/../../evil", b"x")]), "unsafe_path"),
    "control char": (lambda: tgz([info("a\nb", b"x")]), "unsafe_path"),
    "non-UTF-8 name": (lambda: tgz([info("bad\udcff", b"x")]), "unsafe_path"),
    "symlink": (lambda: tgz([link("link", "/etc")]), "link_in_archive"),
    "hardlink": (lambda: tgz([link("passwd", "/etc/passwd", hard=True)]), "link_in_archive"),
    "char device": (lambda: tgz([info("null", None, type=tarfile.CHRTYPE)]), "special_file"),
    "block device": (lambda: tgz([info("sda", None, type=tarfile.BLKTYPE)]), "special_file"),
    "fifo": (lambda: tgz([info("pipe", None, type=tarfile.FIFOTYPE)]), "special_file"),
    "setuid": (lambda: tgz([info("su", b"x", mode=0o4755)]), "unsafe_mode"),
    "setgid": (lambda: tgz([info("sg", b"x", mode=0o2755)]), "unsafe_mode"),
    "sticky dir": (
        lambda: tgz([info("t", None, type=tarfile.DIRTYPE, mode=0o1777)]),
        "unsafe_mode",
    ),
    "duplicate file": (lambda: tgz([info("a", b"1"), info("a", b"2")]), "duplicate_entry"),
    "file then dir of same name": (
        lambda: tgz([info("a", b"1"), info("a", None, type=tarfile.DIRTYPE)]),
        "duplicate_entry",
    ),
    "path through a file": (lambda: tgz([info("a", b"1"), info("a/b", b"2")]), "unsafe_path"),
    "pax header": (
        lambda: tgz([info("n" * 150, b"x")], fmt=tarfile.PAX_FORMAT),
        "malformed_bundle",
    ),
    "gnu tar": (lambda: tgz([info("a", b"x")], fmt=tarfile.GNU_FORMAT), "malformed_bundle"),
    "not gzip": (lambda: b"plain text, not gzip" * 10, "malformed_bundle"),
    "empty": (lambda: b"", "truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(case: str, work: Path) -> None:
    make, code = HOSTILE[case]
    assert_refused(make(), work, code)


def test_symlink_escape_leaves_the_target_alone(work: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tgz([link("escape", str(outside)), info("escape/pwned", b"evil")])
    err = assert_refused(archive, work, "link_in_archive")
    assert "escape" in err.message
    assert listing(outside) == []


def test_hardlink_escape_leaves_the_target_alone(work: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    archive = tgz([link("h", str(victim), hard=True), info("h", b"overwrite")])
    assert_refused(archive, work, "link_in_archive")
    assert victim.read_bytes() == b"precious"


def test_refusal_after_files_were_written_cleans_up(work: Path) -> None:
    # Many good files first, then a bad one: the staging dir with the good ones must go too.
    good = [info(f"ok/{i}.txt", b"fine") for i in range(20)]
    assert_refused(tgz([*good, info("../evil", b"x")]), work, "unsafe_path")


def test_too_many_entries(work: Path) -> None:
    archive = tgz([info(f"f{i}", b"x") for i in range(11)])
    limits = UnpackLimits(max_entries=10)
    assert_refused(archive, work, "too_many_entries", limits=limits)
    unpack_tar_gz(tgz([info(f"f{i}", b"x") for i in range(10)]), work / "ok", limits=limits)


def test_too_deep(work: Path) -> None:
    limits = UnpackLimits(max_depth=3)
    assert_refused(tgz([info("a/b/c/d", b"x")]), work, "unsafe_path", limits=limits)
    unpack_tar_gz(tgz([info("a/b/c", b"x")]), work / "ok", limits=limits)


def test_oversized_total(work: Path) -> None:
    archive = tgz([info("a", os.urandom(600)), info("b", os.urandom(600))])
    assert_refused(archive, work, "too_large", limits=UnpackLimits(max_total_bytes=1000))


def test_oversized_single_file(work: Path) -> None:
    archive = tgz([info("a", os.urandom(2000))])
    err = assert_refused(archive, work, "too_large", limits=UnpackLimits(max_file_bytes=1000))
    assert "'a'" in err.message


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """50 MiB of zeros in one member: ~51 KB compressed, ratio ~1000."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        ti = tarfile.TarInfo("zeros")
        ti.size = 50 << 20
        tar.addfile(ti, _Zeros(ti.size))
    return buf.getvalue()


def test_gzip_bomb_is_refused_by_ratio(work: Path, gzip_bomb: bytes) -> None:
    assert len(gzip_bomb) < 200_000
    err = assert_refused(gzip_bomb, work, "compression_ratio")
    # Aborted early: the refusal names how much was inflated, which is a small part of 50 MiB.
    inflated = int(err.message.split("(")[1].split(" bytes")[0])
    assert inflated < 4 << 20


def test_gzip_bomb_passes_when_the_ratio_bound_is_lifted(work: Path, gzip_bomb: bytes) -> None:
    # Shows the ratio check (not some other limit) is what stops the bomb above.
    unpack_tar_gz(gzip_bomb, work / "fn", limits=UnpackLimits(max_ratio=5000))
    assert (work / "fn/zeros").stat().st_size == 50 << 20


def test_truncated_gzip(work: Path) -> None:
    archive = tgz([info("a", os.urandom(5000))])
    assert_refused(archive[: len(archive) // 2], work, "truncated")


def test_corrupt_gzip_checksum(work: Path) -> None:
    archive = bytearray(tgz([info("a", b"hello")]))
    archive[-8] ^= 0xFF  # CRC32 in the gzip trailer
    assert_refused(bytes(archive), work, "malformed_bundle")


def test_data_after_the_gzip_stream(work: Path) -> None:
    archive = tgz([info("a", b"hello")]) + gzip.compress(b"second member")
    assert_refused(archive, work, "malformed_bundle")


def test_tar_data_after_end_of_archive(work: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        ti, data = info("a", b"hello")
        tar.addfile(ti, io.BytesIO(data or b""))
    smuggled = raw.getvalue() + b"hidden" + bytes(506)
    assert_refused(gzip.compress(smuggled), work, "malformed_bundle")


def test_missing_end_of_archive(work: Path) -> None:
    ti, data = info("a", b"hello")
    raw = ti.tobuf(format=tarfile.USTAR_FORMAT) + (data or b"").ljust(512, b"\0")
    assert_refused(gzip.compress(raw), work, "truncated")


def test_extra_file_collides_with_archive(work: Path) -> None:
    with pytest.raises(BundleError) as exc:
        unpack_archives(
            [ArchiveInput("p", tgz([info("edgefn.toml", b"from payload")]))],
            work / "fn",
            extra_files={"edgefn.toml": b"generated"},
        )
    assert exc.value.code == "duplicate_entry"
    assert listing(work) == ["existing-sibling"]


def test_required_file_missing(work: Path) -> None:
    with pytest.raises(BundleError) as exc:
        unpack_archives(
            [ArchiveInput("p", tgz([info("other", b"x")]))], work / "fn", require_files=["main"]
        )
    assert exc.value.code == "malformed_bundle"
    assert listing(work) == ["existing-sibling"]


def test_dest_must_not_exist(work: Path) -> None:
    (work / "fn").mkdir()  # even empty: rename() would silently replace it
    with pytest.raises(BundleError) as exc:
        unpack_tar_gz(tgz([info("a", b"x")]), work / "fn")
    assert exc.value.code == "dest_exists"
    assert listing(work / "fn") == []
    assert listing(work) == ["existing-sibling", "fn"]


def test_parse_header_checks_checksum() -> None:
    ti, _ = info("a", b"x")
    block = bytearray(ti.tobuf(format=tarfile.USTAR_FORMAT))
    assert parse_header(bytes(block), "t") is not None
    block[0] = ord("b")
    with pytest.raises(BundleError) as exc:
        parse_header(bytes(block), "t")
    assert exc.value.code == "malformed_bundle"
    assert parse_header(bytes(512), "t") is None


def test_remove_stale_staging(work: Path) -> None:
    (work / ".fn.unpack-abc123").mkdir()
    (work / ".fn.unpack-abc123/half.bin").write_bytes(b"x")
    (work / "keep").mkdir()
    assert [p.name for p in remove_stale_staging(work)] == [".fn.unpack-abc123"]
    assert listing(work) == ["existing-sibling", "keep"]

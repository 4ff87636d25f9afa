"""Safe extraction of gzip-compressed tar payloads; the strict header parser is `runtimes.ustar`.

Flow of `unpack_archives`:
  1. create a private staging dir next to `dest` (same filesystem, so the final rename is atomic);
  2. for each archive, stream it: read compressed bytes in chunks (hashing them), inflate with a
     cap on output per call, and abort as soon as the inflated/consumed ratio or the absolute size
     passes its bound - a bomb is never inflated in full;
  3. parse each 512-byte ustar header with our own code (`runtimes.ustar.parse_header`) and
     refuse anything but plain files and directories with safe relative names;
  4. create every file relative to directory fds with O_CREAT|O_EXCL|O_NOFOLLOW, modes 0o644/0o755;
  5. check the archive's sha256 (guards against the file changing between verify and unpack);
  6. fsync files and directories, rename staging -> dest, fsync the parent.
On any error the staging dir is removed: `dest` either appears complete or not at all.

Why not `tarfile.extractall` with a filter: the filters of Python 3.11 had bypasses (CVE-2024-12718,
CVE-2025-4138, CVE-2025-4517) and its header parser had a ReDoS (CVE-2024-6232) in 3.11.7, the
version we run. We only read the subset of POSIX ustar that our builder writes, so a small parser
with every check spelled out is both safer and easier to review. Pax/GNU extension headers, links,
devices, fifos and setuid/setgid/sticky bits are refused, never stripped: a payload we built
never has them, so their presence means the archive did not come from our builder.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtimes.fsio import fsync_dir
from runtimes.ustar import BLOCK as BLOCK
from runtimes.ustar import DEFAULT_MAX_DEPTH
from runtimes.ustar import TarHeader as TarHeader
from runtimes.ustar import check_name as check_name
from runtimes.ustar import padded as padded
from runtimes.ustar import parse_header as parse_header
from runtimes.ustar import refusal as _fail

MiB = 1 << 20

# Read size for compressed input and the cap on inflated output per zlib call. The cap is what
# makes bomb detection early: zlib never hands us more than this before we check the ratio.
_CHUNK = 64 * 1024

_FILE_MODE = 0o644
_EXEC_MODE = 0o755
_DIR_MODE = 0o755


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """Bounds on what one unpack may create. Every bound has a stable error code when passed."""

    max_entries: int = 10_000  # files + directories, across all archives of one unpack
    max_total_bytes: int = 512 * MiB  # sum of file sizes
    max_file_bytes: int = 256 * MiB
    # Inflated/compressed. Executables compress 3-5x, source text up to ~20x; 200x is only reached
    # by long runs of one byte, i.e. padding or a bomb. Deflate's own maximum is ~1032x.
    max_ratio: float = 200.0
    # The ratio is only judged after this many inflated bytes: tiny archives of a few small text
    # files legitimately inflate far more than `max_ratio` (mostly zero header padding).
    ratio_grace_bytes: int = 1 * MiB
    max_depth: int = DEFAULT_MAX_DEPTH  # path components; bounds the directory fds per entry


DEFAULT_LIMITS = UnpackLimits()


@dataclass(frozen=True, slots=True)
class ArchiveInput:
    """One .tar.gz to extract: a whole file or bytes, or a window of one (a bundle member)."""

    label: str  # names the archive in error messages, e.g. "artifacts/linux-x86_64.tar.gz"
    source: Path | bytes
    offset: int = 0
    length: int | None = None  # None: up to the end of the source
    sha256: str | None = None  # lowercase hex; checked before the final rename


@dataclass(frozen=True, slots=True)
class UnpackResult:
    path: Path
    files: int
    dirs: int
    bytes: int


# ---------------------------------------------------------------------------------------------
# Streaming gzip input with bounds


class _Inflater:
    """Inflates one gzip member from a (window of a) file, enforcing the size and ratio bounds."""

    def __init__(self, src: BinaryIO, length: int | None, label: str, limits: UnpackLimits) -> None:
        self._src = src
        self._left = length
        self._label = label
        self._limits = limits
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper, CRC32 and ISIZE checked
        self._buf = bytearray()
        self._fed = 0
        self.produced = 0
        self.hasher = hashlib.sha256()
        # The tar stream's bytes beyond file data: a header and up to 511 bytes of padding per
        # entry, the end blocks and up to one 10 KiB tar record of padding.
        self._max_stream = limits.max_total_bytes + (limits.max_entries + 2) * 2 * BLOCK + 20480

    def _read_src(self) -> bytes:
        want = _CHUNK if self._left is None else min(_CHUNK, self._left)
        if want == 0:
            return b""
        data = self._src.read(want)
        if self._left is not None:
            self._left -= len(data)
        self.hasher.update(data)
        return data

    def _inflate_some(self) -> bool:
        """Inflate at most one chunk into the buffer; False when the gzip stream has ended."""
        if self._z.eof:
            return False
        data = self._z.unconsumed_tail  # input zlib left over because of the output cap
        if not data:
            data = self._read_src()
            self._fed += len(data)
            if not data:
                raise _fail("truncated", f"{self._label}: compressed stream ends early")
        try:
            out = self._z.decompress(data, _CHUNK)
        except zlib.error as exc:
            raise _fail("malformed_bundle", f"{self._label}: corrupt gzip data: {exc}") from exc
        self.produced += len(out)
        self._buf += out
        consumed = self._fed - len(self._z.unconsumed_tail) - len(self._z.unused_data)
        lim = self._limits
        if self.produced > self._max_stream:
            raise _fail("too_large", f"{self._label}: inflates past {self._max_stream} bytes")
        if self.produced > lim.ratio_grace_bytes and self.produced > lim.max_ratio * max(
            consumed, 1
        ):
            raise _fail(
                "compression_ratio",
                f"{self._label}: compression ratio above {lim.max_ratio:g} "
                f"({self.produced} bytes from {consumed}); refusing a likely gzip bomb",
            )
        return True

    def read_exact(self, n: int, what: str) -> bytes:
        while len(self._buf) < n:
            if not self._inflate_some():
                raise _fail("truncated", f"{self._label}: archive ends inside {what}")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def finish(self) -> None:
        """Drain what follows the tar end blocks: zero padding, then the gzip trailer, then EOF."""
        while True:
            if self._buf.strip(b"\0"):
                raise _fail("malformed_bundle", f"{self._label}: data after the end of archive")
            self._buf.clear()
            if not self._inflate_some():
                break
        if self._z.unused_data or self._read_src():
            raise _fail("malformed_bundle", f"{self._label}: data after the gzip stream")


def iter_members(
    inflater: _Inflater, label: str, max_depth: int
) -> Iterable[tuple[TarHeader, _Inflater]]:
    """Yield (header, stream positioned at its data); the caller must consume exactly `size`."""
    index = 0
    while True:
        where = f"{label} member {index}"
        block = inflater.read_exact(BLOCK, f"header of member {index}")
        header = parse_header(block, where, max_depth=max_depth)
        if header is None:
            if inflater.read_exact(BLOCK, "end-of-archive marker") != bytes(BLOCK):
                raise _fail("malformed_bundle", f"{where}: lone zero block inside the archive")
            return
        yield header, inflater
        index += 1


# ---------------------------------------------------------------------------------------------
# Extraction


_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Tree:
    """What the staging dir holds so far; every create goes through here."""

    def __init__(self, root: Path, limits: UnpackLimits) -> None:
        self.root = root
        self.limits = limits
        self.kinds: dict[str, str] = {"": "dir"}  # name -> "file" | "dir" | "implicit"
        self.entries = 0
        self.total = 0
        self.files = 0
        self.root_fd = os.open(root, _OPEN_DIR)

    def close(self) -> None:
        os.close(self.root_fd)

    def _open_parent(self, parts: list[str], where: str) -> int:
        """An fd of the parent dir of `parts`, creating missing directories on the way."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts[:-1]):
                sub = "/".join(parts[: i + 1])
                kind = self.kinds.get(sub)
                if kind == "file":
                    raise _fail("unsafe_path", f"{where}: {sub!r} is a file, not a directory")
                if kind is None:
                    os.mkdir(part, _DIR_MODE, dir_fd=fd)
                    os.chmod(part, _DIR_MODE, dir_fd=fd, follow_symlinks=False)
                    self.kinds[sub] = "implicit"
                nxt = os.open(part, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _claim(self, name: str, kind: str, where: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise _fail("too_many_entries", f"{where}: more than {self.limits.max_entries} entries")
        seen = self.kinds.get(name)
        if seen is None:
            return
        if kind == "dir" and seen != "file":
            # Declaring a directory again is harmless, and common + arch payloads share dirs.
            self.kinds[name] = "dir"
            return
        raise _fail("duplicate_entry", f"{where}: {name!r} appears more than once")

    def add_dir(self, name: str, where: str) -> None:
        self._claim(name, "dir", where)
        if self.kinds.get(name) == "dir":  # created before (implicitly or explicitly)
            return
        parts = name.split("/")
        fd = self._open_parent(parts, where)
        try:
            os.mkdir(parts[-1], _DIR_MODE, dir_fd=fd)
            os.chmod(parts[-1], _DIR_MODE, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
        self.kinds[name] = "dir"

    def add_file(
        self, name: str, mode: int, size: int, chunks: Iterable[bytes], where: str
    ) -> None:
        self._claim(name, "file", where)
        lim = self.limits
        if size > lim.max_file_bytes:
            raise _fail("too_large", f"{where}: {size} bytes is over the per-file cap")
        if self.total + size > lim.max_total_bytes:
            raise _fail("too_large", f"{where}: total size over {lim.max_total_bytes} bytes")
        self.total += size
        parts = name.split("/")
        dfd = self._open_parent(parts, where)
        try:
            fd = os.open(parts[-1], _CREATE, 0o600, dir_fd=dfd)
        finally:
            os.close(dfd)
        self.kinds[name] = "file"
        self.files += 1
        with os.fdopen(fd, "wb", closefd=True) as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fchmod(fd, _EXEC_MODE if mode & 0o111 else _FILE_MODE)
            os.fsync(fd)

    def sync_dirs(self) -> None:
        dirs = sorted((n for n, k in self.kinds.items() if k != "file"), key=len, reverse=True)
        for name in dirs:
            fd = os.open(name or ".", _OPEN_DIR, dir_fd=self.root_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _data_chunks(stream: _Inflater, size: int, what: str) -> Iterable[bytes]:
    left = size
    while left:
        n = min(left, _CHUNK)
        yield stream.read_exact(n, what)
        left -= n
    pad = padded(size) - size
    if pad:
        stream.read_exact(pad, what)


def _open_source(archive: ArchiveInput) -> BinaryIO:
    f: BinaryIO
    if isinstance(archive.source, bytes):
        f = io.BytesIO(archive.source)
    else:
        try:
            f = archive.source.open("rb")
        except OSError as exc:
            raise _fail("malformed_bundle", f"{archive.label}: cannot open: {exc}") from exc
    f.seek(archive.offset)
    return f


def _extract_one(tree: _Tree, archive: ArchiveInput) -> None:
    with _open_source(archive) as src:
        inflater = _Inflater(src, archive.length, archive.label, tree.limits)
        for header, stream in iter_members(inflater, archive.label, tree.limits.max_depth):
            where = f"{archive.label}: {header.name!r}"
            if header.kind == "dir":
                tree.add_dir(header.name, where)
            else:
                chunks = _data_chunks(stream, header.size, f"data of {header.name!r}")
                tree.add_file(header.name, header.mode, header.size, chunks, where)
        inflater.finish()
        digest = inflater.hasher.hexdigest()
    if archive.sha256 is not None and digest != archive.sha256:
        raise _fail(
            "digest_mismatch",
            f"{archive.label}: sha256 {digest} does not match the signed {archive.sha256} "
            "(the file changed after verification?)",
        )


def scan_archive(archive: ArchiveInput, limits: UnpackLimits = DEFAULT_LIMITS) -> None:
    """Stream an archive through the same parser and bounds as unpacking, writing nothing.

    The builder runs it on every payload it makes: a device inflates in the same steps, so the
    compression ratio at any point of the stream (not just overall) is what it will see.
    """
    with _open_source(archive) as src:
        inflater = _Inflater(src, archive.length, archive.label, limits)
        for header, stream in iter_members(inflater, archive.label, limits.max_depth):
            for _ in _data_chunks(stream, header.size, f"data of {header.name!r}"):
                pass
        inflater.finish()


def unpack_archives(
    archives: Sequence[ArchiveInput],
    dest: Path,
    *,
    limits: UnpackLimits = DEFAULT_LIMITS,
    extra_files: Mapping[str, bytes] | None = None,
    require_files: Iterable[str] = (),
) -> UnpackResult:
    """Extract `archives` (in order, into one tree) plus `extra_files` to the new directory `dest`.

    `dest` must not exist; its parent must. Names may not repeat across archives or collide with
    `extra_files`. `require_files` must exist as regular files in the result (e.g. the entry point).
    Raises BundleError with a specific code; on any failure nothing is left behind.
    """
    dest = Path(dest)
    if os.path.lexists(dest):
        raise _fail("dest_exists", f"{dest}: already exists; unpack only into a new directory")
    parent = dest.parent
    if not parent.is_dir():
        raise _fail("dest_exists", f"{parent}: parent directory does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=parent))
    tree: _Tree | None = None
    try:
        tree = _Tree(staging, limits)
        for archive in archives:
            _extract_one(tree, archive)
        for name, data in sorted((extra_files or {}).items()):
            checked = check_name(name, f"extra file {name!r}", max_depth=limits.max_depth)
            tree.add_file(checked, _FILE_MODE, len(data), [data], f"generated file {name!r}")
        for name in require_files:
            if tree.kinds.get(name) != "file":
                raise _fail("malformed_bundle", f"required file {name!r} is not in the payload")
        tree.sync_dirs()
        files, total = tree.files, tree.total
        dirs = sum(1 for k in tree.kinds.values() if k != "file") - 1
        tree.close()
        tree = None
        os.chmod(staging, _DIR_MODE)
        if os.path.lexists(dest):
            raise _fail("dest_exists", f"{dest}: appeared while unpacking")
        os.rename(staging, dest)
    except BaseException as exc:
        if tree is not None:
            tree.close()
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # disk full, permissions, a racing writer...
            raise _fail("io_error", f"{dest}: cannot unpack: {exc}") from exc
        raise
    fsync_dir(parent)
    return UnpackResult(path=dest, files=files, dirs=dirs, bytes=total)


def unpack_tar_gz(
    archive: Path | bytes, dest: Path, *, limits: UnpackLimits = DEFAULT_LIMITS
) -> UnpackResult:
    """Extract one .tar.gz (a file or bytes) into the new directory `dest`."""
    label = archive.name if isinstance(archive, Path) else "archive"
    return unpack_archives([ArchiveInput(label=label, source=archive)], dest, limits=limits)


def file_mode_for(st_mode: int) -> int:
    """The mode a payload file gets: 0o755 if any execute bit is set, else 0o644."""
    return _EXEC_MODE if stat.S_IMODE(st_mode) & 0o111 else _FILE_MODE


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove staging dirs a crash left in `parent` (names `.<dest>.unpack-*`); call at startup,
    when no unpack is running in `parent`. Returns what was removed."""
    removed = []
    for p in sorted(Path(parent).glob(".*.unpack-*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed

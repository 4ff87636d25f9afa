"""The strict POSIX ustar header parser under `runtimes.unpack` (pure: bytes in, values out).

We read only the subset of ustar our bundle builder writes: regular files and directories with
safe relative names and plain permission bits. Everything else is refused with a stable code
(`link_in_archive`, `special_file`, `unsafe_path`, `unsafe_mode`, `malformed_bundle`, `truncated`),
never stripped: a payload we built never has it, so its presence means the archive did not come
from our builder. `runtimes/unpack.py` says why we parse tar ourselves instead of using tarfile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runtimes.errors import BundleError

BLOCK = 512
# Path components a member name may have; bounds the directory fds the unpacker opens per entry.
DEFAULT_MAX_DEPTH = 32

# Refused typeflags and why; anything not listed here nor b"0"/b"\0"/b"5" is "unknown".
_LINK_TYPES = {b"1": "hard link", b"2": "symbolic link"}
_SPECIAL_TYPES = {b"3": "character device", b"4": "block device", b"6": "fifo"}
_EXTENSION_TYPES = {
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
    b"S": "GNU sparse file",
    b"7": "contiguous file",
}


@dataclass(frozen=True, slots=True)
class TarHeader:
    name: str  # normalised: relative, "/"-separated, no trailing slash
    kind: Literal["file", "dir"]
    mode: int  # permission bits only
    size: int


def refusal(code: str, message: str) -> BundleError:
    """The error for an archive we refuse, with one of the stable codes above."""
    return BundleError(message, code=code)


def _number(field: bytes, what: str, where: str) -> int:
    if field and field[0] & 0x80:
        # GNU base-256: only needed past 8 GiB, which no payload of ours reaches.
        raise refusal("malformed_bundle", f"{where}: base-256 number in {what} is not supported")
    text = field.lstrip(b" ")
    end = len(text)
    for i, ch in enumerate(text):
        if ch in (0, 0x20):
            end = i
            break
    digits, rest = text[:end], text[end:]
    if rest.strip(b"\0 "):
        raise refusal("malformed_bundle", f"{where}: bad {what} field {field!r}")
    if not digits:
        return 0
    if any(ch not in b"01234567" for ch in digits):
        raise refusal("malformed_bundle", f"{where}: bad {what} field {field!r}")
    return int(digits, 8)


def _text_field(field: bytes, what: str, where: str) -> bytes:
    """The bytes before the first NUL; refuses a NUL followed by more bytes (a smuggled name)."""
    head, _, tail = field.partition(b"\0")
    if tail.strip(b"\0"):
        shown = field.rstrip(b"\0")
        raise refusal("unsafe_path", f"{where}: {what} has bytes after a NUL: {shown!r}")
    return head


def check_name(name: str, where: str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> str:
    """Validate a member name and return it normalised (no trailing slash).

    Refuses absolute paths, empty, "." and ".." components, backslashes (a Windows separator some
    tools honour), control characters and NUL. Nothing is "cleaned up": a name either is plainly a
    relative path inside the tree or the archive is refused.
    """
    if name.endswith("/"):
        name = name[:-1]
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise refusal("unsafe_path", f"{where}: name is not valid UTF-8: {name!r}") from None
    if not name:
        raise refusal("unsafe_path", f"{where}: empty name")
    if name.startswith("/"):
        raise refusal("unsafe_path", f"{where}: absolute path {name!r}")
    for ch in name:
        if ch == "\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise refusal("unsafe_path", f"{where}: control character or backslash in {name!r}")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise refusal("unsafe_path", f"{where}: path component {part!r} in {name!r}")
        if len(part.encode("utf-8")) > 255:
            raise refusal("unsafe_path", f"{where}: path component too long in {name!r}")
    if len(parts) > max_depth:
        raise refusal("unsafe_path", f"{where}: {name!r} is nested deeper than {max_depth}")
    return name


def parse_header(
    block: bytes, where: str, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> TarHeader | None:
    """Parse one 512-byte POSIX ustar header; None for an all-zero (end-of-archive) block.

    Only regular files and directories pass. The checks run in an order that gives the most
    useful code: links and special files are named as such even if their names are also bad.
    """
    if len(block) != BLOCK:
        raise refusal("truncated", f"{where}: header cut short ({len(block)} of {BLOCK} bytes)")
    if block == bytes(BLOCK):
        return None
    stored = _number(block[148:156], "checksum", where)
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    # Some old tars summed signed chars; accept either, as tar(1) does.
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 0x80)
    if stored not in (unsigned, signed):
        raise refusal("malformed_bundle", f"{where}: not a tar header (checksum mismatch)")
    if block[257:265] != b"ustar\x0000":
        raise refusal("malformed_bundle", f"{where}: not a POSIX ustar header (GNU/v7 tar?)")
    raw_name = _text_field(block[0:100], "name", where)
    raw_prefix = _text_field(block[345:500], "prefix", where)
    joined = raw_prefix + b"/" + raw_name if raw_prefix else raw_name
    try:
        name = joined.decode("utf-8")
    except UnicodeDecodeError:
        raise refusal("unsafe_path", f"{where}: name is not UTF-8: {joined!r}") from None
    where = f"{where} {name!r}"
    typeflag = block[156:157]
    if typeflag in _LINK_TYPES:
        target = block[157:257].rstrip(b"\0").decode("utf-8", "replace")
        raise refusal(
            "link_in_archive", f"{where}: {_LINK_TYPES[typeflag]} to {target!r} is not allowed"
        )
    if typeflag in _SPECIAL_TYPES:
        raise refusal("special_file", f"{where}: {_SPECIAL_TYPES[typeflag]} is not allowed")
    if typeflag in _EXTENSION_TYPES:
        raise refusal(
            "malformed_bundle",
            f"{where}: {_EXTENSION_TYPES[typeflag]} is not supported (write plain ustar)",
        )
    if typeflag not in (b"0", b"\0", b"5"):
        raise refusal("special_file", f"{where}: unknown tar entry type {typeflag!r}")
    kind: Literal["file", "dir"] = "dir" if typeflag == b"5" else "file"
    if kind == "file" and name.endswith("/"):
        raise refusal("unsafe_path", f"{where}: file name ends with '/'")
    name = check_name(name, where, max_depth=max_depth)
    mode = _number(block[100:108], "mode", where) & 0o7777
    if mode & 0o7000:
        raise refusal(
            "unsafe_mode", f"{where}: setuid/setgid/sticky bits (mode {mode:04o}) are not allowed"
        )
    size = _number(block[124:136], "size", where)
    if kind == "dir" and size:
        raise refusal("malformed_bundle", f"{where}: directory entry with data")
    return TarHeader(name=name, kind=kind, mode=mode, size=size)


def padded(size: int) -> int:
    """Bytes a member's data occupies in the archive (rounded up to whole blocks)."""
    return (size + BLOCK - 1) // BLOCK * BLOCK

"""Writing the outer archive: ustar, manifest.json, manifest.sig, payload members sorted.

The one writer of bundle bytes: `build_bundle` writes new payloads with `write_outer`, and
re-signing (`edge-cloud fn sign`) copies an existing bundle's payload with `rewrite_signatures`.
Every header is normalised (mtime 0, owner 0, mode 0o644), so equal inputs give equal bytes.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from runtimes.bundle.layout import MANIFEST_MEMBER, SIGNATURE_MEMBER
from runtimes.bundle.reader import RawBundle


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write(
    out: Path, manifest_bytes: bytes, sig_bytes: bytes, payload: Iterator[tuple[str, int, BinaryIO]]
) -> None:
    """Write the archive to `out`, payload in the order given (callers sort it), then fsync."""
    with out.open("wb") as raw_out:
        with tarfile.open(fileobj=raw_out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in ((MANIFEST_MEMBER, manifest_bytes), (SIGNATURE_MEMBER, sig_bytes)):
                tar.addfile(_member_info(name, len(data)), BytesIO(data))
            for name, size, fh in payload:
                tar.addfile(_member_info(name, size), fh)  # reads exactly `size` bytes
        raw_out.flush()
        os.fsync(raw_out.fileno())


def write_outer(
    out: Path, manifest_bytes: bytes, sig_bytes: bytes, payload: Mapping[str, Path]
) -> None:
    """A new bundle at `out` with payload members read from files (member name -> path)."""

    def members() -> Iterator[tuple[str, int, BinaryIO]]:
        for name, path in sorted(payload.items()):
            with path.open("rb") as fh:
                yield name, os.fstat(fh.fileno()).st_size, fh

    _write(out, manifest_bytes, sig_bytes, members())


def rewrite_signatures(raw: RawBundle, out: Path, manifest_bytes: bytes, sig_bytes: bytes) -> Path:
    """`raw`'s payload, byte for byte, under a new manifest/signature; `out` replaced atomically.

    `out` may be `raw`'s own file: the new archive is written beside it and renamed over it.
    """
    out = Path(out).absolute()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with ExitStack() as stack:
            src = stack.enter_context(raw.open())

            def members() -> Iterator[tuple[str, int, BinaryIO]]:
                for name in sorted(raw.members):
                    m = raw.members[name]
                    src.seek(m.offset)
                    yield name, m.size, src

            _write(tmp, manifest_bytes, sig_bytes, members())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

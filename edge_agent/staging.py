"""`DATA_DIR/staging/`: what the installer keeps outside the function directories.

* `<name>.lock`: the per-function `flock` that serialises installs and rollbacks of a function;
* `<name>@<digest>.part`: a registry download, resumed by the next attempt if it was cut;
* `file-<rand>.efb`: the private copy of a bundle file being installed.

None of it is ever read by the agent; every entry can be deleted while no installer runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runtimes.errors import BundleError, RuntimeErrorBase

STAGING_DIR = "staging"
# How long a second install of the same function waits for the first one to finish.
LOCK_WAIT_S = 120.0


class InstallError(RuntimeErrorBase):
    """An install or rollback was refused or failed; `code` says why, nothing was changed."""

    code = "install_failed"
    status = 422


@contextlib.contextmanager
def function_lock(staging_dir: Path, name: str, tell: Callable[[str], None]) -> Iterator[None]:
    """Exclusive per-function lock; a second installer waits up to LOCK_WAIT_S."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    path = staging_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise InstallError(
                    f"another install or rollback of {name} is still running "
                    f"(lock {path} held for over {LOCK_WAIT_S:g} s)",
                    code="locked",
                )
            if not told:
                tell(f"waiting for another install of {name} to finish")
                told = True
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def remove_parts(staging_dir: Path, name: str) -> None:
    """Downloads of `name` that can no longer be useful (call with its lock held)."""
    for part in staging_dir.glob(f"{name}@*.part"):
        part.unlink(missing_ok=True)


def stage_local_file(
    src: Path, staging_dir: Path, max_bytes: int, copied_hook: Callable[[], None]
) -> tuple[Path, str]:
    """Copy a bundle file into staging (size-capped) and hash it; returns (copy, sha256).

    What is verified is this copy, so the file cannot change between verify and unpack.
    `copied_hook` runs once the copy is complete (the fault seam's "download" step).
    """
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(f"cannot read {src}: {exc.strerror}", code="bad_request") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InstallError(f"{src} is not a regular file", code="bad_request")
        if st.st_size > max_bytes:
            raise BundleError(
                f"{src} is {st.st_size} bytes, over this device's limit of {max_bytes} bytes",
                code="too_large",
            )
        staging_dir.mkdir(parents=True, exist_ok=True)
        dest = staging_dir / f"file-{secrets.token_hex(6)}.efb"
        h = hashlib.sha256()
        copied = 0
        try:
            with open(dest, "xb") as out:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise BundleError(
                            f"{src} grew past this device's limit of {max_bytes} "
                            "bytes while being read",
                            code="too_large",
                        )
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            copied_hook()
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    return dest, h.hexdigest()

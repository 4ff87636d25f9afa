"""`DATA_DIR/staging/`: what the installer keeps outside the function directories.

* `<name>.lock`: the per-function `flock` that serialises installs and rollbacks of a function;
* `<name>@<digest>.part`: a registry download, resumed by the next attempt if it was cut;
* `file-<rand>.efb`: the private copy of a bundle file being installed, `flock`ed by its
  installer for as long as it lives.

None of it is ever read by the agent; every entry can be deleted while no installer runs.
An interrupted install (kill -9, power cut) leaves its full copy behind: `sweep()`, run at every
install from a file and at agent start, deletes each copy whose lock nobody holds.
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


def _create_locked(staging_dir: Path) -> tuple[int, Path]:
    """A new, empty `file-<rand>.efb` that this process holds an exclusive flock on."""
    while True:
        dest = staging_dir / f"file-{secrets.token_hex(6)}.efb"
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A sweep may have taken the lock first (between our create and our flock) and
        # unlinked the file: then it is no longer in the directory; make another.
        if os.fstat(fd).st_nlink > 0:
            return fd, dest
        os.close(fd)


def sweep(staging_dir: Path) -> list[str]:
    """Delete bundle copies no install holds (left by interrupted installs); return their names."""
    removed: list[str] = []
    try:
        candidates = sorted(staging_dir.glob("file-*.efb"))
    except OSError:
        return removed
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its installer lives
        except OSError:
            os.close(fd)
            continue
        try:
            path.unlink(missing_ok=True)  # under the lock: see `_create_locked`
            removed.append(path.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def staged_copy(
    src: Path, staging_dir: Path, max_bytes: int, copied_hook: Callable[[], None]
) -> Iterator[tuple[Path, str]]:
    """Copy a bundle file into staging (size-capped) and hash it; yields (copy, sha256).

    What is verified is this copy, so the file cannot change between verify and unpack. The
    copy is locked while the `with` block runs (so `sweep` leaves it alone) and deleted after.
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
        out_fd, dest = _create_locked(staging_dir)
        h = hashlib.sha256()
        copied = 0
        try:
            with os.fdopen(out_fd, "wb", closefd=False) as out:
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
            yield dest, h.hexdigest()
        finally:
            dest.unlink(missing_ok=True)
            os.close(out_fd)  # releases the flock, after the unlink

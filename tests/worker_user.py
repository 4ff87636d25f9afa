"""The dedicated worker user the limit tests run workers as, created when missing.

RLIMIT_NPROC does not apply to root, and "nobody" is shared with other daemons, so the enforced
path (a dedicated user) is the one the tests exercise. Creating it is idempotent and tolerates
several test runs creating it at once (useradd locks /etc/passwd and fails while another holds
the lock).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time

from hardware.limits import DEFAULT_WORKER_USER

# useradd exit codes: 9 = the name is already in use (someone else won the race); 1 and 10 =
# cannot lock or update /etc/passwd or /etc/group (someone else holds the lock right now).
_TAKEN = 9
_LOCKED = (1, 10)
_ATTEMPTS = 20
_RETRY_S = 0.1


def ensure_worker_user(name: str = DEFAULT_WORKER_USER) -> tuple[int, int] | None:
    """(uid, gid) of the worker user, created with `useradd --system` if root and missing.

    None when not root (only root switches users) or useradd is not installed.
    """
    if os.geteuid() != 0:
        return None
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    for _ in range(_ATTEMPTS):  # bounded: 2 s of lock contention at most
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            pass
        if not os.access(useradd, os.X_OK):
            return None
        done = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode not in (0, _TAKEN, *_LOCKED):
            raise RuntimeError(f"useradd {name} failed ({done.returncode}): {done.stderr}")
        if done.returncode in _LOCKED:
            time.sleep(_RETRY_S)
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid

"""Setting a damaged file aside: the one way every edgefn store survives a broken file.

A device must keep serving when one of its files is garbage (a power cut on cheap flash, an
operator's mistake): the store renames the bad file to `<name>.corrupt-<UTC timestamp>` (with a
SQLite database's -wal/-shm beside it), keeps the newest `KEEP_SET_ASIDE` such copies for a
post-mortem, and starts afresh. Used by the result cache (`edge_agent.cache.files`), the outbox
(`cloud_sync.outbox`), the sync state (`cloud_sync.sync`), the function state
(`edge_agent.state_store`), the token store (`edge_agent.tokens`) and the trust store
(`edge_agent.trust`). It lives in `runtimes` because that is the lowest layer all of them may
import; nothing here knows what is in a file.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

# Newest set-aside copies kept; older ones are deleted (a failing disk would otherwise fill
# itself with copies).
KEEP_SET_ASIDE = 2
# Files a SQLite database may have beside it (SQLite's own naming).
SIDE_FILES = ("-wal", "-shm")
# The infix of a set-aside name; `<name>.corrupt-<stamp>`.
CORRUPT_INFIX = ".corrupt-"


def remove_orphans(path: Path) -> None:
    """Delete a -wal/-shm whose database is gone: left in place, SQLite would replay it into a
    new, empty database of the same name."""
    for suffix in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def set_aside(path: Path, keep: int = KEEP_SET_ASIDE) -> str:
    """Rename `path` (and its -wal/-shm) to `<name>.corrupt-<UTC stamp>`; return the new name.

    Works for directories too (a trust store). Raises OSError when the rename fails (then
    nothing moved).
    """
    path = Path(path)
    # UTC with microseconds: names sort in the order the copies were made (pruning relies on
    # it) and two rebuilds in one second do not collide.
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    base = f"{path}{CORRUPT_INFIX}{stamp}"
    n = 0
    while any(os.path.lexists(base + s) for s in ("", *SIDE_FILES)):
        n += 1
        base = f"{path}{CORRUPT_INFIX}{stamp}-{n}"
    os.replace(path, base)  # first: if this fails, nothing moved
    for suffix in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", base + suffix)
    prune_set_aside(path, keep)
    return os.path.basename(base)


def prune_set_aside(path: Path, keep: int = KEEP_SET_ASIDE) -> None:
    """Keep only the `keep` newest set-aside copies of `path`."""
    import shutil

    path = Path(path)
    prefix = f"{path.name}{CORRUPT_INFIX}"
    try:
        names = [p.name for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    bases = sorted({n.removesuffix("-wal").removesuffix("-shm") for n in names})
    for old in bases[:-keep] if keep else bases:
        for suffix in ("", *SIDE_FILES):
            victim = path.parent / (old + suffix)
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    victim.unlink()

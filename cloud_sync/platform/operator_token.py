"""One operator token for every replica: with a shared database, the token is agreed there.

Each replica loads or creates `<data_dir>/admin.token` as before (auth.py). With PostgreSQL the
first replica to start stores its token in `platform_secrets`; every later one finds it there,
uses it, and rewrites its own token file (0600, atomically) so local tools (`fn publish`,
`edge-cloud rollout`) read the token that the whole fleet accepts. Stored as the token itself,
not a hash: a replica must be able to write its file, and whoever can read this database can
change every device's desired state anyway. SQLite (one process, one data dir) skips all this.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cloud_sync.platform.sql import Engine, Migration
from runtimes.fsio import atomic_write

log = logging.getLogger("edgefn.platform")

_SCHEMA = "CREATE TABLE IF NOT EXISTS platform_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
MIGRATIONS = (Migration(1, "platform_secrets", _SCHEMA, _SCHEMA),)
_NAME = "operator_token"


def agree_operator_token(engine: Engine, local: str, token_file: Path) -> str:
    """The fleet's operator token: the database's if it has one, else `local`, stored there."""
    engine.migrate("platform_secrets", MIGRATIONS)
    engine.write(
        lambda c: c.execute(
            "INSERT INTO platform_secrets (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (_NAME, local),
        ),
        idempotent=True,
    )
    row = engine.read(
        lambda c: c.execute("SELECT value FROM platform_secrets WHERE name=?", (_NAME,)).fetchone()
    )
    shared = str(row[0])
    if shared != local:
        atomic_write(Path(token_file), (shared + "\n").encode("ascii"), 0o600)
        log.info("operator token: using the one shared through the database (%s)", token_file)
    return shared

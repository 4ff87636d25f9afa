"""pytest fixture `backend`: every platform store test runs on SQLite and on PostgreSQL.

Registered in the root conftest (`pytest_plugins`). A test that takes `backend` runs twice,
`[sqlite]` and `[postgresql]`; it asks `backend.engine("fleet.db")` for an engine to hand a store
(a fresh SQLite file in the test's temp dir, or a new pool on the test's own fresh PostgreSQL
database from `postgres_db`); asking again for the same name reaches the same data, as a
restarted platform (or a second replica) would. `backend.database_url` is what
`PlatformSettings.database_url` gets (None = SQLite in the data dir); `backend.dump(file)` is
every stored byte (the SQLite file, or `pg_dump` of the database) for "this is never stored"
checks. Engines left open by a test are closed after it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloud_sync.platform.sql import Engine, SqliteEngine
from tests.postgres import SUPERUSER, PostgresDatabase


@dataclass
class Backend:
    name: str  # "sqlite" | "postgresql"
    database_url: str | None
    tmp: Path
    pg: PostgresDatabase | None = None
    opened: list[Engine] = field(default_factory=list)

    def engine(self, filename: str = "store.db") -> Engine:
        engine: Engine
        if self.database_url is None:
            engine = SqliteEngine(self.tmp / filename, synchronous="NORMAL", name="test-sqlite")
        else:
            from cloud_sync.platform.sql.pg_engine import PgEngine

            engine = PgEngine(self.database_url)
        self.opened.append(engine)
        return engine

    def dump(self, sqlite_file: Path | str) -> bytes:
        """Every stored byte: the SQLite file itself, or the whole PostgreSQL database."""
        if self.pg is None:
            return Path(sqlite_file).read_bytes()
        server = self.pg.server
        done = subprocess.run(
            [str(server.bin_dir / "pg_dump"), "-h", "127.0.0.1", "-p", str(server.port),
             "-U", SUPERUSER, "--data-only", self.pg.name],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    pg: PostgresDatabase | None = None
    if request.param == "postgresql":
        pg = request.getfixturevalue("postgres_db")
    root = tmp_path / "backend"
    root.mkdir()
    made = Backend(str(request.param), pg.url if pg else None, root, pg)
    yield made
    for engine in made.opened:
        engine.close()

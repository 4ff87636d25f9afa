"""pytest fixture `backend`: every platform store test runs on SQLite and on PostgreSQL.

Registered in the root conftest (`pytest_plugins`). A test that takes `backend` runs twice,
`[sqlite]` and `[postgresql]`; it asks `backend.engine("fleet.db")` for an engine to hand a store
(a fresh SQLite file in the test's temp dir, or a new pool on the test's own fresh PostgreSQL
database from `postgres_db`); asking again for the same name reaches the same data, as a
restarted platform (or a second replica) would. `backend.database_url` is what
`PlatformSettings.database_url` gets (None = SQLite in the data dir). Engines left open by a
test are closed after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloud_sync.platform.sql import Engine, SqliteEngine


@dataclass
class Backend:
    name: str  # "sqlite" | "postgresql"
    database_url: str | None
    tmp: Path
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


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url: str | None = None
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_db").url
    root = tmp_path / "backend"
    root.mkdir()
    made = Backend(str(request.param), url, root)
    yield made
    for engine in made.opened:
        engine.close()

"""`edge-cloud serve --database`: a password in the URL is refused before anything starts, an
unreachable or missing database is a clear error with its own exit status, serve runs with no
store file in the data dir, and the password sources are the environment and a file (the test
server trusts loopback, so it cannot check a password itself)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync.platform.sql import DatabaseUnavailable, SqlError
from cloud_sync.platform.sql.pg_engine import password_from_env
from tests.postgres import PostgresDatabase
from tests.registry_helpers import start_platform


def _serve(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud_sync.platform.cli", "serve", "--data-dir",
         str(tmp_path / "plat"), "--port", "0", "--no-mqtt", *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_password_in_the_url_is_refused(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--database", "postgresql://edgefn:hunter22@127.0.0.1:5432/db")
    assert done.returncode == 2
    assert "(password_in_url)" in done.stderr and "hunter22" not in done.stderr
    query = _serve(tmp_path, "--database", "postgresql://edgefn@127.0.0.1/db?password=hunter22")
    assert query.returncode == 2 and "(password_in_url)" in query.stderr


def test_an_unreachable_database_is_exit_3_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = _serve(tmp_path, "--database", f"postgresql://edgefn@127.0.0.1:{port}/db")
    assert done.returncode == 3, done.stderr
    assert "(database_unavailable)" in done.stderr and "refused" in done.stderr.lower()


def test_a_missing_database_names_itself(postgres_db: PostgresDatabase, tmp_path: Path) -> None:
    url = postgres_db.server.url("no_such_db")
    done = _serve(tmp_path, "--database", url)
    assert done.returncode == 3 and '"no_such_db" does not exist' in done.stderr


def test_serve_on_postgresql_starts_and_says_nothing_of_sqlite(
    postgres_db: PostgresDatabase, tmp_path: Path
) -> None:
    plat = start_platform(tmp_path / "plat", "--no-mqtt", "--database", postgres_db.url)
    try:
        assert plat.token
    finally:
        code = plat.stop()
        assert code == 0, plat.log_text()[-6000:]
    # The state is in PostgreSQL: no store file was made in the data dir.
    assert not list((tmp_path / "plat").glob("*.db"))


def test_password_sources() -> None:
    assert password_from_env({}) is None  # libpq's own PGPASSWORD / PGPASSFILE apply
    assert password_from_env({"EDGEFN_DATABASE_PASSWORD": "pw"}) == "pw"


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert password_from_env({"EDGEFN_DATABASE_PASSWORD_FILE": str(secret)}) == "s3cret"
    missing = {"EDGEFN_DATABASE_PASSWORD_FILE": str(tmp_path / "nope")}
    with pytest.raises(SqlError) as refused:
        password_from_env(missing)
    assert refused.value.code == "database_password"
    assert not isinstance(refused.value, DatabaseUnavailable)  # config, not an outage

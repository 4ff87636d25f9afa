"""pytest fixtures: one real PostgreSQL server per test run, on loopback, as an unprivileged user.

Register with `pytest_plugins = ["tests.postgres"]` (the root conftest does). Fixtures:

* `postgres_server` (session) -- a running server: `initdb` into a private temp dir, `pg_ctl` as the
  dedicated user (PostgreSQL refuses to run as root), listening on 127.0.0.1 on a free port and
  on a Unix socket in its own directory. `.stop()`, `.start()` and `.restart()` for outage tests.
* `postgres_db` (function) -- a fresh empty database on that server; its URL is `.url`
  (`postgresql://edgefn@127.0.0.1:PORT/NAME`). Dropped after the test.

The server is Debian's `postgresql` package (the Makefile installs it); its binaries live under
`/usr/lib/postgresql/<major>/bin`, which is not on PATH. PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.worker_user import ensure_worker_user

PG_ROOT = Path("/usr/lib/postgresql")
START_TIMEOUT_S = 30.0
SUPERUSER = "edgefn"
PG_USER = "edgefn-pg"  # the OS user the server runs as (not root, not shared with daemons)


def pg_bin_dir() -> Path | None:
    """The newest installed server's bin directory, or None when PostgreSQL is not installed."""
    if not PG_ROOT.is_dir():
        return None
    majors = sorted(
        (p for p in PG_ROOT.iterdir() if (p / "bin" / "initdb").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    return majors[-1] / "bin" if majors else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    port: int
    log: Path
    user: str | None  # OS user to run as (None when the tests are not root)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} -c fsync=off"
        done = self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log),
            "-o",
            opts,
            "-w",
            "-t",
            str(int(START_TIMEOUT_S)),
            "start",
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}{self.log.read_text()[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout


def _make_server(root: Path) -> PostgresServer:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server is not installed (apt-get install -y postgresql)")
    user: str | None = None
    if os.geteuid() == 0:
        ids = ensure_worker_user(PG_USER)
        if ids is None:
            pytest.skip("cannot create the PostgreSQL OS user (useradd missing)")
        user = PG_USER
    data_dir, socket_dir = root / "data", root / "sock"
    for d in (root, socket_dir):
        d.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    log.touch()
    if user is not None:
        entry = pwd.getpwnam(user)
        for p in (root, socket_dir, log):
            os.chown(p, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bin_dir, data_dir, socket_dir, _free_port(), log, user)
    done = server._run(
        str(bin_dir / "initdb"),
        "-D",
        str(data_dir),
        "-U",
        SUPERUSER,
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-instructions",
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stderr}")
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    # Not under pytest's temp dir: /tmp/pytest-of-root is 0700, and the server's user cannot walk
    # into it. A private directory of its own under the system temp dir (1777) can be chowned.
    del tmp_path_factory
    root = Path(tempfile.mkdtemp(prefix="edgefn-pg-"))
    server = _make_server(root)
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PostgresDatabase:
    server: PostgresServer
    name: str

    @property
    def url(self) -> str:
        return self.server.url(self.name)


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    name = "t_" + uuid.uuid4().hex[:12]
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # bounded: a test before this one may have restarted the server
        try:
            postgres_server.psql(f"CREATE DATABASE {name}")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield PostgresDatabase(postgres_server, name)
    # A test that left the server stopped: the session fixture removes everything.
    with contextlib.suppress(RuntimeError):
        postgres_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

"""pytest fixtures: one S3-compatible server per test run on loopback (moto's server mode).

Register with `pytest_plugins = ["tests.s3server"]` (the root conftest does). Fixtures:

* `s3_server` (session) -- `moto_server` as a subprocess on 127.0.0.1 and a free port, so a
  test can `kill()` it (SIGKILL, the store "unreachable") and `start()` it again on the same
  port. moto keeps objects in memory: a restarted server is empty, and a test that needs the
  objects back puts them again (a real store would still have them).
* `s3_bucket` (function) -- a fresh bucket on that server; `.url` is the `--blobs` URL.

Credentials: moto accepts any; the fixture sets dummy AWS_* variables in this process's
environment (inherited by platform subprocesses), the way a deployment sets real ones.
PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# moto imports a great deal at start: seconds on an idle machine, more on two busy cores.
START_TIMEOUT_S = 90.0
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "edgefn-test",
    "AWS_SECRET_ACCESS_KEY": "edgefn-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        moto = Path(sys.executable).with_name("moto_server")
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited {self.proc.returncode}: {self._tail()}")
            # Plain HTTP, not boto: building a client per poll costs more than the poll.
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.endpoint + "/", timeout=2) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"moto_server did not answer in {START_TIMEOUT_S} s: {self._tail()}")

    def kill(self) -> None:
        """SIGKILL: connections drop mid-transfer, new ones are refused."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@dataclass(frozen=True)
class S3Bucket:
    server: S3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}?endpoint={self.server.endpoint}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = S3Server(_free_port(), tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    if not s3_server.running():  # a test that killed it and failed before restarting it
        s3_server.start()
    name = f"edgefn-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return S3Bucket(s3_server, name)

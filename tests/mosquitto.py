"""pytest fixtures: a real Mosquitto with mutual TLS, the edgefn ACL and a CRL, on loopback.

Register with `pytest_plugins = ["tests.mosquitto"]`. Fixtures:

* `mosquitto` -- a running broker (no persistence), stopped after the test.
* `mosquitto_factory(persistence=False, autosave_on_changes=False)` -- more brokers or other
  options; every broker made is stopped after the test.

The `Broker` object can `stop()` (SIGTERM, SIGKILL after `STOP_GRACE_S`), `kill()` (SIGKILL, a
crash), `start()` again on the same port (outage tests), `reload()` (SIGHUP: re-reads the CRL),
issue `device_credentials(device_id)` / `platform_credentials()`, and `revoke(creds)`. Everything
lives under pytest's tmp dir. Readiness = the ` running` line on stderr plus a live process (the
port can accept a connection from a broker that is about to exit on a bad key file).

Helpers for MQTT tests: `platform_session(broker, *filters)` (a session with the platform's
identity), `Collector(session)` (consumes and acks inbound messages in the background) and
`eventually(check, within_s)` (a bounded poll).

Test modules import helpers from here *and* list it in `pytest_plugins`; the marker below stops
pytest from warning that it was imported before it could rewrite its asserts: PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from cloud_sync.credentials import DeviceCredentials
from cloud_sync.mqtt import InboundMessage, MqttSession
from cloud_sync.platform.broker_config import BrokerFiles, write_broker_files
from cloud_sync.platform.pki import PLATFORM_IDENTITY, PlatformCA

MOSQUITTO = Path("/usr/sbin/mosquitto")
START_TIMEOUT_S = 10.0  # it is ready in ~10 ms; the margin is for a loaded CI machine
STOP_GRACE_S = 2.0  # right after start Mosquitto sometimes ignores the first SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> Path:
    found = MOSQUITTO if MOSQUITTO.exists() else shutil.which("mosquitto")
    if not found:
        pytest.fail("Mosquitto is not installed: apt-get install -y mosquitto", pytrace=False)
    return Path(found)


class Broker:
    """One Mosquitto process (restartable on the same port) plus the CA that feeds it."""

    def __init__(
        self, workdir: Path, *, persistence: bool = False, autosave_on_changes: bool = False
    ) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.ca = PlatformCA.load_or_create(workdir / "platform")
        self.files: BrokerFiles = write_broker_files(
            self.ca,
            workdir / "broker",
            port=self.port,
            persistence=persistence,
            autosave_on_changes=autosave_on_changes,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        self._running = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive:
            raise RuntimeError("broker already running")
        self._running.clear()
        self.proc = subprocess.Popen(
            [str(mosquitto_path()), "-c", str(self.files.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._pump, args=(self.proc,), daemon=True)
        self._reader.start()
        ok = self._running.wait(START_TIMEOUT_S)
        if not ok or not self.alive:
            self._terminate()
            raise RuntimeError("Mosquitto did not start:\n" + "\n".join(self.log[-30:]))
        # Ready means accepting connections, too (the listener opens before " running").
        with socket.create_connection((self.host, self.port), timeout=START_TIMEOUT_S):
            pass

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if " running" in line:
                self._running.set()

    def stop(self) -> None:
        """Graceful: SIGTERM, then SIGKILL after STOP_GRACE_S."""
        self._terminate()

    def kill(self) -> None:
        """A crash: SIGKILL, nothing saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self._reap()

    def restart(self, *, crash: bool = False) -> None:
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto reloads its config, certificates and CRL; returns once it has.

        Mosquitto logs "Reloading config." and reloads on its single thread before handling any
        new connection, so a client that connects after that line meets the new CRL.
        """
        if self.proc is None or not self.alive:
            return
        before = sum("Reloading config" in line for line in self.log)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT_S
        while sum("Reloading config" in line for line in self.log) == before:
            if time.monotonic() > deadline or not self.alive:
                raise RuntimeError("Mosquitto did not reload:\n" + "\n".join(self.log[-30:]))
            time.sleep(0.01)

    def _terminate(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_GRACE_S)
        # The reader first: closing stderr under a reader still draining it raised in its
        # thread ("I/O operation on closed file"), which pytest turns into an error.
        if self._reader is not None:
            self._reader.join(STOP_GRACE_S)
            self._reader = None
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    # ---- identities ------------------------------------------------------------------------

    def device_credentials(self, device_id: str, ca: PlatformCA | None = None) -> DeviceCredentials:
        """Credentials as enrolment would hand them out (`ca` to sign with a foreign CA)."""
        issued = (ca or self.ca).issue_device_cert(device_id)
        return DeviceCredentials(
            device_id=device_id,
            platform_url="https://127.0.0.1:1",
            broker_url=self.url,
            ca_pem=self.ca.cert_pem,
            cert_pem=issued.cert_pem,
            key_pem=issued.key_pem,
        )

    def platform_credentials(self) -> DeviceCredentials:
        issued = self.ca.issue_client_cert(PLATFORM_IDENTITY)
        return DeviceCredentials(
            device_id=PLATFORM_IDENTITY,
            platform_url="https://127.0.0.1:1",
            broker_url=self.url,
            ca_pem=self.ca.cert_pem,
            cert_pem=issued.cert_pem,
            key_pem=issued.key_pem,
        )

    def revoke(self, creds: DeviceCredentials) -> None:
        """Revoke and hand the new CRL to the broker (SIGHUP if running)."""
        self.ca.revoke(creds.cert_pem, reason="test")
        self.files.refresh_crl(self.ca)
        self.reload()


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Broker]]:
    brokers: list[Broker] = []

    def make(*, persistence: bool = False, autosave_on_changes: bool = False) -> Broker:
        # Short tmp path: Mosquitto config lines must not contain whitespace (pytest's are fine).
        broker = Broker(
            tmp_path_factory.mktemp("mosquitto"),
            persistence=persistence,
            autosave_on_changes=autosave_on_changes,
        )
        brokers.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Broker]) -> Broker:
    return mosquitto_factory()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], within_s: float = 30.0, what: str = ""
) -> None:
    """Poll `check` (sync or async) until true; fail after `within_s` (a bound, not a timing
    assertion)."""
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting {within_s} s for {what or check}")
        await asyncio.sleep(0.02)


class Collector:
    """Consumes a session's inbound queue in the background, acking everything it stores."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self.messages: list[InboundMessage] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.session.messages.get()
            self.messages.append(msg)
            await msg.ack()

    def keys(self, kind: str | None = None) -> list[str]:
        return [m.key for m in self.messages if m.key and (kind is None or m.kind == kind)]

    def on(self, topic: str) -> list[InboundMessage]:
        return [m for m in self.messages if m.topic == topic]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def platform_session(
    broker: Broker, *filters: str, client_id: str = PLATFORM_IDENTITY
) -> MqttSession:
    """A platform-side session (full ACL) subscribed to `filters`."""
    creds = broker.platform_credentials()
    return MqttSession(
        client_id, broker.host, broker.port, ssl_context=creds.ssl_context(), subscriptions=filters
    )

"""The platform's HTTP server: builds its parts once, then start -> serve -> staged shutdown.

`create_app(settings)` is the one place the platform is assembled: it opens the store, loads (or
creates) the operator token, picks a verifier when publisher keys are configured, and mounts the
registry routes, cloud execution, the device routes (`devices.py`: enrolment, config, metrics,
the agents' HTTP fallback) plus `/v1/health`. With `settings.broker` set it also starts, on app
startup, the embedded amqtt broker (`embedded_broker.py`) when asked for and the MQTT intake
(`intake.py`), and stops them on cleanup. The rollout controller (`rollouts.py`, its API
`/v1/rollouts` in `rollout_api.py`) starts after them and stops on shutdown. The TUF
repository's routes `/v1/tuf/` and its timestamp re-signing task (`tuf/`) are always mounted.
`serve(settings)` runs it: listen (port 0 picks a free port; HTTPS with `settings.tls`), write
`<data_dir>/platform.json` ({"url", "pid"}) atomically once listening so scripts and tests
find the URL, wait for SIGTERM/SIGINT, stop accepting, let in-flight requests finish for up to
`drain_s`, close the store, remove the state file.
State lives in SQLite files in the data dir, or with `settings.database_url` in PostgreSQL
(`sql.Databases`: one pool shared by every store, closed after them; the operator token is agreed
through the database, `operator_token.py`).
Several replicas: `settings.lease` elects one leader (`leader.py`); the rollout loop and the
intake's full republish are its duties (`LeaderDuties`), started when this replica leads and
stopped when it stops leading. `/v1/health` says `leader` and `replica`; `GET /v1/replica`
(operator) adds the lease's and the intake's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from cloud_sync.http_server import bound_port, escaped_error_answer
from cloud_sync.platform.auth import AuthResult, check_bearer, load_or_create_token
from cloud_sync.platform.blobs import open_blob_store
from cloud_sync.platform.cloud_exec import CloudExec
from cloud_sync.platform.device_auth import DeviceAuth
from cloud_sync.platform.devices import DevicesApi
from cloud_sync.platform.director import Director
from cloud_sync.platform.embedded_broker import EmbeddedBroker, free_port, start_embedded_broker
from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.intake import MqttIntake
from cloud_sync.platform.leader import LeaderDuties, Lease, LocalLease, PgAdvisoryLease
from cloud_sync.platform.operator_token import agree_operator_token
from cloud_sync.platform.operators import OperatorAccounts
from cloud_sync.platform.pki import PLATFORM_IDENTITY, PlatformCA
from cloud_sync.platform.registry import Handler, Registry, error_response, publishers_verifier
from cloud_sync.platform.rollout_api import RolloutApi
from cloud_sync.platform.rollout_feed import RecordFeed
from cloud_sync.platform.rollout_source import ControllerSource
from cloud_sync.platform.rollout_store import RolloutStore
from cloud_sync.platform.rollouts import RolloutController
from cloud_sync.platform.secrets_api import mount_secrets
from cloud_sync.platform.settings import PlatformSettings
from cloud_sync.platform.shutdown_watch import (
    GRACE_S,
    Watchdog,
    register_stack_dump_signal,
    time_shutdown_steps,
)
from cloud_sync.platform.sql import Databases, Engine, is_postgres_url
from cloud_sync.platform.store import LocalStore, RegistryStore
from cloud_sync.platform.tuf.repository import TufRepository
from cloud_sync.platform.tuf.routes import TufRoutes
from cloud_sync.platform.ui import mount as mount_console
from runtimes import tasks
from runtimes.fsio import atomic_write

log = logging.getLogger("edgefn.platform")

STORE_KEY = web.AppKey("store", LocalStore)
DEVICES_KEY = web.AppKey("devices", DevicesApi)
LEASE_KEY = web.AppKey("lease", LeaderDuties)


def _lease(settings: PlatformSettings) -> Lease:
    """The leader election: on the platform's PostgreSQL unless `--lease` names another;
    with SQLite state there is one process, always the leader."""
    url = settings.lease
    if not url and settings.database_url and is_postgres_url(settings.database_url):
        url = settings.database_url
    if url:
        return PgAdvisoryLease(url, name=settings.replica_id)
    return LocalLease()


def create_app(
    settings: PlatformSettings, *, store_factory: Callable[[], RegistryStore] | None = None
) -> web.Application:
    """The platform application, with everything it needs built and passed in."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    databases = Databases(settings.database_url, settings.data_dir)
    shared = databases.borrowed()  # None: SQLite files; raises when PostgreSQL is unreachable
    token = load_or_create_token(settings.token_file)
    if shared is not None:
        token = agree_operator_token(shared, token, settings.token_file)
    store = (
        store_factory()
        if store_factory is not None
        else LocalStore(
            settings.db_path,
            settings.blobs_dir,
            engine=shared,
            blobs=open_blob_store(
                settings.blobs_url, settings.blobs_dir, spool_dir=settings.blobs_dir / "uploads"
            ),
        )
    )
    verifier = publishers_verifier(settings.publishers_dir)
    tuf = TufRepository(settings.data_dir, timestamp_expiry_s=settings.tuf_timestamp_expiry_s)
    registry = Registry(
        store, token, max_bundle_bytes=settings.max_bundle_bytes, verifier=verifier, tuf=tuf
    )
    # aiohttp refuses bodies over client_max_size; the registry enforces its own cap (413).
    app = web.Application(client_max_size=settings.max_bundle_bytes + 1, middlewares=[json_errors])
    duties = LeaderDuties(_lease(settings))
    app[LEASE_KEY] = duties
    app.add_routes(registry.routes())
    _mount_tuf(app, tuf, store, registry)
    director = _build_director(settings, store, shared)
    devices = _build_devices(settings, token, app, shared, tuf, director, duties)
    app.middlewares.append(devices.auth.middleware)
    app[DEVICES_KEY] = devices
    app.add_routes(devices.routes())
    # /v1/secrets, /v1/devices/{id}/secrets; the secrets key stays a file in the data dir
    mount_secrets(app, settings.data_dir, devices, engine=shared)
    # Cloud execution: the operator or any enrolled device (token or client certificate).
    cloud_exec = CloudExec(
        store, settings.data_dir / "exec", authorize=devices.auth.result, verifier=verifier
    )
    app.add_routes(cloud_exec.routes())
    rollout_source = _mount_rollouts(app, settings, token, store, devices, shared, duties)
    started = time.time()

    async def health(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "uptime_s": round(time.time() - started, 3),
                "pid": os.getpid(),
                "replica": settings.replica_id,
                "leader": duties.lease.is_leader,
            }
        )

    async def replica(request: web.Request) -> web.Response:
        if check_bearer(request.headers.get("Authorization"), token) is not AuthResult.OK:
            return error_response(401, "unauthorized", "operator token required")
        intake = devices.intake
        return web.json_response(
            {
                "replica": settings.replica_id,
                "pid": os.getpid(),
                "lease": duties.lease.status(),
                "mqtt": intake.status() if intake is not None else None,
            }
        )

    app.add_routes([web.get("/v1/health", health), web.get("/v1/replica", replica)])

    async def lead(app: web.Application) -> None:
        await duties.start()

    async def step_down(app: web.Application) -> None:
        await duties.close()

    # After the intake and the controller are set up (on_startup order); first on shutdown.
    app.on_startup.append(lead)
    app.on_shutdown.insert(0, step_down)
    # The console (/ui/, docs/dashboard.md): pages over the same stores; its rollout pages read
    # and command the rollout controller (`rollout_source.py`).
    accounts = OperatorAccounts(shared or settings.db_path)
    mount_console(
        app,
        token=token,
        fleet=devices.store,
        registry=store,
        accounts=accounts,
        rollout_source=rollout_source,
    )

    async def close_store(app: web.Application) -> None:
        await cloud_exec.close()
        await asyncio.to_thread(store.close)

    app.on_cleanup.append(close_store)

    async def close_databases(app: web.Application) -> None:
        await asyncio.to_thread(accounts.close)
        await asyncio.to_thread(databases.close)  # last: after every store that borrowed it

    app.on_cleanup.append(close_databases)
    if verifier is None:
        log.info(
            "no publisher keys in %s: any validly signed bundle may be published",
            settings.publishers_dir,
        )
    return app


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as the JSON error body with a stable code, never aiohttp's plain text.

    Handlers answer the errors they expect themselves; this catches what escapes them (an edgefn
    error keeps its code and its status where it has one) and aiohttp's own refusals (no route,
    wrong method). The agent avoids a middleware on its hot path; the platform's requests are few
    and heavy, so the per-request cost does not matter here.
    """
    try:
        return await handler(request)
    except Exception as exc:
        where = f"{request.method} {request.path}"
        answer = escaped_error_answer(exc, server="platform", log=log, where=where)
        if answer is None:
            raise
        return error_response(*answer)


def _mount_rollouts(
    app: web.Application,
    settings: PlatformSettings,
    token: str,
    store: RegistryStore,
    devices: DevicesApi,
    shared: Engine | None,
    duties: LeaderDuties,
) -> ControllerSource:
    """The rollout controller (`rollouts.py`), its `/v1/rollouts` API and the console's view of
    it. Its loop is a leader duty (it runs on one replica of the fleet); operator calls work on
    every replica. Closed on shutdown, before the stores close."""
    controller = RolloutController(
        RolloutStore(shared or settings.data_dir / "rollouts.db"),
        devices.store,
        store,
        RecordFeed(devices.store.engine),
        devices.intake,
        lease=duties.lease,
    )
    app.add_routes(RolloutApi(controller, token).routes())
    source = ControllerSource(controller)
    duties.add("rollout controller", controller.start, controller.stop)

    async def start(app: web.Application) -> None:
        source.bind(asyncio.get_running_loop())

    async def stop(app: web.Application) -> None:
        await controller.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return source


def _mount_tuf(
    app: web.Application, tuf: TufRepository, store: RegistryStore, registry: Registry
) -> None:
    """`/v1/tuf/` (cloud_sync/platform/tuf/routes.py) and the task that keeps the timestamp
    fresh; both find out per call whether `edge-cloud tuf init` has been run."""
    app.add_routes(TufRoutes(tuf, store, registry.serve_blob).routes())
    running: list[asyncio.Task[None]] = []

    async def start(app: web.Application) -> None:
        running.append(asyncio.create_task(tuf.run_resigner(), name="tuf resigner"))

    async def stop(app: web.Application) -> None:
        await tasks.stop(*running)

    app.on_startup.append(start)
    app.on_shutdown.append(stop)


def _build_director(
    settings: PlatformSettings, store: RegistryStore, shared: Engine | None
) -> Director:
    """The director (`director.py`): its key is created at first start; it names bundle
    digests from the registry store; its counters are in the shared database when there is
    one. Closed on cleanup, after the intake stopped."""

    def digest(name: str, version: str) -> str | None:
        record = store.get_version(name, version)
        return record.digest if record is not None else None

    return Director(settings.data_dir, digest, ttl_s=settings.director_ttl_s, engine=shared)


def _build_devices(
    settings: PlatformSettings,
    token: str,
    app: web.Application,
    shared: Engine | None,
    tuf: TufRepository,
    director: Director,
    duties: LeaderDuties,
) -> DevicesApi:
    """Fleet store, CA, device auth and (with a broker) the MQTT intake. Blocking (CA, SQLite)."""
    ca = PlatformCA.load_or_create(settings.data_dir)
    fleet = FleetStore(shared or settings.fleet_db)
    auth = DeviceAuth(token, fleet)
    intake: MqttIntake | None = None
    embedded_port: int | None = None
    broker_url = settings.broker
    if broker_url == "embedded":
        embedded_port = settings.mqtt_port or free_port()
        broker_url = f"mqtts://127.0.0.1:{embedded_port}"
    if broker_url:
        client_id = PLATFORM_IDENTITY
        if settings.replica_id:
            client_id = f"{PLATFORM_IDENTITY}-{settings.replica_id}"
        intake = MqttIntake(
            fleet,
            ca,
            broker_url,
            mqtt311=embedded_port is not None,
            shared=settings.shares_device_traffic and embedded_port is None,
            client_id=client_id,
            is_leader=lambda: duties.lease.is_leader,
            director=director,
        )
        duties.add("desired republisher", intake.take_over, _nothing)
    devices = DevicesApi(
        fleet,
        ca,
        auth,
        intake,
        device_broker_url=settings.device_broker_url or broker_url or "mqtts://127.0.0.1:8883",
        public_url=settings.public_url,
        tuf_root=tuf.root_json,
        director=director,
    )
    holder: list[EmbeddedBroker] = []

    async def start_mqtt(app: web.Application) -> None:
        if embedded_port is not None:
            holder.append(
                await start_embedded_broker(ca, settings.data_dir / "broker", embedded_port)
            )
        if intake is not None:
            await intake.start()

    async def stop_mqtt(app: web.Application) -> None:
        if intake is not None:
            await intake.close()
        for broker in holder:
            await broker.close()
        await asyncio.to_thread(fleet.close)
        await asyncio.to_thread(director.close)

    app.on_startup.append(start_mqtt)
    app.on_cleanup.append(stop_mqtt)
    return devices


async def _nothing() -> None:
    return None


def _server_ssl(settings: PlatformSettings) -> ssl.SSLContext:
    """HTTPS with a server certificate from the platform CA. Device client certificates are
    optional and verified when presented: `DeviceAuth` takes a verified CN as the identity."""
    ca = PlatformCA.load_or_create(settings.data_dir)
    directory = settings.data_dir / "https"
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None or key is None:  # default: a server certificate from the platform CA
        issued = ca.issue_server_cert()
        directory.mkdir(exist_ok=True, mode=0o700)
        cert, key = directory / "server.crt", directory / "server.key"
        atomic_write(cert, issued.cert_pem.encode(), 0o644)
        atomic_write(key, issued.key_pem.encode(), 0o600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=str(ca.cert_path))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


async def serve(settings: PlatformSettings) -> None:
    """Run the platform until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    register_stack_dump_signal()
    app = await asyncio.to_thread(create_app, settings)
    time_shutdown_steps(app)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=settings.drain_s,
        access_log=logging.getLogger("edgefn.access") if settings.access_log else None,
    )
    await runner.setup()
    ssl_context = await asyncio.to_thread(_server_ssl, settings) if settings.tls else None
    site = web.TCPSite(
        runner, settings.host, settings.port, reuse_address=True, ssl_context=ssl_context
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from exc
    port = bound_port(runner) or settings.port
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
    state = {"url": url, "pid": os.getpid()}
    await asyncio.to_thread(atomic_write, settings.state_file, json.dumps(state).encode())
    log.info("devices get broker %s", app[DEVICES_KEY].device_broker_url)
    print(f"edge-cloud listening on {url} (data dir {settings.data_dir})", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests (up to %g s)", settings.drain_s)
        watchdog = Watchdog(settings.drain_s + GRACE_S, loop).start()
        try:
            await runner.cleanup()
        finally:
            watchdog.stop()
        with contextlib.suppress(FileNotFoundError):
            settings.state_file.unlink()
        log.info("stopped")

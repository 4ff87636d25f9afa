"""The agent: builds every part in one place (`edge_agent.assembly`), then start -> serve ->
staged shutdown.

Nothing is a module-level singleton; `Agent` owns the function set, router, metrics, HTTP
site and (with `--credentials`) the platform sync client, and tears them down in reverse order on
SIGTERM/SIGINT: stop accepting connections, let in-flight invocations finish (up to `drain_s`),
stop syncing, stop the pools, remove the state file.

Sync (cloud_sync.sync) gets callbacks, never the agent: a metrics snapshot, pool sizes, a
description for the reported document, and `_apply_config`, which applies desired config live:
routing overrides (`Router.overrides`), log level, and pool sizes (re-applied after every
function scan, so a newly loaded version gets them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cloud_sync.cloud_invoke import CloudInvoker
from cloud_sync.http_server import bound_port
from edge_agent import agent_view
from edge_agent.assembly import Parts, assemble, build_sandbox, prepare_data_dir
from edge_agent.auth import Authenticator
from edge_agent.capabilities import Event
from edge_agent.config_notify import notify_config_changes
from edge_agent.discovery import Advertiser, agent_txt
from edge_agent.errors import StartupError
from edge_agent.functions import FunctionSet
from edge_agent.listener import LimitedAppRunner, ListenerLimits
from edge_agent.metrics import Metrics
from edge_agent.router import Router
from edge_agent.routing import check_policy
from edge_agent.sdnotify import Lifecycle
from edge_agent.settings import Settings
from edge_agent.state_store import StateStore
from edge_agent.tls import server_context
from runtimes.fsio import atomic_write
from runtimes.sandbox import Sandbox

if TYPE_CHECKING:  # imported when a device joins a platform: paho and cryptography cost RSS
    from cloud_sync.credentials import DeviceCredentials
    from cloud_sync.director_check import DirectorGate
    from cloud_sync.secrets_sync import SecretsSync
    from cloud_sync.state import AgentConfig
    from cloud_sync.sync import FunctionCounters, SyncClient
    from edge_agent.deployer import Deployer
    from edge_agent.deployer_health import HealthSample
    from edge_agent.secret_store import SecretStore
    from edge_agent.update_security import UpdatePolicy

log = logging.getLogger("edgefn.agent")


class Agent:
    """The lifecycle: device configuration at construction (cheap, no I/O beyond reading the
    credentials), the serving parts in `open()` (stores and device detection: blocking work,
    done off the loop), then serve -> staged shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        check_policy(settings.default_routing, "--default-routing")  # refuse before any I/O
        self.metrics = Metrics()
        self.creds: DeviceCredentials | None = None
        self._director: DirectorGate | None = None
        self._extras: dict[str, Any] = {}
        cloud_url, token, ssl_ctx = settings.cloud_url, settings.cloud_token, None
        if settings.credentials_file is not None:
            from cloud_sync import credentials
            from cloud_sync.director_check import director_gate
            from cloud_sync.errors import CredentialsError

            try:
                self.creds = credentials.load(settings.credentials_file)
                self._extras = credentials.load_credentials_extras(settings.credentials_file)
                # Checks every desired document (update_security, docs/update-security.md).
                self._director = director_gate(
                    self.creds.device_id,
                    str(self._extras.get("director_key") or ""),
                    settings.data_dir,
                    required=settings.update_security == "tuf",
                    groups=tuple(self._extras.get("groups") or ()),
                )
            except CredentialsError as exc:
                raise StartupError(exc.message) from exc
            cloud_url = cloud_url or self.creds.platform_url
            token = token or str(self._extras.get("token") or "")
            if cloud_url.startswith("https:"):
                ssl_ctx = self.creds.ssl_context()
        self.cloud_url = cloud_url
        self.cloud_fallback_urls = settings.cloud_fallback_urls
        self.cloud = (
            CloudInvoker(
                cloud_url, token=token, ssl=ssl_ctx, fallback_urls=self.cloud_fallback_urls
            )
            if cloud_url
            else None
        )
        self.sync: SyncClient | None = None
        self.deployer: Deployer | None = None  # with --credentials: desired versions
        self.secrets: SecretStore | None = None  # with --credentials: the device's secrets
        self.secrets_sync: SecretsSync | None = None
        self._desired: AgentConfig | None = None
        self._profile: dict[str, Any] = {}
        self._parts: Parts | None = None
        # Local API security (edge_agent.auth); None: no checking, the loopback default.
        self.auth = (
            Authenticator(
                settings.tokens_file,
                token_concurrency=settings.token_concurrency,
                mode=settings.auth,
            )
            if settings.auth in ("token", "mtls")
            else None
        )
        self.started_at = time.time()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._scanner: asyncio.Task[None] | None = None
        self._stopping = False
        self.lifecycle = Lifecycle()  # systemd READY=1 / WATCHDOG=1 (edge_agent.sdnotify)
        # zeroconf advertising on the LAN (edge_agent.discovery); off unless configured.
        self.device_id = self.creds.device_id if self.creds else socket.gethostname()
        self.advertiser = (
            Advertiser(settings.advertise, self._advert_txt, device_id=self.device_id)
            if settings.advertise
            else None
        )

    def _update_policy(self) -> UpdatePolicy:
        """How the deployer's installs are verified (edge_agent.update_security): TUF or not."""
        from edge_agent.update_security import resolve
        from hardware.errors import EdgefnError

        s = self.settings
        https = self.creds is not None and self.cloud_url.startswith("https:")
        ssl_ctx = self.creds.ssl_context() if self.creds is not None and https else None
        try:
            return resolve(s.update_security, s.data_dir, s.credentials_file, ssl_context=ssl_ctx)
        except (ValueError, EdgefnError) as exc:
            raise StartupError(f"update_security: {exc}") from exc

    def _advert_txt(self) -> dict[str, str]:
        versions = {n: f.manifest.version for n, f in self.functions.loaded.items()}
        return agent_txt(
            self.device_id, self.settings.auth, tls=self.settings.tls, functions=versions
        )

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("the agent is not open yet (Agent.open / Agent.start)")
        return self._parts

    @property
    def functions(self) -> FunctionSet:
        return self.parts.functions

    @property
    def router(self) -> Router:
        return self.parts.router

    async def open(self, *, sandbox: Sandbox | None = None) -> Parts:
        """Open the stores and build the serving parts (`sandbox`: given instead of detected)."""
        s = self.settings
        prepare_data_dir(s.data_dir)
        from edge_agent.cache import ResultCache
        from edge_agent.staging import STAGING_DIR, sweep
        from edge_agent.tokens import TokenStore
        from edge_agent.trust import set_aside_damaged

        await asyncio.to_thread(set_aside_damaged, s.data_dir)  # logs what it set aside
        aside = await asyncio.to_thread(TokenStore(s.tokens_file).set_aside_if_damaged)
        if aside:
            log.warning(
                "token store %s was damaged: set aside as %s, starting with no tokens%s",
                s.tokens_file.name,
                aside,
                "; every call that needs a token is refused (401) until one is made"
                if s.auth in ("token", "mtls")
                else "",
            )
        for left in await asyncio.to_thread(sweep, s.data_dir / STAGING_DIR):
            log.info("removed %s, left in staging by an interrupted install", left)

        cache = await ResultCache.open(s.data_dir / "cache.db", s.cache_max_bytes)
        try:
            if sandbox is None:
                sandbox = await asyncio.to_thread(build_sandbox, s)
        except BaseException:
            await cache.close()
            raise
        try:
            state = await StateStore.open(s.data_dir / "state.db")
        except BaseException:
            await cache.close()
            raise
        self._parts = assemble(
            s,
            self.metrics,
            cache,
            sandbox,
            self.cloud,
            self.health,
            self.auth,
            state=state,
            publish=self._publish,
            config=self._function_config,
            secret=self._secret,
        )
        return self._parts

    def health(self) -> dict[str, Any]:
        parts = self.parts
        loaded = parts.functions.loaded
        unhealthy = sorted(
            {n for n, f in loaded.items() if f.executor.status().health != "healthy"}
            | (set(parts.functions.problems) - set(loaded))
        )
        return {
            "status": "stopping" if self._stopping else "ok",
            "uptime_s": round(time.time() - self.started_at, 3),
            "functions": len(loaded),
            "unhealthy": unhealthy,
            "pid": os.getpid(),
            "cache": parts.cache.stats(),
            "sandbox": parts.sandbox.status(),
            "cloud": self.cloud.status() if self.cloud else {"state": "off"},
            "sync": self.sync.status() if self.sync else {"state": "off"},
            "deployer": self.deployer.status() if self.deployer else {"state": "off"},
            # Names and versions held, never values.
            "secrets": self.secrets_sync.status() if self.secrets_sync else {"state": "off"},
        }

    # ---- building blocks: publish and config (edge_agent.capabilities) ----------------

    async def _publish(self, event: Event) -> None:
        await agent_view.publish_event(self.sync, event)

    def _function_config(self, name: str) -> Mapping[str, Any]:
        desired = self._desired
        fc = desired.functions.get(name) if desired is not None else None
        return fc.config if fc is not None else {}

    def _secrets_changed(self) -> None:
        if self.secrets_sync is not None:
            self.secrets_sync.wake()

    def _secret(self, name: str) -> bytes | None:
        return self.secrets.get(name) if self.secrets is not None else None

    # ---- sync callbacks (cloud_sync never imports the agent) ---------------------------

    def _metrics_snapshot(self) -> dict[str, FunctionCounters]:
        return agent_view.metrics_snapshot(self.functions, self.metrics)

    def _versions(self) -> dict[str, str]:
        return agent_view.versions(self.functions)

    def _health_sample(self, name: str) -> HealthSample:
        return agent_view.health_sample(self.functions, self.metrics, name)

    async def _reload_functions(self) -> None:
        await self.functions.sync()
        self._apply_pools()

    def _pool_sizes(self) -> dict[str, int]:
        return agent_view.pool_sizes(self.functions)

    def _describe(self) -> dict[str, Any]:
        return {
            "functions": self._versions(),
            # Installed but not serving (budget full, broken): the platform must not count them.
            "not_running": self.functions.not_running(),
            "profile": self._profile,
            **(self.deployer.reported_extra() if self.deployer else {}),
        }

    async def _apply_config(self, config: AgentConfig) -> None:
        """Desired config from the platform, applied live; None fields = the local default."""
        before, self._desired = self._desired, config
        notify_config_changes(self.functions.loaded, before, config)
        if self.deployer is not None:
            self.deployer.desired(config)  # functions.<f>.version and deployment.rollouts
        self.router.overrides.clear()
        self.router.overrides.update(
            {n: fc.routing for n, fc in config.functions.items() if fc.routing is not None}
        )
        level = (config.log_level or self.settings.log_level).upper()
        logging.getLogger().setLevel(level)
        cache = self.parts.cache
        bound = max(4096, config.cache_max_bytes or self.settings.cache_max_bytes)
        if bound != cache.max_bytes:
            log.info("result cache bound %d -> %d bytes", cache.max_bytes, bound)
            await cache.set_max_bytes(bound)
        self._apply_pools()
        await self._apply_lan_tokens(config.raw.get("lan", {}).get("tokens", []))

    async def _apply_lan_tokens(self, entries: list[dict[str, Any]]) -> None:
        await agent_view.apply_lan_tokens(self.settings.tokens_file, entries)

    def _apply_pools(self) -> None:
        agent_view.apply_pools(self.functions, self._desired)

    async def start(self) -> None:
        s = self.settings
        parts = self._parts or await self.open()
        await parts.functions.sync()
        if self.creds is not None:
            await self._start_sync(self.creds)
        if self.auth is not None:
            await self.auth.start()  # tokens loaded before the first request can arrive
        if self.advertiser is not None:
            await self.advertiser.prepare()  # a wrong interface name stops us before listening
        self._runner = LimitedAppRunner(  # connection/header limits (edge_agent.listener)
            parts.api.app(),
            limits=ListenerLimits(
                max_connections=s.max_connections,
                header_timeout_s=s.header_timeout_s,
                idle_timeout_s=s.idle_timeout_s,
                max_headers=s.max_headers,
                max_header_bytes=s.max_header_bytes,
            ),
            fast_api=parts.api if s.fast_invoke else None,  # edge_agent.fastpath
            access_log=None,
            handle_signals=False,
            shutdown_timeout=s.drain_s,
        )
        await self._runner.setup()
        listen_ssl = None
        if s.tls_cert_file is not None and s.tls_key_file is not None:  # edge_agent.tls
            listen_ssl = await asyncio.to_thread(
                server_context, s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file
            )
        site = web.TCPSite(self._runner, s.host, s.port, reuse_address=True, ssl_context=listen_ssl)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {s.host}:{s.port}: {exc.strerror}") from exc
        port = bound_port(self._runner) or s.port
        host = f"[{s.host}]" if ":" in s.host else s.host
        self.url = f"{'https' if listen_ssl else 'http'}://{host}:{port}"
        atomic_write(
            s.state_file,
            json.dumps(
                {"url": self.url, "pid": os.getpid(), "started_at": self.started_at}
            ).encode(),
        )
        self._scanner = asyncio.create_task(self._scan_loop(), name="function scanner")
        log.info(
            "edge-agent listening on %s (%d functions loaded, data dir %s)",
            self.url,
            len(self.functions.loaded),
            s.data_dir,
        )
        if self.advertiser is not None:
            await self.advertiser.start(port)
        self.lifecycle.ready(f"listening on {self.url}")

    async def _start_sync(self, creds: DeviceCredentials) -> None:
        from cloud_sync.sync import AgentHooks, SyncClient, SyncSettings
        from edge_agent.deployer import Deployer, DeployerHooks
        from hardware.errors import HardwareError
        from hardware.profile import detect

        s = self.settings
        try:
            profile = await asyncio.to_thread(detect, s.data_dir, dict(s.labels))
            self._profile = profile.to_dict()
        except HardwareError as exc:
            log.warning("device profile unavailable for reporting: %s", exc.message)
        self.sync = SyncClient(
            creds,
            SyncSettings(
                data_dir=s.data_dir,
                fallback_after_s=s.fallback_after_s,
                # Poll desired state in fallback no slower than the fallback delay itself.
                http_poll_s=max(1.0, min(10.0, s.fallback_after_s)),
                metrics_interval_s=s.metrics_interval_s,
                outbox_max_bytes=s.outbox_max_bytes,
            ),
            AgentHooks(
                metrics_snapshot=self._metrics_snapshot,
                pool_sizes=self._pool_sizes,
                apply_config=self._apply_config,
                describe=self._describe,
                versions=self._versions,
                secrets_changed=self._secrets_changed,
            ),
            platform_url=self.cloud_url,
            fallback_urls=self.cloud_fallback_urls,
            token=str(self._extras.get("token") or ""),
            groups=tuple(self._extras.get("groups") or ()),
            mqtt311=bool(self._extras.get("mqtt311")),
            director=self._director,
        )
        sync = self.sync
        # The deployer reports through the sync client (its outbox), and the registry is the
        # platform's; it starts first, so the config sync applies at start reaches it.
        self.deployer = Deployer(
            s.data_dir,
            creds.device_id,
            (self.cloud_url, *self.cloud_fallback_urls),
            DeployerHooks(
                report=sync.report_rollout,
                reload=self._reload_functions,
                sample=self._health_sample,
                flush_metrics=sync.collect_metrics,
                expected_digest=sync.expected_digest,
            ),
            self._update_policy(),
        )
        await self.deployer.start()
        await self._start_secrets(creds)
        await sync.start()

    async def _start_secrets(self, creds: DeviceCredentials) -> None:
        from edge_agent.device_secrets import open_device_secrets

        token = str(self._extras.get("token") or "")
        self.secrets, self.secrets_sync = await open_device_secrets(
            self.settings.data_dir, creds, self.cloud_url, token
        )

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scan_interval_s)
            try:
                await self.functions.sync()
                self._apply_pools()
            except Exception:
                log.exception("function scan failed")

    async def stop(self) -> None:
        self._stopping = True
        await self.lifecycle.stopping()
        if self.advertiser is not None:
            await self.advertiser.close()  # first: LAN clients stop picking a leaving agent
        log.info("shutting down: draining in-flight requests (up to %g s)", self.settings.drain_s)
        if self._scanner is not None:
            self._scanner.cancel()
        if self._runner is not None:
            # Stops listening, then waits up to shutdown_timeout for in-flight requests, which
            # are still being served by the pools; only then are the pools stopped.
            await self._runner.cleanup()
        if self.deployer is not None:
            await self.deployer.close()
        if self.secrets_sync is not None:
            await self.secrets_sync.close()
        if self.sync is not None:
            await self.sync.close()
        if self.auth is not None:
            await self.auth.close()
        parts = self._parts
        if parts is not None:
            await parts.functions.close(drain_s=1.0)
            await parts.sandbox.close()
            await parts.cache.close()
            if parts.state is not None:
                await parts.state.aclose()
        if self.cloud is not None:
            await self.cloud.close()
        with contextlib.suppress(FileNotFoundError):
            self.settings.state_file.unlink()
        self.lifecycle.close()
        log.info("stopped")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

"""The agent: builds every part in one place, then start -> serve -> staged shutdown.

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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cloud_sync.cloud_invoke import CloudInvoker
from edge_agent.api import Api, ApiRunner
from edge_agent.errors import StartupError
from edge_agent.functions import FunctionSet, LoadedFunction
from edge_agent.metrics import BUCKETS, Metrics
from edge_agent.router import Router
from edge_agent.routing import check_policy
from edge_agent.settings import Settings
from runtimes.fsio import atomic_write
from runtimes.pool import Pool
from runtimes.sandbox import Sandbox, host_sandbox

if TYPE_CHECKING:  # imported when a device joins a platform: paho and cryptography cost RSS
    from cloud_sync.credentials import DeviceCredentials
    from cloud_sync.state import AgentConfig
    from cloud_sync.sync import FunctionCounters, SyncClient
    from edge_agent.cache import ResultCache

log = logging.getLogger("edgefn.agent")

DEFAULT_WORKER_USER = "edgefn-worker"


def build_sandbox(settings: Settings) -> Sandbox:
    """Worker user, budget and cgroups for this device. Blocking: reads /proc and /sys."""
    import pwd

    from hardware.budget import BudgetConfig, WorkerBudget
    from hardware.errors import HardwareError
    from hardware.limits import preflight, resolve_worker_user
    from hardware.profile import detect

    problems = preflight()
    if problems:
        raise StartupError("; ".join(problems))
    try:
        profile = detect(settings.data_dir, dict(settings.labels))
        budget = WorkerBudget.from_profile(
            profile,
            BudgetConfig(memory_mb=settings.budget_memory_mb, max_workers=settings.budget_workers),
        )
        run_as: tuple[int, int] | None = None
        if settings.worker_user != "auto":
            run_as = resolve_worker_user(settings.worker_user)
        elif os.geteuid() == 0:
            try:
                run_as = resolve_worker_user(DEFAULT_WORKER_USER)
            except HardwareError:
                log.warning(
                    "running as root and user %r does not exist: workers run as root "
                    "(create it, or pass --worker-user NAME)",
                    DEFAULT_WORKER_USER,
                )
    except HardwareError as exc:
        raise StartupError(exc.message) from exc
    log.info(
        "device %s, %d CPUs, %d MB; worker budget %d MB / %d workers; workers run as %s",
        profile.artifact_key,
        profile.cpu_count,
        profile.memory_total_mb,
        budget.memory_mb,
        budget.max_workers,
        pwd.getpwuid(run_as[0]).pw_name if run_as else "the agent's user",
    )
    # [limits] cgroups (v2/v1), PID namespaces, leftover sweep and the one summary line.
    return host_sandbox(data_dir=settings.data_dir, budget=budget, run_as=run_as)


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data dir layout, or fail with a message that says what is wrong."""
    try:
        (data_dir / "functions").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create data dir {data_dir}: {exc.strerror}") from exc
    probe = data_dir / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data dir {data_dir} is not writable: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True)
class Parts:
    """What serves requests, each part built complete with what it needs (`assemble`)."""

    cache: ResultCache
    sandbox: Sandbox
    functions: FunctionSet
    router: Router
    api: Api


def assemble(
    settings: Settings,
    metrics: Metrics,
    cache: ResultCache,
    sandbox: Sandbox,
    cloud: CloudInvoker | None,
    health: Callable[[], dict[str, Any]],
) -> Parts:
    """The one place the serving parts are wired: nothing is plugged in after construction."""

    async def version_switched(fn: LoadedFunction) -> None:
        # A new version must not answer from the old one's cached results.
        await cache.invalidate_function(
            fn.manifest.name, fn.manifest.version, fn.cache_policy.epoch
        )

    functions = FunctionSet(
        settings.functions_dir,
        require_signed=settings.require_signed,
        sandbox=sandbox,
        on_switch=version_switched,
    )
    router = Router(
        functions,
        metrics,
        cache=cache,
        cloud=cloud,
        default_policy=check_policy(settings.default_routing, "--default-routing"),
    )
    api = Api(router, functions, metrics, max_body_bytes=settings.max_body_bytes, health=health)
    return Parts(cache, sandbox, functions, router, api)


class Agent:
    """The lifecycle: device configuration at construction (cheap, no I/O beyond reading the
    credentials), the serving parts in `open()` (stores and device detection: blocking work,
    done off the loop), then serve -> staged shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        check_policy(settings.default_routing, "--default-routing")  # refuse before any I/O
        self.metrics = Metrics()
        self.creds: DeviceCredentials | None = None
        self._extras: dict[str, Any] = {}
        cloud_url, token, ssl_ctx = settings.cloud_url, settings.cloud_token, None
        if settings.credentials_file is not None:
            from cloud_sync import credentials
            from cloud_sync.errors import CredentialsError
            from cloud_sync.sync import load_credentials_extras

            try:
                self.creds = credentials.load(settings.credentials_file)
            except CredentialsError as exc:
                raise StartupError(exc.message) from exc
            self._extras = load_credentials_extras(settings.credentials_file)
            cloud_url = cloud_url or self.creds.platform_url
            token = token or str(self._extras.get("token") or "")
            if cloud_url.startswith("https:"):
                ssl_ctx = self.creds.ssl_context()
        self.cloud_url = cloud_url
        self.cloud = CloudInvoker(cloud_url, token=token, ssl=ssl_ctx) if cloud_url else None
        self.sync: SyncClient | None = None
        self._desired: AgentConfig | None = None
        self._profile: dict[str, Any] = {}
        self._parts: Parts | None = None
        self.started_at = time.time()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._scanner: asyncio.Task[None] | None = None
        self._stopping = False

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
        from edge_agent.trust import set_aside_damaged

        await asyncio.to_thread(set_aside_damaged, s.data_dir)  # logs what it set aside
        for left in await asyncio.to_thread(sweep, s.data_dir / STAGING_DIR):
            log.info("removed %s, left in staging by an interrupted install", left)

        cache = await ResultCache.open(s.data_dir / "cache.db", s.cache_max_bytes)
        try:
            if sandbox is None:
                sandbox = await asyncio.to_thread(build_sandbox, s)
        except BaseException:
            await cache.close()
            raise
        self._parts = assemble(s, self.metrics, cache, sandbox, self.cloud, self.health)
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
        }

    # ---- sync callbacks (cloud_sync never imports the agent) ---------------------------

    def _metrics_snapshot(self) -> dict[str, FunctionCounters]:
        from cloud_sync.sync import FunctionCounters

        bounds = tuple(b * 1000.0 for b in BUCKETS)
        return {
            name: FunctionCounters(
                invocations=st.invocations,
                errors=sum(st.errors.values()),
                cache_hits=st.cache.get("hit", 0) + st.cache.get("stale", 0),
                cache_misses=st.cache.get("miss", 0),
                latency_bounds_ms=bounds,
                latency_counts=tuple(st.bucket_counts),
                latency_sum_ms=st.duration_sum * 1000.0,
            )
            for name, st in self.metrics.functions.items()
        }

    def _pool_sizes(self) -> dict[str, int]:
        return {name: fn.executor.status().instances for name, fn in self.functions.loaded.items()}

    def _describe(self) -> dict[str, Any]:
        return {
            "functions": {n: f.manifest.version for n, f in sorted(self.functions.loaded.items())},
            # Installed but not serving (budget full, broken): the platform must not count them.
            "not_running": self.functions.not_running(),
            "profile": self._profile,
        }

    async def _apply_config(self, config: AgentConfig) -> None:
        """Desired config from the platform, applied live; None fields = the local default."""
        self._desired = config
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

    def _apply_pools(self) -> None:
        for name, fn in self.functions.loaded.items():
            if not isinstance(fn.executor, Pool):
                continue  # in-process C++: no pool to size
            base = fn.manifest.pool
            fc = self._desired.functions.get(name) if self._desired is not None else None
            want = base
            if fc is not None:
                lo = fc.min_instances if fc.min_instances is not None else base.min_instances
                hi = fc.max_instances if fc.max_instances is not None else base.max_instances
                want = replace(
                    base,
                    min_instances=lo,
                    max_instances=max(lo, hi),
                    concurrency=fc.concurrency or base.concurrency,
                )
            if fn.executor.settings != want:
                log.info("%s: pool %s -> %s", name, fn.executor.settings, want)
                fn.executor.update_settings(want)

    async def start(self) -> None:
        s = self.settings
        parts = self._parts or await self.open()
        await parts.functions.sync()
        if self.creds is not None:
            await self._start_sync(self.creds)
        self._runner = ApiRunner(
            parts.api.app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=s.drain_s,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {s.host}:{s.port}: {exc.strerror}") from exc
        port = _bound_port(self._runner) or s.port
        host = f"[{s.host}]" if ":" in s.host else s.host
        self.url = f"http://{host}:{port}"
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

    async def _start_sync(self, creds: DeviceCredentials) -> None:
        from cloud_sync.sync import AgentHooks, SyncClient, SyncSettings
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
            ),
            platform_url=self.cloud_url,
            token=str(self._extras.get("token") or ""),
            groups=tuple(self._extras.get("groups") or ()),
            mqtt311=bool(self._extras.get("mqtt311")),
        )
        await self.sync.start()

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
        log.info("shutting down: draining in-flight requests (up to %g s)", self.settings.drain_s)
        if self._scanner is not None:
            self._scanner.cancel()
        if self._runner is not None:
            # Stops listening, then waits up to shutdown_timeout for in-flight requests, which
            # are still being served by the pools; only then are the pools stopped.
            await self._runner.cleanup()
        if self.sync is not None:
            await self.sync.close()
        parts = self._parts
        if parts is not None:
            await parts.functions.close(drain_s=1.0)
            await parts.sandbox.close()
            await parts.cache.close()
        if self.cloud is not None:
            await self.cloud.close()
        with contextlib.suppress(FileNotFoundError):
            self.settings.state_file.unlink()
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


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    server = getattr(runner, "server", None)
    sockets: list[socket.socket] = getattr(server, "sockets", []) if server else []
    return sockets[0].getsockname()[1] if sockets else 0

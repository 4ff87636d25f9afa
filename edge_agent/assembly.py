"""How the agent's serving parts are built: the sandbox, the data dir, and `assemble`.

`edge_agent.agent.Agent.open` calls these once; every part gets what it needs at construction
(no `router.cache = ...` afterwards), so a reader finds the whole wiring on one page.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_sync.cloud_invoke import CloudInvoker
from edge_agent.api import Api
from edge_agent.auth import Authenticator
from edge_agent.capabilities import Broker, ConfigLookup, Event, Publish, SecretLookup
from edge_agent.dapr import DaprEndpoint
from edge_agent.errors import StartupError
from edge_agent.functions import FunctionSet, LoadedFunction
from edge_agent.metrics import Metrics
from edge_agent.router import Router
from edge_agent.routing import check_policy
from edge_agent.settings import Settings
from edge_agent.state_store import StateStore
from runtimes.capabilities import CapabilityUnavailable
from runtimes.sandbox import Sandbox, host_sandbox

if TYPE_CHECKING:
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
    broker: Broker
    state: StateStore | None


async def _no_platform(event: Event) -> None:
    raise CapabilityUnavailable("this agent is not joined to a platform: nothing to publish to")


def assemble(
    settings: Settings,
    metrics: Metrics,
    cache: ResultCache,
    sandbox: Sandbox,
    cloud: CloudInvoker | None,
    health: Callable[[], dict[str, Any]],
    auth: Authenticator | None = None,
    *,
    state: StateStore | None = None,
    publish: Publish = _no_platform,
    config: ConfigLookup = lambda name: {},
    secret: SecretLookup = lambda name: None,
) -> Parts:
    """The one place the serving parts are wired: nothing is plugged in after construction.

    The capability broker and the router need each other (a function's nested `invoke` goes
    through the router, whose executors hand calls to the broker): the broker gets a closure
    that reads `router` when it is called, after this function has returned.
    """

    async def nested_invoke(
        name: str,
        payload: bytes,
        *,
        request_id: str,
        trace_id: str,
        deadline_s: float,
        chain: tuple[str, ...],
        content_type: str,
    ) -> bytes:
        routed = await router.invoke(
            name,
            payload,
            request_id=request_id,
            trace_id=trace_id,
            content_type=content_type,
            deadline_s=deadline_s,
            chain=chain,
        )
        return routed.result.payload

    broker = Broker(
        invoke=nested_invoke, publish=publish, state=state, config=config, secret=secret
    )

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
        capabilities=broker,
        dapr=DaprEndpoint(broker),  # listens only once a function asks for it
    )
    router = Router(
        functions,
        metrics,
        cache=cache,
        cloud=cloud,
        default_policy=check_policy(settings.default_routing, "--default-routing"),
    )
    api = Api(
        router,
        functions,
        metrics,
        max_body_bytes=settings.max_body_bytes,
        health=health,
        auth=auth,
    )
    return Parts(cache, sandbox, functions, router, api, broker, state)

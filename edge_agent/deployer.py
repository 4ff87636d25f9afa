"""The agent's deployer: desired function versions in, installs, health window, reports out.

Flow (Greengrass-style, one deployment at a time):

    desired config applied (sync -> Agent._apply_config) -> Deployer.desired(config)
        -> parse_deployments: per function {version, rollout, rollback, remove}
        -> one worker task takes the functions one by one, newest desired wins:
           a step not started yet is replaced (a known rollout step reported `canceled:
           superseded`), a health window in progress is interrupted
    per step:
        downgrade without rollback?      -> rejected: downgrade_refused
        refused here before?             -> nothing (not retried until desired changes)
        install_from_registry in a thread: reports downloading, installing, warming
            (the install path's own steps: download -> verify -> unpack -> warm -> switch)
            refused by the installer     -> rejected: wrong_arch / signature / disk_full / ...
            failed                       -> failed: download_failed / warm_failed / ...
        reload the function set, report `active`
        rollback step?                   -> rolled_back, done
        health window (deployer_health)  -> healthy
            crash loop / error rate / workers do not start
                                         -> local rollback to the previous version (or
                                            deactivate a first install), failed: <code>,
                                            the version remembered as refused

Every report is a `StatusReport` (whole state, increasing `seq`, stable code) handed to the
sync client, which stores it in the outbox (durable; resent until acknowledged; the key
de-duplicates) for `edgefn/v1/devices/<id>/rollout`, and the latest per function also goes into
the reported document (`reported_extra`). The deployer never talks MQTT itself, and it needs no
network to roll back: the previous version is still unpacked on disk (`KEEP_PREVIOUS`).

Crash safety: the step is written to `deployer_state` before the install starts; the install
path leaves exactly one complete version active at every instant. After `kill -9` the next
start finds the step, and the desired document re-applied at start runs it again: the install
resumes or finds the version already switched, then the health window runs again. A step
started `MAX_ATTEMPTS` times reports `failed: interrupted`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.messages import DesiredDeployment, StatusReport, parse_deployments
from cloud_sync.rollout.messages import reported_extra as reported_rollouts
from cloud_sync.rollout.states import DeviceState
from cloud_sync.state import AgentConfig
from edge_agent.deployer_health import HealthSample, Verdict, watch, window_s
from edge_agent.deployer_install import (
    deactivate,
    install_version,
    local_rollback,
    read_active_version,
)
from edge_agent.deployer_state import MAX_ATTEMPTS, DeployerState, want_key
from edge_agent.update_security import UpdatePolicy
from runtimes import tasks
from runtimes.manifest import semver_key

log = logging.getLogger("edgefn.deployer")

# Install-path steps as the platform names them (InstallFaults steps -> device states).
STEP_STATES = {"verify": DeviceState.INSTALLING, "warm": DeviceState.WARMING}
# How long the installer waits at the switch for the metrics interval to close (an outbox
# append: milliseconds; the bound only keeps a stuck disk from holding the install).
FLUSH_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class DeployerHooks:
    """What the agent lends the deployer (all on the loop)."""

    report: Callable[[StatusReport], Awaitable[None]]  # durable: into the outbox
    reload: Callable[[], Awaitable[None]]  # load what is active on disk now
    sample: Callable[[str], HealthSample]
    flush_metrics: Callable[[], Coroutine[Any, Any, None]] | None = None  # close the interval
    # (function, version) -> the bundle sha256 the director's signed instruction names, for the
    # TUF check of the download (the target must be this bundle); None: not named.
    expected_digest: Callable[[str, str], str | None] | None = None


class Deployer:
    """`await start()`, then `desired(config)` for every applied config; `await close()`."""

    def __init__(
        self,
        data_dir: Path,
        device_id: str,
        registry_url: str | tuple[str, ...],  # several: the platform's replicas, in order
        hooks: DeployerHooks,
        security: UpdatePolicy | None = None,
    ) -> None:
        self.data_dir = data_dir
        # Every install the deployer makes goes through the device's update security (TUF).
        self.security = security or UpdatePolicy()
        self.device_id = device_id
        self.registry_url = registry_url
        self.hooks = hooks
        self.state = DeployerState(data_dir)
        self._wanted: dict[str, DesiredDeployment] = {}
        self._wake = asyncio.Event()
        self._interrupt: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()  # set while nothing is left to do (tests, health)
        self._save_lock = asyncio.Lock()  # install progress reports come from its thread

    async def start(self) -> None:
        self.state = await asyncio.to_thread(DeployerState.load, self.data_dir)
        self._task = asyncio.create_task(self._run(), name="deployer")

    async def close(self) -> None:
        await tasks.stop(self._task)

    def reported_extra(self) -> dict[str, Any]:
        return reported_rollouts(self.state.latest)

    def status(self) -> dict[str, Any]:
        step = self.state.step
        return {
            "step": {k: step[k] for k in ("function", "want", "state")} if step else None,
            "refused": dict(self.state.refused),
            "idle": self.idle.is_set(),
        }

    # ---- desired ----------------------------------------------------------------------

    def desired(self, config: AgentConfig) -> None:
        """A newly applied desired config (cloud_sync.state validated the entries)."""
        try:
            wanted = parse_deployments(config.raw)
        except MessageError as exc:
            log.warning("deployer: desired deployments ignored: %s", exc.message)
            return
        for name, want in wanted.items():
            if self._wanted.get(name) != want and name in self._interrupt:
                self._interrupt[name].set()  # newest wins: a health window stops watching
        for name in set(self.state.done) - set(wanted):
            # No longer named: naming it again later is a change (acted on, retried).
            self.state.done.pop(name, None)
            self.state.refused.pop(name, None)
        self._wanted = wanted
        self.idle.clear()
        self._wake.set()

    # ---- the one queue ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                step = self.state.step
                if step is not None and step["function"] not in self._wanted:
                    await self._supersede(step)  # its function is no longer desired at all
                    step = None
                todo = [
                    (n, w)
                    for n, w in sorted(self._wanted.items())
                    if self.state.done.get(n) != want_key(w)
                ]
                if not todo:
                    break
                # A step left by the last run (kill -9) goes first: finish it, or supersede it.
                todo.sort(key=lambda item: step is None or item[0] != step["function"])
                name, want = todo[0]
                try:
                    await self._deploy(name, want)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("deployer: %s %s failed unexpectedly", name, want.version)
                    try:  # reported and not retried, like any failed step: no loop
                        await self._report(want, DeviceState.FAILED, "install_failed", None, None)
                        await self._finish(name, want, refuse=want.version)
                    except Exception:
                        log.exception("deployer: could not record the failure of %s", name)
                        self.state.done[name] = want_key(want)  # at least no loop in this run
            if not self._wake.is_set():
                self.idle.set()

    async def _report(
        self,
        want: DesiredDeployment,
        state: DeviceState,
        code: str | None,
        previous: str | None,
        started: float | None,
        message: str = "",
    ) -> None:
        report = StatusReport(
            device=self.device_id, function=want.function, rollout=want.rollout,
            version=want.version, state=state, seq=self.state.next_seq(), at=time.time(),
            code=code, message=message[:1000], started_at=started, rollback=want.rollback,
            previous=previous,
        )  # fmt: skip
        async with self._save_lock:
            self.state.latest[want.function] = report
            await asyncio.to_thread(self.state.save)  # the seq is spent before anyone sees it
        log.info("deployer: %s %s -> %s %s", want.function, want.version, state.value, code or "")
        await self.hooks.report(report)

    async def _finish(self, name: str, want: DesiredDeployment, *, refuse: str | None) -> None:
        async with self._save_lock:
            self.state.done[name] = want_key(want)
            self.state.step = None
            if refuse is not None:
                self.state.refused[name] = refuse
            await asyncio.to_thread(self.state.save)

    async def _deploy(self, name: str, want: DesiredDeployment) -> None:
        active = await asyncio.to_thread(read_active_version, self.data_dir, name)
        step = self.state.step
        resumed = (
            step if step and step["function"] == name and step["want"] == want_key(want) else None
        )
        if step is not None and step["function"] == name and resumed is None:
            await self._supersede(step)
        refused = self.state.refused.get(name)
        if refused is not None and refused != want.version:
            del self.state.refused[name]  # the desired version changed: may try that one again
        if want.remove:
            if active is not None:
                await asyncio.to_thread(deactivate, self.data_dir, name)
                await self.hooks.reload()
                await self._report(want, DeviceState.ROLLED_BACK, None, active, time.time())
            await self._finish(name, want, refuse=None)
            return
        version = want.version
        assert version is not None
        if refused == version and not want.rollback:
            await self._finish(name, want, refuse=version)  # no install loop
            return
        # A health window cut short by a newer entry for the same version: not verified yet.
        unverified = (
            resumed is None
            and step is not None
            and step["function"] == name
            and step["want"]["version"] == version
            and step.get("state") == "active"
            and not want.rollback
        )
        previous = active
        if resumed is not None:
            previous = resumed["previous"]
        elif unverified and step is not None:
            previous = step["previous"]
        if active == version and not unverified and (resumed is None or resumed["state"] == "done"):
            # Already running it (a first desired naming what the device runs): say so once.
            state = DeviceState.ROLLED_BACK if want.rollback else DeviceState.HEALTHY
            await self._report(want, state, None, previous, time.time())
            await self._finish(name, want, refuse=None)
            return
        if (
            active is not None
            and active != version
            and semver_key(version) < semver_key(active)
            and not want.rollback
        ):
            await self._report(
                want, DeviceState.REJECTED, "downgrade_refused", active, time.time(),
                f"{version} is older than the active {active} and the desired entry is no "
                "rollback",
            )  # fmt: skip
            await self._finish(name, want, refuse=version)
            return
        attempts = int(resumed["attempts"]) + 1 if resumed else 1
        started = float(resumed["started_at"]) if resumed else time.time()
        if attempts > MAX_ATTEMPTS:
            await self._report(
                want, DeviceState.FAILED, "interrupted", previous, started,
                f"the agent restarted {MAX_ATTEMPTS} times during this step",
            )  # fmt: skip
            await self._restore(name, previous, version)
            await self._finish(name, want, refuse=version)
            return
        self.state.step = {
            "function": name, "want": want_key(want), "previous": previous,
            "started_at": started, "attempts": attempts, "state": "installing",
        }  # fmt: skip
        await asyncio.to_thread(self.state.save)
        if active != version and not await self._install(name, want, previous, started):
            return
        await self._switched(name, want, previous, started)

    async def _supersede(self, step: dict[str, Any]) -> None:
        """A step recorded but replaced by a newer desired entry before it finished."""
        old = step["want"]
        running = await asyncio.to_thread(read_active_version, self.data_dir, step["function"])
        # Switched already (killed before it said so): that is an update, rolled back by the
        # platform if need be, never a canceled step.
        if old.get("rollout") and step.get("state") == "installing" and running != old["version"]:
            want = DesiredDeployment(
                step["function"], old["version"], old["rollout"], old["rollback"], old["remove"]
            )
            await self._report(
                want, DeviceState.CANCELED, "superseded", step.get("previous"), step["started_at"]
            )
        async with self._save_lock:
            self.state.step = None
            await asyncio.to_thread(self.state.save)

    async def _install(
        self, name: str, want: DesiredDeployment, previous: str | None, started: float
    ) -> bool:
        """The install path; False when it refused or failed (reported and finished)."""
        assert want.version is not None
        loop = asyncio.get_running_loop()
        pending: list[concurrent.futures.Future[None]] = []

        def progress(step: str) -> None:  # on the installer's thread
            state = STEP_STATES.get(step)
            if state is not None:
                coro = self._report(want, state, None, previous, started)
                pending.append(asyncio.run_coroutine_threadsafe(coro, loop))
            if step == "switch" and self.hooks.flush_metrics is not None:
                # Close the metrics interval right before `active` changes: what ran so far
                # was the old version (the record names the version running at its end).
                flushed: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
                    self.hooks.flush_metrics(), loop
                )
                try:
                    flushed.result(FLUSH_WAIT_S)
                except Exception as exc:  # a lost split only blurs attribution; go on
                    log.warning("deployer: metrics interval not closed at the switch: %s", exc)

        await self._report(want, DeviceState.DOWNLOADING, None, previous, started)
        # The director's instruction names the bundle's digest: TUF's target must be that one.
        hook = self.hooks.expected_digest
        digest = hook(name, want.version) if hook is not None else None
        outcome = await asyncio.to_thread(
            install_version, self.data_dir, self.registry_url, name, want.version,
            rollback=want.rollback, progress=progress, security=self.security,
            expected_digest=digest,
        )  # fmt: skip
        for fut in pending:
            await asyncio.wrap_future(fut)
        if outcome.ok:
            return True
        await self._report(want, outcome.state, outcome.code, previous, started, outcome.message)
        await self._finish(name, want, refuse=want.version)
        return False

    async def _switched(
        self, name: str, want: DesiredDeployment, previous: str | None, started: float
    ) -> None:
        version = want.version
        assert version is not None and self.state.step is not None
        await self.hooks.reload()
        self.state.step["state"] = "active"
        await self._report(want, DeviceState.ACTIVE, None, previous, started)
        if want.rollback:
            await self._report(want, DeviceState.ROLLED_BACK, None, previous, started)
            await self._finish(name, want, refuse=None)
            return
        interrupt = self._interrupt[name] = asyncio.Event()
        try:
            verdict: Verdict = await watch(
                lambda: self.hooks.sample(name), version, window_s(), interrupt
            )
        finally:
            self._interrupt.pop(name, None)
        if verdict.superseded:
            return  # the newer entry is next in the queue; it decides what runs
        if verdict.healthy:
            self.state.step["state"] = "done"
            await self._report(want, DeviceState.HEALTHY, None, previous, started)
            await self._finish(name, want, refuse=None)
            return
        log.warning("deployer: %s %s unhealthy: %s", name, version, verdict.message)
        code = verdict.code or "health_failed"
        restored = await self._restore(name, previous, version)
        if not restored:
            code = "rollback_failed"
        await self._report(want, DeviceState.FAILED, code, previous, started, verdict.message)
        await self._finish(name, want, refuse=version)

    async def _restore(self, name: str, previous: str | None, bad: str) -> bool:
        """Back to `previous` (or nothing, after a first install), with no network."""
        if self.hooks.flush_metrics is not None:
            with contextlib.suppress(Exception):  # the bad version's counts end here
                await self.hooks.flush_metrics()
        try:
            await asyncio.to_thread(local_rollback, self.data_dir, name, previous, bad)
        except Exception:
            log.exception("deployer: rolling %s back to %s failed", name, previous)
            return False
        await self.hooks.reload()
        return True

"""The platform's rollout controller: the only writer of rollout state.

It is the I/O shell around the pure core (`cloud_sync.rollout`): it loads a `Rollout` from
`RolloutStore`, feeds it an event through `controller.step`, stores the result, and only then
carries out the actions (`SetDesired`: merge the rollout entry into the device's desired
document in the fleet store and publish it retained; HTTP-fallback devices read the same
document when they poll). Storing before acting means a crash between the two repeats a
publish on restart (the loop re-derives nothing from actions), never loses a decision.

Flow of one pass of the loop (every `TICK_S`):

1. read the records devices sent since the cursor (`rollout_feed.RecordFeed`: MQTT and HTTP
   alike): status reports -> `Reports` per active rollout of that function; metrics -> the
   per-(device, function, version) totals;
2. `Tick` every active rollout with the new version's metrics over `gate_devices(rollout)` and
   the previous versions' metrics over the same devices;
3. every `JOIN_S`: devices that entered a running rollout's target -> `Join`; devices in the
   target of a function's last succeeded rollout whose desired names another version get
   that version (joiners after the rollout ended);
4. publish each changed rollout's progress (retained, `edgefn/v1/rollouts/<id>/status`).

Operator calls (`create`, `pause`, `resume`, `abort`) take the same lock as the loop, so no
two steps of one rollout interleave. Metrics totals live in memory; after a restart they are
rebuilt from the stored records received since the oldest active rollout began.

Several replicas (`leader.py`): every replica answers operator calls, but only the leader runs
the loop -- `start()` when it becomes the leader, `stop()` when it stops being one. The lock is
then the lease's fleet-wide `exclusive()` as well, so an operator's call on a follower and the
leader's pass never interleave on one rollout; the loop reads the active rollouts from the
store on every pass, so it picks up rollouts a follower created. A new leader starts like a
restarted platform, and first `repair`s what a leader that died between storing a decision and
carrying it out left undone (a notified device whose desired document does not name the
rollout yet): no wave is repeated or skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cloud_sync import topics
from cloud_sync.platform.fleet_store import FleetStore, UnknownDevice
from cloud_sync.platform.intake import MqttIntake
from cloud_sync.platform.leader import Lease, LocalLease
from cloud_sync.platform.rollout_feed import BATCH_ROWS, MetricsKey, RecordFeed
from cloud_sync.platform.rollout_store import RolloutStore
from cloud_sync.platform.store import RegistryStore
from cloud_sync.rollout import controller as core
from cloud_sync.rollout.eligibility import BundleFacts
from cloud_sync.rollout.errors import RolloutError
from cloud_sync.rollout.messages import StatusReport, desired_patch
from cloud_sync.rollout.metrics import VersionMetrics, total
from cloud_sync.rollout.model import Rollout, admit, new_rollout, plan
from cloud_sync.rollout.selector import DeviceFacts
from cloud_sync.rollout.spec import RolloutSpec
from cloud_sync.rollout.states import ACTIVE_ROLLOUT_STATES
from cloud_sync.rollout.states import DeviceState as DS
from cloud_sync.rollout.states import RolloutState as RS
from cloud_sync.state import merge_config
from runtimes import tasks

log = logging.getLogger("edgefn.rollouts")

# How often the loop reads device records and ticks the rollouts. It bounds the time from a
# device's report to the platform's next decision (notify the next wave, stop on a gate); the
# gates themselves are judged at the spec's `interval_s`. Half a second keeps a zero-bake
# 4-wave rollout of 1,000 devices well inside the 20 s goal while costing one indexed query
# per pass when nothing happens. Tests shrink it.
TICK_S = 0.5
# How often targets are re-selected for joiners (enrolled or relabelled devices): this reads
# every device's view, so it runs less often than the tick.
JOIN_S = 5.0
# How many devices' desired documents one pass writes and publishes at once (see `_carry_out`).
ACTION_CONCURRENCY = 32
# Metrics received this long before the oldest active rollout began still count: a
# relative gate's `previous` needs the old version's traffic on the same devices.
METRICS_LOOKBACK_S = 300.0


class RolloutNotFound(RolloutError):
    code = "rollout_not_found"


class RolloutStateConflict(RolloutError):
    """pause/resume/abort of a rollout in a state where it means nothing (answered 409)."""

    code = "rollout_state"


class RolloutController:
    def __init__(
        self,
        rollouts: RolloutStore,
        fleet: FleetStore,
        registry: RegistryStore,
        feed: RecordFeed,
        intake: MqttIntake | None,
        *,
        tick_s: float = TICK_S,
        join_s: float = JOIN_S,
        lease: Lease | None = None,
    ) -> None:
        self.rollouts = rollouts
        self.fleet = fleet
        self.registry = registry
        self.feed = feed
        self.intake = intake
        self.tick_s = tick_s
        self.join_s = join_s
        self.lease: Lease = lease if lease is not None else LocalLease()
        self._local_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._cursor = 0
        self._metrics: dict[MetricsKey, VersionMetrics] = {}
        self._joined_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the loop (on the leader): as after a restart, metrics totals are rebuilt."""
        if self._task is not None:
            return
        active = await asyncio.to_thread(self.rollouts.active)
        since = min((r.created_at for r in active), default=time.time()) - METRICS_LOOKBACK_S
        self._cursor = await asyncio.to_thread(self.feed.first_id_since, since)
        self._metrics = {}
        self._joined_at = 0.0
        try:
            await self.repair()
        except Exception:
            log.exception("rollout repair failed; the loop starts anyway")
        self._task = asyncio.create_task(self._run(), name="rollout controller")

    async def stop(self) -> None:
        """Stop the loop (leadership lost or shutdown); operator calls keep working."""
        task, self._task = self._task, None
        await tasks.stop(task)

    async def close(self) -> None:
        await self.stop()
        await asyncio.to_thread(self.feed.close)
        await asyncio.to_thread(self.rollouts.close)

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[None]:
        """This process's lock, then the fleet-wide one (a no-op cost with one process)."""
        async with self._local_lock, self.lease.exclusive():
            yield

    async def repair(self) -> int:
        """Carry out what a stored decision asked for and a dead leader did not do.

        A device the stored rollout calls `notified` (or asked to go back) must have a desired
        document that names this rollout's step; when it does not, the action is done now. A
        device whose document already says so is left alone (no second desired version).
        Returns how many actions were redone.
        """
        redone = 0
        async with self._lock():
            for r in await asyncio.to_thread(self.rollouts.active):
                for rec in r.devices.values():
                    if rec.rollback_pending:
                        action = core.SetDesired(
                            rec.device, r.spec.function, rec.previous, True, r.id
                        )
                    elif rec.state is DS.NOTIFIED:
                        action = core.SetDesired(
                            rec.device, r.spec.function, r.spec.version, False, r.id
                        )
                    else:
                        continue
                    if not await asyncio.to_thread(self._done, action):
                        await self._set_desired(action)
                        redone += 1
        if redone:
            log.warning("rollout repair: %d desired documents written after a takeover", redone)
        return redone

    def _done(self, action: core.SetDesired) -> bool:
        """Blocking: does the device's desired document already carry this action?"""
        try:
            desired = self.fleet.desired(action.device)
        except UnknownDevice:
            return True
        entry = ((desired.config.get("deployment") or {}).get("rollouts") or {}).get(
            action.function
        ) or {}
        return bool(
            entry.get("rollout") == action.rollout
            and entry.get("version") == action.version
            and bool(entry.get("rollback")) == action.rollback
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.pass_once()
            except Exception:
                # One bad pass must not end the controller: the next reads the same cursor.
                log.exception("rollout controller pass failed")
            await asyncio.sleep(self.tick_s)

    # ---- the operator's calls -----------------------------------------------------------

    async def create(
        self, body: dict[str, Any], *, dry_run: bool = False, supersede: bool = False
    ) -> dict[str, Any]:
        """Plan (and unless `dry_run` start) a rollout; raises SpecError / RolloutError."""
        spec = RolloutSpec.from_dict(body)
        bundle = await self._bundle(spec.function, spec.version)
        fleet = await self._fleet()
        rollout_id = f"r-{secrets.token_hex(4)}"
        p = plan(rollout_id, spec, fleet, bundle)
        if dry_run:
            return {**p.to_dict(), "dry_run": True, "function": spec.function,
                    "version": spec.version}  # fmt: skip
        async with self._lock():
            existing = await asyncio.to_thread(self.rollouts.active)
            replaced = admit(spec.function, existing, supersede=supersede)
            now = time.time()
            r = new_rollout(spec, p, now)
            for old in existing:
                if old.id in replaced:
                    await self._step(old, core.Supersede(now, rollout_id))
            await self._step(r, core.Start(now))
        return {"id": rollout_id, "superseded": replaced, **p.to_dict()}

    async def get(self, rollout_id: str) -> Rollout:
        r = await asyncio.to_thread(self.rollouts.get, rollout_id)
        if r is None:
            raise RolloutNotFound(f"no rollout {rollout_id!r}")
        return r

    async def all(self) -> list[Rollout]:
        return await asyncio.to_thread(self.rollouts.all)

    async def command(self, rollout_id: str, verb: str) -> Rollout:
        """pause / resume / abort: they touch only the stored value, so they work with devices
        offline or stuck (the withdrawals are desired documents devices read when back)."""
        async with self._lock():
            r = await self.get(rollout_id)
            allowed = {
                "pause": (RS.PENDING, RS.RUNNING),
                "resume": (RS.PAUSED,),
                "abort": tuple(ACTIVE_ROLLOUT_STATES),
            }
            if verb not in allowed:
                raise RolloutError(f"unknown rollout command {verb!r}", code="bad_rollout_command")
            if r.state not in allowed[verb]:
                raise RolloutStateConflict(
                    f"cannot {verb} rollout {rollout_id}: it is {r.state.value}"
                )
            now = time.time()
            event: core.Event
            if verb == "pause":
                event = core.Pause(now)
            elif verb == "resume":
                event = core.Resume(now)
            else:
                event = core.Abort(now)
            return await self._step(r, event)

    # ---- the loop ----------------------------------------------------------------------

    async def pass_once(self) -> None:
        """One pass: records -> reports and metrics -> Tick; joiners now and then."""
        async with self._lock():
            reports: list[StatusReport] = []
            while True:
                batch = await asyncio.to_thread(self.feed.read, self._cursor)
                self._cursor = batch.last_id
                reports.extend(batch.reports)
                for key, m in batch.metrics.items():
                    have = self._metrics.get(key)
                    self._metrics[key] = have.merge(m) if have is not None else m
                if batch.rows < BATCH_ROWS:
                    break
            active = await asyncio.to_thread(self.rollouts.active)
            now = time.time()
            join = now - self._joined_at >= self.join_s
            fleet = await self._fleet() if join else None
            if join:
                self._joined_at = now
            for r in active:
                await self._advance(r, reports, fleet, now)
            await self._late_reports(reports, {r.id for r in active}, now)
            if fleet is not None:
                await self._late_joiners(fleet, {r.spec.function for r in active})

    async def _late_reports(
        self, reports: list[StatusReport], active: set[str], now: float
    ) -> None:
        """Reports for finished rollouts still update their records: a device that was
        `timed_out` and reports later counts (the status must not stay wrong forever)."""
        late: dict[str, list[StatusReport]] = {}
        for x in reports:
            if x.rollout is not None and x.rollout not in active:
                late.setdefault(x.rollout, []).append(x)
        for rollout_id, mine in late.items():
            r = await asyncio.to_thread(self.rollouts.get, rollout_id)
            if r is not None:
                await self._step(r, core.Reports(now, tuple(mine)))

    def _gate_metrics(self, r: Rollout) -> tuple[VersionMetrics, VersionMetrics | None]:
        fn = r.spec.function
        devices = core.gate_devices(r)
        current = total(
            [m for d in devices if (m := self._metrics.get((d, fn, r.spec.version))) is not None]
        )
        before = []
        for d in devices:
            prev = r.devices[d].previous
            if prev is not None and (m := self._metrics.get((d, fn, prev))) is not None:
                before.append(m)
        return current, (total(before) if before else None)

    async def _advance(
        self,
        r: Rollout,
        reports: list[StatusReport],
        fleet: Sequence[DeviceFacts] | None,
        now: float,
    ) -> None:
        """One pass's events for one rollout -- its reports, joiners, the tick -- as successive
        pure steps, then one save and their actions (`_commit`). The steps are the ones the
        rollout took one save each before; a save per pass instead of per event is what keeps
        a 10,000-device rollout from costing devices squared (docs/BENCHMARKS.md)."""
        new, actions = r, []
        try:
            mine = tuple(x for x in reports if x.function == r.spec.function)
            if mine:
                new, done = core.step(new, core.Reports(now, mine))
                actions += done
            if fleet is not None and new.state in ACTIVE_ROLLOUT_STATES:
                joiners = [
                    d for d in new.spec.target.select(list(fleet)) if d.id not in new.devices
                ]
                if joiners:
                    bundle = await self._bundle(r.spec.function, r.spec.version)
                    new, done = core.step(new, core.Join(now, tuple(joiners), bundle))
                    actions += done
            current, previous = self._gate_metrics(new)
            new, done = core.step(new, core.Tick(now, current, previous))
            actions += done
        except Exception:  # a step that raised (the version left the registry): keep the rest
            await self._commit(r, new, actions)
            raise
        await self._commit(r, new, actions)

    async def _late_joiners(self, fleet: Sequence[DeviceFacts], busy: set[str]) -> None:
        """Devices that joined a function's target after its last succeeded rollout get that
        version, as a plain forward step. A joiner is in the target and in no rollout of the
        function since then: a device a later (aborted, rolled back) rollout touched keeps
        what that rollout left it, so this never undoes an operator's abort."""
        todo = await asyncio.to_thread(self._joiners, fleet, busy)
        for device, fn, r in todo:
            await self._set_desired(core.SetDesired(device, fn, r.spec.version, False, r.id))

    def _joiners(
        self, fleet: Sequence[DeviceFacts], busy: set[str]
    ) -> list[tuple[str, str, Rollout]]:
        """Blocking (store reads, one per candidate): run in a thread."""
        everything = self.rollouts.all()
        out = []
        for fn, r in self.rollouts.last_succeeded().items():
            if fn in busy:
                continue
            since = [
                x for x in everything if x.spec.function == fn and x.created_at >= r.created_at
            ]
            touched = {d for x in since for d in x.devices}
            for d in r.spec.target.select(list(fleet)):
                if d.id in touched:
                    continue
                desired = self.fleet.desired(d.id)
                want = (desired.config.get("functions") or {}).get(fn) or {}
                if want.get("version") != r.spec.version:
                    out.append((d.id, fn, r))
        return out

    # ---- carrying out ------------------------------------------------------------------

    async def _step(self, r: Rollout, event: core.Event) -> Rollout:
        new, actions = core.step(r, event)
        await self._commit(r, new, actions)
        return new

    async def _commit(self, r: Rollout, new: Rollout, actions: list[core.SetDesired]) -> None:
        """Store `new` (the result of steps from `r`), only then carry out their actions."""
        if new == r and not actions:
            return
        await asyncio.to_thread(self.rollouts.save, new)
        await self._carry_out(actions)
        if new.state is not r.state or new.wave != r.wave or new.devices != r.devices:
            await self._publish_progress(new)

    async def _carry_out(self, actions: list[core.SetDesired]) -> None:
        """Each device's actions in order, up to `ACTION_CONCURRENCY` devices at once.

        Why not one after another: every action ends in a QoS 1 publish that waits for the
        broker's PUBACK, and a pass that opens a wave carries out up to the download cap's worth
        of them (1,000). In sequence that is a round trip each while no report is read. A
        failure is raised once all have run: the rest of the wave is not held back by one."""
        by_device: dict[str, list[core.SetDesired]] = {}
        for action in actions:
            by_device.setdefault(action.device, []).append(action)
        if len(by_device) <= 1:
            for action in actions:
                await self._set_desired(action)
            return
        room = asyncio.Semaphore(ACTION_CONCURRENCY)

        async def device(mine: list[core.SetDesired]) -> None:
            async with room:
                for action in mine:
                    await self._set_desired(action)

        results = await asyncio.gather(
            *(device(mine) for mine in by_device.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _set_desired(self, action: core.SetDesired) -> None:
        patch = desired_patch(
            action.function, action.version, action.rollout, rollback=action.rollback
        )
        try:
            current = await asyncio.to_thread(self.fleet.desired, action.device)
        except UnknownDevice:
            log.warning("rollout %s: device %s is gone", action.rollout, action.device)
            return
        config = merge_config(current.config, patch)
        await asyncio.to_thread(self.fleet.set_desired, action.device, config)
        if self.intake is not None:
            await self.intake.publish_desired(action.device)

    async def _publish_progress(self, r: Rollout) -> None:
        if self.intake is None:
            return
        view = r.status_view()
        view.pop("devices")  # the summary only: a large fleet's list belongs to the API
        with contextlib.suppress(Exception):
            await self.intake.session.publish(
                topics.rollout_topic(r.id), json.dumps(view).encode(), retain=True
            )

    # ---- facts -------------------------------------------------------------------------

    async def _bundle(self, function: str, version: str) -> BundleFacts:
        record = await asyncio.to_thread(self.registry.get_version, function, version)
        if record is None:
            raise RolloutError(
                f"{function}@{version} is not in the registry: publish it first",
                code="version_not_found",
            )
        return BundleFacts.from_record(record.to_json())

    async def _fleet(self) -> list[DeviceFacts]:
        views = await asyncio.to_thread(self.fleet.describe)
        return [DeviceFacts.from_view(v) for v in views if not v.get("revoked")]

"""The controller's decisions as one pure function: `step(rollout, event) -> (rollout, actions)`.

The platform's controller (not in this package) owns I/O: it loads the `Rollout` from its store,
feeds it events -- `Start`, a periodic `Tick` with the per-version metrics of the gate devices,
batches of device `Reports`, operator `Pause`/`Resume`/`Abort`, `Supersede` by a newer rollout,
`Join` for devices that entered the target -- stores the new `Rollout` and carries out the
actions (`SetDesired`: write the device's desired document and publish it retained). Everything
here is deterministic in its inputs, time included (`now` comes with the event), so a restarted
platform continues from the stored value.

What one step does, in order:

1. apply the event (reports: seq-ordered, forward-only per states.DEVICE_TRANSITIONS);
2. time out devices that did not finish within `device_timeout_s` of being notified;
3. finish a rollback once no device still owes its confirmation;
4. while running: on a `Tick`, judge the gates (at most every `interval_s`; a failed check
   counts towards `failure_limit`; install success only once the wave has settled) and, once
   the wave has settled and baked for `bake_s`, advance / succeed / pause as inconclusive;
5. while running: notify queued devices of the waves so far within the rate limit and the cap
   on concurrent downloads.

Abort and pause always work (they touch only the stored value), also with devices offline.
A device whose step is withdrawn gets its desired version put back (with the rollback flag, in
case it switched unseen), so a device that returns after an outage finds the *current* desired
version, never a step of a cancelled rollout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from cloud_sync.rollout import waves as wave_math
from cloud_sync.rollout.eligibility import BundleFacts, check_device
from cloud_sync.rollout.gates import evaluate_gates
from cloud_sync.rollout.messages import StatusReport, order
from cloud_sync.rollout.metrics import VersionMetrics
from cloud_sync.rollout.model import DeviceRecord, Rollout
from cloud_sync.rollout.selector import DeviceFacts
from cloud_sync.rollout.states import (
    DOWNLOADING_STATES,
    IN_FLIGHT_STATES,
    PIPELINE,
    SETTLED_STATES,
    TERMINAL_ROLLOUT_STATES,
    UPDATED_STATES,
    DeviceState,
    RolloutState,
    check_rollout_transition,
    device_transition_allowed,
)

D, R = DeviceState, RolloutState

# The rate limit's bucket holds this many seconds of `rate_per_minute`: the controller ticks
# more often than that, so the rate holds, and a wave never starts with more than this burst.
BUCKET_S = 10.0

# ---- events and actions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes. `current`: the new version's metrics summed over `gate_devices(rollout)`;
    `previous`: the version those devices ran before, over the same window (None: unknown)."""

    now: float
    current: VersionMetrics | None = None
    previous: VersionMetrics | None = None


@dataclass(frozen=True, slots=True)
class Reports:
    now: float
    reports: tuple[StatusReport, ...]


@dataclass(frozen=True, slots=True)
class Pause:
    now: float
    reason: str = "paused by operator"


@dataclass(frozen=True, slots=True)
class Resume:
    now: float


@dataclass(frozen=True, slots=True)
class Abort:
    now: float
    reason: str = "aborted by operator"


@dataclass(frozen=True, slots=True)
class Supersede:
    now: float
    by: str  # the id of the rollout that replaces this one


@dataclass(frozen=True, slots=True)
class Join:
    """Devices that entered the target while the rollout runs (enrolled, relabelled).

    Each goes into the wave its slot picks (`waves.wave_of_slot`), so nobody already assigned
    moves; one the platform can prove unfit for `bundle` is recorded `rejected` with its code.
    A finished or failing rollout takes no newcomers: the platform gives them the version of
    the last succeeded rollout instead.
    """

    now: float
    devices: tuple[DeviceFacts, ...]
    bundle: BundleFacts


Event = Start | Tick | Reports | Pause | Resume | Abort | Supersede | Join


@dataclass(frozen=True, slots=True)
class SetDesired:
    """Put `version` of `function` into the device's desired document (None: remove it)."""

    device: str
    function: str
    version: str | None
    rollback: bool
    rollout: str


Action = SetDesired

# ---- the step -----------------------------------------------------------------------------------


def step(r: Rollout, event: Event) -> tuple[Rollout, list[Action]]:
    """Decide what `event` means for rollout `r`: the new value and what to do."""
    actions: list[Action] = []
    now = event.now
    if isinstance(event, Reports):
        r = _apply_reports(r, event)
    elif r.state in TERMINAL_ROLLOUT_STATES:
        return r, []  # only late reports still update the record of a finished rollout
    elif isinstance(event, Start):
        if r.state is R.PENDING:
            r = _to(r, R.RUNNING, now, "", tokens_at=None)
            r = _begin_wave(r, _first_nonempty_wave(r, 0), now)
    elif isinstance(event, Pause):
        if r.state in (R.PENDING, R.RUNNING):
            r = _to(r, R.PAUSED, now, event.reason)
    elif isinstance(event, Resume):
        if r.state is R.PAUSED:
            r = _to(
                r, R.RUNNING, now, "", tokens_at=None,
                settled_at=None, failures=0, last_eval_at=None,
            )  # fmt: skip
            if r.wave_started_at is None:
                r = _begin_wave(r, _first_nonempty_wave(r, 0), now)
    elif isinstance(event, Abort):
        r = _stop(r, now, R.ABORTED, event.reason, "aborted", actions)
    elif isinstance(event, Join):
        if r.state in (R.PENDING, R.RUNNING, R.PAUSED):
            r = _join(r, event)
    elif isinstance(event, Supersede):
        r = _stop(r, now, R.ABORTED, f"superseded by rollout {event.by}", "superseded", actions)
        r = replace(r, superseded_by=event.by)
    if r.state in TERMINAL_ROLLOUT_STATES:
        return r, actions
    r = _timeouts(r, now)
    r = _finish_rollback(r, now)
    if r.state is R.RUNNING and isinstance(event, Tick):
        r = _judge(r, event, actions)
    if r.state is R.RUNNING:
        r = _dispatch(r, now, actions)
    return r, actions


def gate_devices(r: Rollout) -> list[str]:
    """The devices whose new-version metrics the gates judge: updated, in the waves so far."""
    return sorted(rec.device for rec in r.in_waves() if rec.state in UPDATED_STATES)


# ---- pieces -------------------------------------------------------------------------------------


def _to(r: Rollout, state: RolloutState, now: float, reason: str, **fields: object) -> Rollout:
    check_rollout_transition(r.state, state)
    return replace(r, state=state, reason=reason, updated_at=now, **fields)  # type: ignore[arg-type]


def _first_nonempty_wave(r: Rollout, start: int) -> int | None:
    for index in range(start, len(r.spec.waves)):
        if any(rec.wave == index for rec in r.devices.values()):
            return index
    return None


def _begin_wave(r: Rollout, index: int | None, now: float) -> Rollout:
    if index is None:  # no device left in any later wave: the last one passed
        n = len(r.spec.waves)
        return _to(r, R.SUCCEEDED, now, f"all {n} waves passed their gates")
    return replace(
        r, wave=index, wave_started_at=now, settled_at=None, last_eval_at=None, failures=0,
        updated_at=now,
    )  # fmt: skip


def _apply_reports(r: Rollout, event: Reports) -> Rollout:
    changed: dict[str, DeviceRecord] = {}
    for report in event.reports:
        if report.rollout != r.id or report.function != r.spec.function:
            continue  # another rollout's (or an operator pin's) step: not ours to judge
        rec = changed.get(report.device) or r.devices.get(report.device)
        if rec is None or order(rec.seq, report) != "new":
            continue
        new = _device_state_of(rec, report)
        if new is None or not device_transition_allowed(rec.state, new):
            changed[rec.device] = replace(rec, seq=report.seq)  # newer, but not a step forward
            continue
        version = rec.version
        if new in UPDATED_STATES:
            version = report.version
        elif new in (D.ROLLED_BACK, D.FAILED):
            version = rec.previous
        reached = PIPELINE.index(new) if new in PIPELINE else rec.reached
        code = report.code
        if rec.rollback_pending and new is D.FAILED:
            code = "rollback_failed"  # the device's own code is in its report's message
        changed[rec.device] = replace(
            rec, state=new, code=code, version=version, seq=report.seq,
            updated_at=event.now, reached=max(rec.reached, reached),
            rollback_pending=rec.rollback_pending and new not in (D.ROLLED_BACK, D.FAILED),
        )  # fmt: skip
    return r.with_devices(changed, updated_at=event.now) if changed else r


def _join(r: Rollout, event: Join) -> Rollout:
    changed: dict[str, DeviceRecord] = {}
    for device in event.devices:
        if device.id in r.devices or device.id in changed:
            continue
        prev = device.functions.get(r.spec.function)
        unfit = check_device(device, event.bundle)
        if unfit is not None:
            changed[device.id] = DeviceRecord(
                device.id, None, D.REJECTED, unfit.code, prev, prev, updated_at=event.now
            )
            continue
        wave = wave_math.wave_of_slot(wave_math.slot(r.id, device.id), r.spec.waves)
        changed[device.id] = DeviceRecord(device.id, wave, version=prev, previous=prev)
    return r.with_devices(changed, updated_at=event.now) if changed else r


def _device_state_of(rec: DeviceRecord, report: StatusReport) -> DeviceState | None:
    """What a report means for the record; None = nothing (progress of a rollback step)."""
    if report.rollback:
        if report.state in (D.ROLLED_BACK, D.ACTIVE, D.HEALTHY):
            return D.ROLLED_BACK  # back on the previous version
        if report.state in (D.FAILED, D.REJECTED):
            return D.FAILED
        return None
    if rec.rollback_pending and report.state is D.FAILED:
        return D.FAILED
    return report.state


def _timeouts(r: Rollout, now: float) -> Rollout:
    limit = r.spec.device_timeout_s
    changed = {}
    for rec in r.devices.values():
        late = rec.notified_at is not None and now - rec.notified_at >= limit
        if not late:
            continue
        if rec.rollback_pending:
            changed[rec.device] = replace(
                rec, state=D.TIMED_OUT, code="rollback_timeout", rollback_pending=False,
                updated_at=now,
            )  # fmt: skip
        elif rec.state in IN_FLIGHT_STATES:
            changed[rec.device] = replace(rec, state=D.TIMED_OUT, code="timeout", updated_at=now)
    return r.with_devices(changed, updated_at=now) if changed else r


def _finish_rollback(r: Rollout, now: float) -> Rollout:
    if r.state is not R.FAILED or any(rec.rollback_pending for rec in r.devices.values()):
        return r
    bad = sorted(
        rec.device for rec in r.devices.values()
        if rec.code in ("rollback_timeout", "rollback_failed")
    )  # fmt: skip
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        return _to(r, R.ROLLBACK_FAILED, now, f"{r.reason}; rollback failed on {len(bad)} "
                   f"device(s): {shown}")  # fmt: skip
    return _to(r, R.ROLLED_BACK, now, f"{r.reason}; every updated device rolled back")


def _install_counts(r: Rollout) -> tuple[int, int]:
    recs = r.in_waves()
    ok = sum(1 for rec in recs if rec.state in UPDATED_STATES)
    failed = sum(1 for rec in recs if rec.state in (D.FAILED, D.TIMED_OUT))
    return ok, failed


def _judge(r: Rollout, tick: Tick, actions: list[Action]) -> Rollout:
    now, spec = tick.now, r.spec
    settled = all(rec.state in SETTLED_STATES for rec in r.in_waves())
    if settled and r.settled_at is None:
        r = replace(r, settled_at=now)
    baked = settled and r.settled_at is not None and now - r.settled_at >= spec.bake_s
    due = r.last_eval_at is None or now - r.last_eval_at >= spec.interval_s
    if not (due or baked):
        return r
    ok, failed = _install_counts(r)
    current = replace(tick.current or VersionMetrics(), installs_ok=ok, installs_failed=failed)
    gates = spec.effective_gates
    if not settled:  # install success means nothing while installs are still running
        gates = tuple(g for g in gates if g.metric != "install_success")
    verdict = evaluate_gates(gates, current, tick.previous, spec.min_invocations)
    judged = verdict.to_dict()
    r = replace(r, last_eval_at=now, verdict=judged, updated_at=now).with_gate_point(now, judged)
    if verdict.outcome == "fail":
        r = replace(r, failures=r.failures + 1)
        if r.failures > spec.failure_limit:
            return _apply_policy(r, now, f"wave {r.wave + 1} failed: {verdict.reason}", actions)
        return r
    if not baked:
        return r
    if verdict.outcome == "inconclusive":
        return _to(r, R.PAUSED, now, f"wave {r.wave + 1} inconclusive: {verdict.reason}")
    return _begin_wave(r, _first_nonempty_wave(r, r.wave + 1), now)


def _apply_policy(r: Rollout, now: float, reason: str, actions: list[Action]) -> Rollout:
    policy = r.spec.on_failure
    if policy == "pause":
        return _to(r, R.PAUSED, now, reason)
    if policy == "abort":
        return _stop(r, now, R.ABORTED, reason, "aborted", actions)
    return _stop(r, now, R.FAILED, reason, "rollout_failed", actions)


def _stop(
    r: Rollout, now: float, state: RolloutState, reason: str, code: str, actions: list[Action]
) -> Rollout:
    """Withdraw every unfinished step; with state FAILED also roll the updated devices back."""
    rolling_back = state is R.FAILED
    if r.state is R.FAILED:  # an abort during the rollback: stop waiting for confirmations
        changed = {
            rec.device: replace(rec, rollback_pending=False)
            for rec in r.devices.values() if rec.rollback_pending
        }  # fmt: skip
        return _to(r.with_devices(changed), state, now, reason)
    changed = {}
    for rec in r.devices.values():
        new = rec
        if rec.state is D.QUEUED:
            new = replace(rec, state=D.CANCELED, code=code, updated_at=now)
        elif rec.notified_at is None:
            continue  # never touched: nothing to put back
        elif rolling_back and (
            rec.state in UPDATED_STATES
            or (
                rec.state in IN_FLIGHT_STATES | {D.TIMED_OUT}
                and rec.reached >= PIPELINE.index(D.DOWNLOADING)
            )
        ):
            # It runs the version, or may have switched without a report reaching us.
            new = replace(rec, rollback_pending=True, notified_at=now, updated_at=now)
            _restore(r, rec, actions)
        elif rec.state in IN_FLIGHT_STATES or rec.state is D.TIMED_OUT:
            new = replace(rec, state=D.CANCELED, code=code, updated_at=now)
            _restore(r, rec, actions)
        elif rec.state in (D.FAILED, D.REJECTED):
            _restore(r, rec, actions)  # so the device does not try the version again
        if new is not rec:
            changed[rec.device] = new
    return _to(r.with_devices(changed), state, now, reason)


def _restore(r: Rollout, rec: DeviceRecord, actions: list[Action]) -> None:
    actions.append(SetDesired(rec.device, r.spec.function, rec.previous, True, r.id))


def _dispatch(r: Rollout, now: float, actions: list[Action]) -> Rollout:
    spec = r.spec
    queued = sorted(
        (rec for rec in r.in_waves() if rec.state is D.QUEUED),
        key=lambda rec: (rec.wave or 0, rec.device),
    )
    if not queued:
        return r
    # Token bucket of `rate_per_minute`, holding at most BUCKET_S seconds' worth (at least one
    # device): a wave starts at once, and a pause or a bake does not save up a burst.
    capacity = max(1.0, spec.rate_per_minute * BUCKET_S / 60)
    tokens = capacity
    if r.tokens_at is not None:
        tokens = min(capacity, r.tokens + spec.rate_per_minute * max(0.0, now - r.tokens_at) / 60)
    budget = math.floor(tokens + 1e-9)
    if spec.max_concurrent_downloads is not None:
        downloading = sum(1 for rec in r.devices.values() if rec.state in DOWNLOADING_STATES)
        budget = min(budget, spec.max_concurrent_downloads - downloading)
    if budget <= 0:
        return replace(r, tokens=tokens, tokens_at=now)
    changed: Mapping[str, DeviceRecord] = {
        rec.device: replace(rec, state=D.NOTIFIED, notified_at=now, updated_at=now)
        for rec in queued[:budget]
    }
    for rec in queued[:budget]:
        actions.append(SetDesired(rec.device, spec.function, spec.version, False, r.id))
    return r.with_devices(changed, tokens=tokens - len(changed), tokens_at=now, updated_at=now)

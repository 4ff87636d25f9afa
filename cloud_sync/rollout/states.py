"""The named states of a rollout and of each device in it, with the allowed transitions as data.

Rollout::

    pending -> running <-> paused
    running -> succeeded                          every wave passed its gates
    running/paused -> failed -> rolled_back       policy "rollback": updated devices go back
                            \\-> rollback_failed  some device did not confirm its rollback
    running -> paused                             policy "pause", an inconclusive gate, operator
    any non-terminal -> aborted                   policy "abort", operator, `--supersede`

`failed` is the one non-terminal "bad" state: the rollout has failed and its rollback is under
way; it always ends in `rolled_back`, `rollback_failed` or (an operator abort) `aborted`. That is
what keeps "failed but still rolling back" visible instead of a second hidden phase.

Device: the happy path is a forward-only pipeline, and *any forward jump is allowed* because a
status report can be lost (QoS 1 retries, outbox drops under pressure, HTTP fallback): a device
seen `notified` that next reports `healthy` simply skipped reporting the steps in between. Going
backwards along the pipeline is never allowed: that is a stale or reordered report.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from cloud_sync.errors import FieldProblem
from cloud_sync.rollout.errors import TransitionError


class RolloutState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    ABORTED = "aborted"


class DeviceState(StrEnum):
    QUEUED = "queued"  # assigned to a wave, desired not yet changed
    NOTIFIED = "notified"  # desired document now names the new version
    DOWNLOADING = "downloading"
    INSTALLING = "installing"  # verify + unpack
    WARMING = "warming"  # pool of the new version starting
    ACTIVE = "active"  # switched; the agent's health window is running
    HEALTHY = "healthy"  # health window passed
    FAILED = "failed"  # tried and failed; the agent restored the previous version itself
    TIMED_OUT = "timed_out"  # no final report within the per-device timeout (platform decides)
    REJECTED = "rejected"  # refused before changing anything (code says why)
    ROLLED_BACK = "rolled_back"  # returned to its previous version on the platform's request
    CANCELED = "canceled"  # its step was withdrawn (abort, supersede, rollback) before it ran


R, D = RolloutState, DeviceState

ROLLOUT_TRANSITIONS: Mapping[RolloutState, frozenset[RolloutState]] = MappingProxyType(
    {
        R.PENDING: frozenset({R.RUNNING, R.PAUSED, R.FAILED, R.ABORTED}),
        R.RUNNING: frozenset({R.PAUSED, R.SUCCEEDED, R.FAILED, R.ABORTED}),
        R.PAUSED: frozenset({R.RUNNING, R.FAILED, R.ABORTED}),
        R.FAILED: frozenset({R.ROLLED_BACK, R.ROLLBACK_FAILED, R.ABORTED}),
        R.SUCCEEDED: frozenset(),
        R.ROLLED_BACK: frozenset(),
        R.ROLLBACK_FAILED: frozenset(),
        R.ABORTED: frozenset(),
    }
)
TERMINAL_ROLLOUT_STATES = frozenset(s for s, nxt in ROLLOUT_TRANSITIONS.items() if not nxt)
# "One active rollout per function": every state that still owns the function's desired version.
ACTIVE_ROLLOUT_STATES = frozenset(RolloutState) - TERMINAL_ROLLOUT_STATES

# The forward pipeline of one device's update.
PIPELINE: tuple[DeviceState, ...] = (
    D.QUEUED,
    D.NOTIFIED,
    D.DOWNLOADING,
    D.INSTALLING,
    D.WARMING,
    D.ACTIVE,
    D.HEALTHY,
)
# Still waiting for the device to finish: the per-device timeout runs in these.
IN_FLIGHT_STATES = frozenset(PIPELINE[1:5])
# Counted against `max_concurrent_downloads`: notified devices start downloading by themselves.
DOWNLOADING_STATES = frozenset({D.NOTIFIED, D.DOWNLOADING})
# The new version runs on the device (installed successfully).
UPDATED_STATES = frozenset({D.ACTIVE, D.HEALTHY})
# Nothing more will happen to this device in this wave unless the platform acts.
SETTLED_STATES = frozenset(DeviceState) - frozenset(PIPELINE[:5])


def _device_transitions() -> Mapping[DeviceState, frozenset[DeviceState]]:
    out: dict[DeviceState, frozenset[DeviceState]] = {}
    for i, state in enumerate(PIPELINE[:-1]):
        ends = {D.FAILED, D.TIMED_OUT, D.REJECTED, D.CANCELED}
        if state is not D.QUEUED:
            # The desired document changed; the device may have switched unseen: it can be
            # rolled back (a lost `active` report) from here on.
            ends.add(D.ROLLED_BACK)
        out[state] = frozenset(PIPELINE[i + 1 :]) | ends
    # A crash after the health window; or a rollback the device did not confirm in time.
    out[D.HEALTHY] = frozenset({D.FAILED, D.ROLLED_BACK, D.TIMED_OUT})
    out[D.ACTIVE] = out[D.ACTIVE] - {D.CANCELED}  # it runs the version: roll back, not cancel
    # A timed-out device was only slow or offline: its late report still counts.
    out[D.TIMED_OUT] = frozenset(PIPELINE[2:]) | {D.FAILED, D.REJECTED, D.ROLLED_BACK, D.CANCELED}
    out[D.FAILED] = frozenset({D.ROLLED_BACK})  # the platform's rollback confirmed it
    out[D.REJECTED] = frozenset()
    out[D.ROLLED_BACK] = frozenset()
    out[D.CANCELED] = frozenset()
    return MappingProxyType(out)


DEVICE_TRANSITIONS: Mapping[DeviceState, frozenset[DeviceState]] = _device_transitions()

# Stable codes a device gives with `rejected`: it refused before changing anything.
REJECT_CODES = frozenset(
    {
        "wrong_arch",  # the bundle has no artifact for this device's architecture / libc
        "no_runtime",  # the device cannot run the bundle's runtime (no node, ...)
        "insufficient_memory",  # the manifest's memory limit exceeds the device's memory
        "disk_full",  # not enough space to download and unpack
        "signature",  # the bundle signature does not verify
        "digest_mismatch",  # downloaded bytes do not match the registry's digest
        "bad_bundle",  # the bundle or manifest is malformed, unsafe to unpack
        "not_found",  # the registry does not have the version (deleted, typo)
        "downgrade_refused",  # a lower version without the rollback flag
    }
)
# Stable codes with `failed` and `timed_out`: it tried and the new version did not hold.
FAILURE_CODES = frozenset(
    {
        "download_failed",
        "install_failed",
        "warm_failed",  # the pool of the new version did not start
        "worker_start_failed",
        "crash_loop",  # health window: workers keep dying
        "error_rate",  # health window: too many errors
        "health_failed",
        "timeout",  # the platform's per-device timeout
        "rollback_failed",  # the device could not go back to its previous version
        "rollback_timeout",  # the platform's timeout on a rollback the device did not confirm
        "interrupted",  # the agent restarted mid-step and could not finish it
    }
)
# Codes the platform gives with `canceled`.
CANCEL_CODES = frozenset({"aborted", "superseded", "rollout_failed"})


def check_rollout_transition(old: RolloutState, new: RolloutState) -> None:
    """Raise `TransitionError` unless `old -> new` is in `ROLLOUT_TRANSITIONS`."""
    if new not in ROLLOUT_TRANSITIONS[old]:
        raise TransitionError(
            f"rollout cannot go from {old.value} to {new.value}",
            [
                FieldProblem(
                    "state", f"allowed from {old.value}: {_names(ROLLOUT_TRANSITIONS[old])}"
                )
            ],
        )


def device_transition_allowed(old: DeviceState, new: DeviceState) -> bool:
    return new in DEVICE_TRANSITIONS[old]


def _names(states: frozenset[RolloutState] | frozenset[DeviceState]) -> str:
    return ", ".join(sorted(s.value for s in states)) or "(none: terminal)"

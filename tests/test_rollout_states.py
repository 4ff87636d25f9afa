"""The state machines as data: named states, allowed transitions, stable codes."""

from __future__ import annotations

import pytest

from cloud_sync.rollout.errors import TransitionError
from cloud_sync.rollout.states import (
    ACTIVE_ROLLOUT_STATES,
    CANCEL_CODES,
    DEVICE_TRANSITIONS,
    FAILURE_CODES,
    PIPELINE,
    REJECT_CODES,
    ROLLOUT_TRANSITIONS,
    TERMINAL_ROLLOUT_STATES,
    DeviceState,
    RolloutState,
    check_rollout_transition,
    device_transition_allowed,
)

D, R = DeviceState, RolloutState


def test_the_named_states_of_the_issue() -> None:
    assert [s.value for s in RolloutState] == [
        "pending", "running", "paused", "succeeded", "failed", "rolled_back", "rollback_failed",
        "aborted",
    ]  # fmt: skip
    assert [s.value for s in DeviceState] == [
        "queued", "notified", "downloading", "installing", "warming", "active", "healthy",
        "failed", "timed_out", "rejected", "rolled_back", "canceled",
    ]  # fmt: skip
    assert {"wrong_arch", "signature", "no_runtime", "disk_full"} <= REJECT_CODES
    assert not (REJECT_CODES & FAILURE_CODES) and not (REJECT_CODES & CANCEL_CODES)


def test_every_state_has_a_row_and_terminal_states_lead_nowhere() -> None:
    assert set(ROLLOUT_TRANSITIONS) == set(RolloutState)
    assert set(DEVICE_TRANSITIONS) == set(DeviceState)
    assert {R.SUCCEEDED, R.ROLLED_BACK, R.ROLLBACK_FAILED, R.ABORTED} == TERMINAL_ROLLOUT_STATES
    assert R.FAILED in ACTIVE_ROLLOUT_STATES  # still rolling back: the function is still owned
    for state in ACTIVE_ROLLOUT_STATES:
        assert R.ABORTED in ROLLOUT_TRANSITIONS[state], "abort must always work"
    # Every terminal state is reachable from pending.
    seen, frontier = {R.PENDING}, [R.PENDING]
    while frontier:
        for nxt in ROLLOUT_TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(RolloutState)


def test_rollout_transition_errors_say_what_is_allowed() -> None:
    check_rollout_transition(R.RUNNING, R.PAUSED)
    with pytest.raises(TransitionError) as info:
        check_rollout_transition(R.SUCCEEDED, R.RUNNING)
    assert info.value.code == "bad_transition"
    assert "terminal" in str(info.value)
    with pytest.raises(TransitionError, match="rolled_back"):
        check_rollout_transition(R.FAILED, R.RUNNING)


def test_device_pipeline_moves_forward_only_and_may_skip_lost_steps() -> None:
    for i, old in enumerate(PIPELINE):
        for j, new in enumerate(PIPELINE):
            assert device_transition_allowed(old, new) is (j > i), (old, new)
    assert device_transition_allowed(D.NOTIFIED, D.HEALTHY)  # reports in between were lost
    assert not device_transition_allowed(D.QUEUED, D.ROLLED_BACK)  # never touched
    assert device_transition_allowed(D.TIMED_OUT, D.HEALTHY)  # a late report still counts
    assert not device_transition_allowed(D.TIMED_OUT, D.NOTIFIED)
    assert device_transition_allowed(D.HEALTHY, D.ROLLED_BACK)
    assert not device_transition_allowed(D.ACTIVE, D.CANCELED)  # it runs it: roll back instead
    for end in (D.REJECTED, D.ROLLED_BACK, D.CANCELED):
        assert DEVICE_TRANSITIONS[end] == frozenset()

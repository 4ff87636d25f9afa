"""The `--watch` view rendered from a real controller state."""

from __future__ import annotations

from cloud_sync.rollout.controller import Reports, Start, Tick, step
from cloud_sync.rollout.messages import StatusReport
from cloud_sync.rollout.metrics import VersionMetrics
from cloud_sync.rollout.render import bar, render
from cloud_sync.rollout.states import DeviceState
from tests.test_rollout_controller import make, notified


def test_bar() -> None:
    assert bar(0, 10, 10) == "[----------]"
    assert bar(5, 10, 10) == "[#####-----]"
    assert bar(10, 10, 10) == "[##########]"
    assert bar(0, 0, 4) == "[----]"


def test_render_shows_waves_gates_and_counts() -> None:
    r, acts = step(make(20, gates=["error_rate<=0.05"], min_invocations=10), Start(0.0))
    first = notified(acts)
    rep = StatusReport(first[0], "resize", "r-1", "1.4.0", DeviceState.HEALTHY, 1, 0.0)
    r, _ = step(r, Reports(1.0, (rep,)))
    r, _ = step(r, Tick(2.0, VersionMetrics(invocations=100, errors=9)))
    text = render(r.status_view())
    lines = text.splitlines()
    assert lines[0] == "rollout r-1  resize@1.4.0  failed  wave 1/3"
    assert "reason: wave 1 failed: error_rate=0.09" in lines[1]
    wave1 = next(line for line in lines if "wave 1 " in line and "%" in line)
    # The healthy device is being rolled back; the merely notified one was canceled.
    assert wave1.startswith(">") and "2/2" in wave1 and "canceled 1, healthy 1" in wave1
    assert "error_rate<=0.05" in text and "0.09" in text and "fail" in text
    assert lines[-1].startswith("  devices: ") and "canceled" in lines[-1]

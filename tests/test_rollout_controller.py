"""The pure controller: `step(rollout, event)` through whole rollouts, faults and restarts."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cloud_sync.rollout.controller import (
    Abort,
    Join,
    Pause,
    Reports,
    Resume,
    SetDesired,
    Start,
    Supersede,
    Tick,
    gate_devices,
    step,
)
from cloud_sync.rollout.eligibility import BundleFacts
from cloud_sync.rollout.errors import RolloutError
from cloud_sync.rollout.messages import StatusReport
from cloud_sync.rollout.metrics import VersionMetrics
from cloud_sync.rollout.model import Rollout, new_rollout, plan
from cloud_sync.rollout.selector import DeviceFacts
from cloud_sync.rollout.spec import RolloutSpec
from cloud_sync.rollout.states import DEVICE_TRANSITIONS, DeviceState, RolloutState
from hardware.profile import DeviceProfile

D, R = DeviceState, RolloutState
BUNDLE = BundleFacts("resize", "1.4.0", "go", ("linux-aarch64", "linux-x86_64"))


def profile(arch: str) -> dict[str, Any]:
    return DeviceProfile(
        arch=arch, libc="glibc", libc_version="2.36", cpu_count=4, cpu_model="",
        memory_total_mb=2048, memory_available_mb=1024, disk_total_mb=32_000,
        disk_free_mb=10_000, data_dir="/d", board_vendor="", board_model="", kernel="6.1",
        hostname="h",
    ).to_dict()  # fmt: skip


def fleet(n: int, arch: str = "aarch64", prefix: str = "edge") -> list[DeviceFacts]:
    return [
        DeviceFacts(f"{prefix}-{i:03d}", {"group": "west"}, profile(arch), None,
                    {"resize": "1.3.0"})
        for i in range(n)
    ]  # fmt: skip


def make(n: int = 20, devices: list[DeviceFacts] | None = None, **spec: Any) -> Rollout:
    data = {"function": "resize", "version": "1.4.0", "target": "group=west",
            "waves": "10,50,100", "bake_s": 60, "rate_per_minute": 100_000, **spec}  # fmt: skip
    s = RolloutSpec.from_dict(data)
    return new_rollout(s, plan("r-1", s, devices or fleet(n), BUNDLE), now=0.0)


class Fleet:
    """Plays the devices: answers SetDesired with status reports, with a per-device seq."""

    def __init__(self) -> None:
        self.seq: dict[str, int] = {}

    def report(
        self, device: str, state: DeviceState, *, rollout: str = "r-1", **kw: Any
    ) -> StatusReport:
        self.seq[device] = self.seq.get(device, 0) + 1
        fields: dict[str, Any] = {"version": "1.4.0", "previous": "1.3.0", **kw}
        if state in (D.FAILED, D.REJECTED, D.CANCELED):
            fields.setdefault("code", "crash_loop" if state is D.FAILED else "wrong_arch")
        return StatusReport(device, "resize", rollout, state=state, seq=self.seq[device],
                            at=0.0, **fields)  # fmt: skip


def notified(actions: list[SetDesired]) -> list[str]:
    return sorted(a.device for a in actions if not a.rollback)


def states(r: Rollout) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in r.devices.values():
        out[rec.state.value] = out.get(rec.state.value, 0) + 1
    return out


def settle(
    r: Rollout, f: Fleet, devices: list[str], now: float, state: DeviceState = D.HEALTHY
) -> Rollout:
    r, _ = step(r, Reports(now, tuple(f.report(d, state) for d in devices)))
    return r


def test_happy_path_three_waves_to_succeeded() -> None:
    f = Fleet()
    r = make(20)
    assert r.state is R.PENDING and states(r) == {"queued": 20}
    r, acts = step(r, Start(0.0))
    assert r.state is R.RUNNING and r.wave == 0
    first = notified(acts)
    assert len(first) == 2  # ceil(10% of 20)
    assert all(a.version == "1.4.0" and a.function == "resize" and a.rollout == "r-1" for a in acts)
    r = settle(r, f, first, 5.0)
    r, acts = step(r, Tick(10.0))
    assert acts == [] and r.wave == 0 and r.settled_at == 10.0  # baking
    r, acts = step(r, Tick(70.0))
    assert r.wave == 1 and len(notified(acts)) == 8  # up to 50%
    assert r.verdict is not None and r.verdict["outcome"] == "pass"
    r = settle(r, f, notified(acts), 75.0)
    r, _ = step(r, Tick(80.0))
    r, acts = step(r, Tick(140.0))
    assert r.wave == 2 and len(notified(acts)) == 10
    r = settle(r, f, notified(acts), 145.0)
    r, _ = step(r, Tick(150.0))
    r, acts = step(r, Tick(210.0))
    assert r.state is R.SUCCEEDED and acts == []
    assert "all 3 waves passed" in r.reason
    assert states(r) == {"healthy": 20}
    assert {rec.version for rec in r.devices.values()} == {"1.4.0"}
    # Nothing moves a finished rollout.
    assert step(r, Abort(300.0)) == (r, [])


def test_lost_intermediate_reports_and_duplicates_and_reordering() -> None:
    f = Fleet()
    r, acts = step(make(10, waves="100"), Start(0.0))
    dev = notified(acts)[0]
    downloading = f.report(dev, D.DOWNLOADING)
    healthy = f.report(dev, D.HEALTHY)
    r, _ = step(r, Reports(1.0, (healthy,)))  # arrives first; downloading was delayed
    assert r.devices[dev].state is D.HEALTHY
    r, _ = step(r, Reports(2.0, (downloading, healthy)))  # late and duplicate: ignored
    assert r.devices[dev].state is D.HEALTHY and r.devices[dev].seq == healthy.seq
    other = f.report(dev, D.HEALTHY, rollout="r-other")
    r2, _ = step(r, Reports(3.0, (other,)))
    assert r2.devices[dev].seq == healthy.seq  # another rollout's report is not ours
    stranger = StatusReport("not-in-target", "resize", "r-1", "1.4.0", D.HEALTHY, 1, 0.0)
    assert step(r, Reports(3.0, (stranger,)))[0].devices == r.devices


def test_rate_limit_and_concurrent_download_cap() -> None:
    f = Fleet()
    r = make(40, waves="100", rate_per_minute=60, bake_s=0)
    r, acts = step(r, Start(0.0))
    assert len(notified(acts)) == 10  # a burst of 10 s worth, then one per second
    r, acts = step(r, Tick(5.0))
    assert len(notified(acts)) == 5
    r, acts = step(r, Tick(5.5))
    assert acts == []  # half a token
    r, acts = step(r, Tick(6.0))
    assert len(notified(acts)) == 1
    r, acts = step(r, Tick(600.0))
    assert len(notified(acts)) == 10  # ten minutes idle save up no more than the bucket
    capped = make(30, waves="100", max_concurrent_downloads=3)
    capped, acts = step(capped, Start(0.0))
    first = notified(acts)
    assert len(first) == 3
    capped, acts = step(capped, Tick(1.0))
    assert acts == []  # all three still downloading
    capped, acts = step(capped, Reports(2.0, (f.report(first[0], D.INSTALLING),)))
    assert len(notified(acts)) == 1  # installing no longer counts as a download


def test_device_timeout_then_late_report_still_counts() -> None:
    f = Fleet()
    r, acts = step(make(10, waves="100", device_timeout_s=100, bake_s=0), Start(0.0))
    devices = notified(acts)
    r = settle(r, f, devices[1:], 10.0)
    r, _ = step(r, Tick(99.0))
    assert r.devices[devices[0]].state is D.NOTIFIED and r.state is R.RUNNING
    r, _ = step(r, Tick(100.0))
    rec = r.devices[devices[0]]
    assert (rec.state, rec.code) == (D.TIMED_OUT, "timeout")
    # 9 of 10 installed: install_success 0.9 passes the default gate.
    r, _ = step(r, Tick(101.0))
    assert r.state is R.SUCCEEDED
    r, _ = step(r, Reports(500.0, (f.report(devices[0], D.HEALTHY),)))
    assert r.devices[devices[0]].state is D.HEALTHY  # the late device is recorded as it is


def test_crash_gate_rolls_the_fleet_back_and_names_the_gate() -> None:
    f = Fleet()
    r = make(20, gates=["crash_count<=0"], min_invocations=10)
    r, acts = step(r, Start(0.0))
    wave0 = notified(acts)
    r = settle(r, f, wave0, 5.0)
    assert gate_devices(r) == wave0
    r, _ = step(r, Tick(10.0, VersionMetrics(invocations=50)))
    r, acts = step(r, Tick(70.0, VersionMetrics(invocations=100)))
    assert r.wave == 1
    wave1 = notified(acts)
    r = settle(r, f, wave1[:3], 75.0)
    r = settle(r, f, wave1[3:5], 75.0, D.DOWNLOADING)
    # Crashes appear: the gate fails before the wave settles, the policy is rollback.
    r, acts = step(r, Tick(80.0, VersionMetrics(invocations=40, crashes=3)))
    assert r.state is R.FAILED
    assert "crash_count=3" in r.reason and "crash_count<=0" in r.reason
    restored = {a.device for a in acts}
    assert all(a.rollback and a.version == "1.3.0" for a in acts)
    assert restored == set(wave0) | set(wave1)  # updated, downloading and merely notified
    pending = {d for d, rec in r.devices.items() if rec.rollback_pending}
    assert pending == set(wave0) | set(wave1[:5])
    assert {r.devices[d].state for d in wave1[5:]} == {D.CANCELED}
    assert all(rec.state is D.CANCELED for rec in r.devices.values() if rec.wave == 2)
    r, _ = step(r, Tick(85.0))
    assert r.state is R.FAILED  # waiting for confirmations
    back = tuple(f.report(d, D.ROLLED_BACK, rollback=True, version="1.3.0") for d in pending)
    r, _ = step(r, Reports(90.0, back))
    assert r.state is R.ROLLED_BACK
    assert "every updated device rolled back" in r.reason and "crash_count" in r.reason
    assert {r.devices[d].version for d in pending} == {"1.3.0"}


def test_rollback_not_confirmed_in_time_is_rollback_failed() -> None:
    f = Fleet()
    r = make(10, waves="100", gates=["error_rate<=0.05"], min_invocations=10,
             device_timeout_s=50)  # fmt: skip
    r, acts = step(r, Start(0.0))
    r = settle(r, f, notified(acts), 5.0)
    r, acts = step(r, Tick(10.0, VersionMetrics(invocations=1000, errors=500)))
    assert r.state is R.FAILED and "error_rate=0.5" in r.reason
    silent = sorted(r.devices)[0]
    confirms = tuple(
        f.report(d, D.ROLLED_BACK, rollback=True, version="1.3.0") for d in sorted(r.devices)[1:]
    )
    r, _ = step(r, Reports(20.0, confirms))
    assert r.state is R.FAILED
    r, _ = step(r, Tick(61.0))
    assert r.state is R.ROLLBACK_FAILED
    assert silent in r.reason and r.devices[silent].code == "rollback_timeout"


def test_inconclusive_pauses_with_the_reason_then_resume_continues() -> None:
    f = Fleet()
    r = make(20, gates=["error_rate<=0.05"], min_invocations=100)
    r, acts = step(r, Start(0.0))
    r = settle(r, f, notified(acts), 5.0)
    r, _ = step(r, Tick(10.0, VersionMetrics(invocations=7)))
    r, acts = step(r, Tick(70.0, VersionMetrics(invocations=12)))
    assert r.state is R.PAUSED and acts == []
    assert "inconclusive" in r.reason and "only 12 of 100 invocations" in r.reason
    r, acts = step(r, Tick(80.0, VersionMetrics(invocations=500)))
    assert r.state is R.PAUSED and acts == []  # paused means no judging, no dispatch
    r, _ = step(r, Resume(90.0))
    assert r.state is R.RUNNING and r.reason == ""
    r, _ = step(r, Tick(91.0, VersionMetrics(invocations=500)))
    r, acts = step(r, Tick(151.0, VersionMetrics(invocations=800)))
    assert r.wave == 1 and len(notified(acts)) == 8


def test_failure_limit_tolerates_failed_checks() -> None:
    f = Fleet()
    r = make(10, waves="100", gates=["error_rate<=0.05"], min_invocations=10, failure_limit=1,
             interval_s=10, bake_s=100)  # fmt: skip
    r, acts = step(r, Start(0.0))
    r = settle(r, f, notified(acts), 1.0)
    bad = VersionMetrics(invocations=100, errors=50)
    r, _ = step(r, Tick(2.0, bad))
    assert r.state is R.RUNNING and r.failures == 1
    r, _ = step(r, Tick(5.0, bad))  # not due yet: not a second check
    assert r.failures == 1
    r, _ = step(r, Tick(12.0, bad))
    assert r.state is R.FAILED and r.failures == 2


@pytest.mark.parametrize("policy", ["pause", "abort"])
def test_pause_and_abort_policies_leave_devices_as_they_are(policy: str) -> None:
    f = Fleet()
    r = make(20, gates=["crash_count<=0"], on_failure=policy)
    r, acts = step(r, Start(0.0))
    wave0 = notified(acts)
    r = settle(r, f, wave0[:1], 5.0)
    r = settle(r, f, wave0[1:], 5.0, D.DOWNLOADING)
    r, acts = step(r, Tick(10.0, VersionMetrics(invocations=5, crashes=1)))
    assert "crash_count=1" in r.reason
    assert r.devices[wave0[0]].state is D.HEALTHY  # the updated device keeps the version
    if policy == "pause":
        assert r.state is R.PAUSED and acts == []
        assert r.devices[wave0[1]].state is D.DOWNLOADING
    else:
        assert r.state is R.ABORTED
        # The unfinished step is withdrawn: its desired version goes back.
        assert [(a.device, a.version, a.rollback) for a in acts] == [(wave0[1], "1.3.0", True)]
        assert r.devices[wave0[1]].state is D.CANCELED


def test_operator_pause_abort_while_downloading_and_supersede() -> None:
    f = Fleet()
    r, acts = step(make(20, waves="50,100"), Start(0.0))
    wave0 = notified(acts)
    r = settle(r, f, wave0[:4], 1.0)
    r = settle(r, f, wave0[4:], 1.0, D.DOWNLOADING)
    paused, acts = step(r, Pause(2.0))
    assert paused.state is R.PAUSED and paused.reason == "paused by operator" and acts == []
    aborted, acts = step(paused, Abort(3.0))
    assert aborted.state is R.ABORTED and aborted.reason == "aborted by operator"
    assert sorted(a.device for a in acts) == sorted(wave0[4:])
    assert {aborted.devices[d].state for d in wave0[4:]} == {D.CANCELED}
    assert {aborted.devices[d].state for d in wave0[:4]} == {D.HEALTHY}
    assert {rec.code for rec in aborted.devices.values() if rec.wave == 1} == {"aborted"}
    sup, acts = step(r, Supersede(3.0, "r-2"))
    assert sup.state is R.ABORTED and sup.superseded_by == "r-2"
    assert "superseded by rollout r-2" in sup.reason
    assert {rec.code for rec in sup.devices.values() if rec.state is D.CANCELED} == {"superseded"}


def test_abort_during_rollback_stops_waiting() -> None:
    f = Fleet()
    r = make(10, waves="100", gates=["crash_count<=0"])
    r, acts = step(r, Start(0.0))
    r = settle(r, f, notified(acts), 1.0)
    r, _ = step(r, Tick(2.0, VersionMetrics(invocations=1, crashes=1)))
    assert r.state is R.FAILED
    r, acts = step(r, Abort(3.0))
    assert r.state is R.ABORTED and acts == []
    assert not any(rec.rollback_pending for rec in r.devices.values())


def test_wrong_arch_devices_are_rejected_and_the_rest_proceed() -> None:
    f = Fleet()
    arm_only = BundleFacts("resize", "1.4.0", "go", ("linux-aarch64",))
    devices = fleet(8) + fleet(4, "armv7", "pi")
    s = RolloutSpec.from_dict({"function": "resize", "version": "1.4.0", "target": "*",
                               "waves": "100", "bake_s": 0})  # fmt: skip
    p = plan("r-1", s, devices, arm_only)
    assert sorted(i.device for i in p.ineligible) == [f"pi-{i:03d}" for i in range(4)]
    assert {i.code for i in p.ineligible} == {"wrong_arch"}
    assert sum(len(w) for w in p.waves) == 8 and p.to_dict()["ineligible"][0]["code"]
    r, acts = step(new_rollout(s, p, 0.0), Start(0.0))
    assert len(acts) == 8
    # One device rejects by itself too (the platform could not tell): it does not count.
    devs = notified(acts)
    r = settle(r, f, devs[:7], 1.0)
    r, _ = step(r, Reports(1.0, (f.report(devs[7], D.REJECTED, code="signature"),)))
    r, _ = step(r, Tick(2.0))
    assert r.state is R.SUCCEEDED
    view = r.status_view()
    assert view["counts"] == {"healthy": 7, "rejected": 5}
    assert {d["code"] for d in view["devices"] if d["state"] == "rejected"} == {
        "wrong_arch", "signature",
    }  # fmt: skip


def test_empty_target_is_refused_with_the_reasons() -> None:
    s = RolloutSpec.from_dict({"function": "resize", "version": "1.4.0", "target": "*"})
    p = plan("r-1", s, fleet(3, "armv7"), BundleFacts("resize", "1.4.0", "go", ("linux-x86_64",)))
    with pytest.raises(RolloutError) as info:
        new_rollout(s, p, 0.0)
    assert info.value.code == "empty_target" and "wrong_arch" in str(info.value)


def test_restart_from_the_stored_form_continues_identically() -> None:
    f = Fleet()
    r, acts = step(make(40, gates=["error_rate<=0.05"], min_invocations=10), Start(0.0))
    r = settle(r, f, notified(acts)[:3], 1.0)
    r, _ = step(r, Tick(2.0, VersionMetrics(invocations=20)))
    stored = r.to_dict()
    import json

    again = Rollout.from_dict(json.loads(json.dumps(stored)))
    assert again == r
    events = [
        Reports(3.0, (f.report(notified(acts)[3], D.HEALTHY),)),
        Tick(4.0, VersionMetrics(invocations=50)),
        Tick(70.0, VersionMetrics(invocations=90)),
    ]
    a, b = r, again
    for ev in events:
        a, acts_a = step(a, ev)
        b, acts_b = step(b, ev)
        assert acts_a == acts_b and a == b
    assert a.wave == 1


def test_status_view_shape() -> None:
    r, _ = step(make(20), Start(0.0))
    view = r.status_view()
    for key in ("id", "function", "version", "state", "reason", "waves", "devices"):
        assert key in view
    assert view["state"] == "running"
    assert [w["devices"] for w in view["waves"]] == [2, 8, 10]
    assert view["waves"][0]["states"] == {"notified": 2}
    assert set(view["devices"][0]) == {"device", "wave", "state", "version", "code"}


def test_random_event_sequences_keep_every_invariant() -> None:
    """Property-like: seeded random reports/ticks/pauses never break the state machines."""
    rng = random.Random(20261202)
    reportable = [D.DOWNLOADING, D.INSTALLING, D.WARMING, D.ACTIVE, D.HEALTHY, D.FAILED,
                  D.REJECTED, D.ROLLED_BACK]  # fmt: skip
    for run in range(30):  # bounded: 30 rollouts x 150 events
        f = Fleet()
        policy = rng.choice(["rollback", "pause", "abort"])
        r = make(
            25, gates=["crash_count<=2", "error_rate<=0.2"], min_invocations=5, bake_s=5,
            device_timeout_s=20, on_failure=policy,
        )  # fmt: skip
        r, _ = step(r, Start(0.0))
        now = 0.0
        for _ in range(150):
            now += rng.uniform(0, 3)
            before = {d: rec.state for d, rec in r.devices.items()}
            roll = rng.random()
            if roll < 0.5:
                dev = rng.choice(sorted(r.devices))
                state = rng.choice(reportable)
                rep = f.report(dev, state, rollback=rng.random() < 0.2)
                ev: Any = Reports(now, (rep,))
            elif roll < 0.9:
                m = VersionMetrics(
                    invocations=rng.randint(0, 50), errors=rng.randint(0, 3),
                    crashes=rng.randint(0, 1),
                )  # fmt: skip
                ev = Tick(now, m)
            elif roll < 0.95:
                ev = Pause(now)
            else:
                ev = Resume(now)
            r, acts = step(r, ev)
            for d, rec in r.devices.items():
                old = before[d]
                assert rec.state is old or rec.state in DEVICE_TRANSITIONS[old], (run, old, rec)
            assert all(isinstance(a, SetDesired) and a.rollout == "r-1" for a in acts)
        final, _ = step(r, Abort(now + 1))
        assert final.state in (R.ABORTED, R.SUCCEEDED, R.ROLLED_BACK, R.ROLLBACK_FAILED)
        assert not any(rec.rollback_pending for rec in final.devices.values()) or (
            final.state is not R.ABORTED
        )


def test_devices_joining_mid_rollout_go_by_their_slot() -> None:
    from cloud_sync.rollout import waves

    r, _ = step(make(20, waves="50,100"), Start(0.0))
    newcomers = fleet(40, prefix="late")
    slots = {d.id: waves.wave_of_slot(waves.slot("r-1", d.id), (50.0, 100.0)) for d in newcomers}
    early = sorted(d for d, w in slots.items() if w == 0)
    assert early and len(early) < 40  # the hash splits forty ids
    unfit = DeviceFacts("late-x86", {"group": "west"}, profile("armv7"))
    r, acts = step(r, Join(1.0, (*newcomers, unfit, fleet(1)[0]), BUNDLE))
    assert r.devices["late-x86"].state is D.REJECTED and r.devices["late-x86"].code == "wrong_arch"
    assert notified(acts) == early  # wave 0 is running: its newcomers go now
    assert all(r.devices[d].state is D.QUEUED for d, w in slots.items() if w == 1)
    assert r.devices["edge-000"].wave is not None  # already there: not moved
    done, _ = step(r, Abort(2.0))
    assert step(done, Join(3.0, tuple(fleet(2, prefix="later")), BUNDLE))[0] == done


def test_one_active_rollout_per_function() -> None:
    from cloud_sync.rollout.model import admit

    running, _ = step(make(5), Start(0.0))
    assert admit("resize", [], supersede=False) == []
    with pytest.raises(RolloutError) as info:
        admit("resize", [running], supersede=False)
    assert info.value.code == "rollout_active" and "r-1" in str(info.value)
    assert "--supersede" in str(info.value)
    assert admit("resize", [running], supersede=True) == ["r-1"]
    assert admit("other", [running], supersede=False) == []
    finished, _ = step(running, Abort(1.0))
    assert admit("resize", [finished], supersede=False) == []


def test_every_gate_evaluation_is_kept_in_the_history_bounded_and_stored() -> None:
    from cloud_sync.rollout.model import GATE_HISTORY_MAX

    f = Fleet()
    r, acts = step(make(20, gates=["error_rate<=0.05"], min_invocations=10), Start(0.0))
    r = settle(r, f, notified(acts), 1.0)
    assert r.gate_history == ()
    r, _ = step(r, Tick(2.0, VersionMetrics(invocations=100, errors=1)))
    r, _ = step(r, Tick(40.0, VersionMetrics(invocations=200, errors=4)))
    points = [(p["t"], p["wave"], [(g["gate"], g["value"], g["bound"], g["outcome"])
                                   for g in p["gates"]]) for p in r.gate_history]  # fmt: skip
    # The implicit install-success gate is judged too once the wave has settled.
    assert points[0] == (
        2.0,
        0,
        [("install_success>=0.9", 1.0, 0.9, "pass"), ("error_rate<=0.05", 0.01, 0.05, "pass")],
    )
    assert points[1][0] == 40.0 and points[1][2][1][1] == 0.02
    # The stored form carries it; a restart continues the same history.
    again = Rollout.from_dict(r.to_dict())
    assert again.gate_history == r.gate_history
    assert r.status_view()["gate_history"] == [dict(p) for p in r.gate_history]
    # Bounded: only the newest GATE_HISTORY_MAX points are kept.
    for i in range(GATE_HISTORY_MAX + 5):
        r = r.with_gate_point(100.0 + i, {"gates": [{"gate": "g", "value": 0.0, "bound": 1.0}]})
    assert len(r.gate_history) == GATE_HISTORY_MAX
    assert r.gate_history[-1]["t"] == 100.0 + GATE_HISTORY_MAX + 4

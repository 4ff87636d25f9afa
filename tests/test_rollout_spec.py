"""Rollout spec: defaults, validation of every field at once, stable codes, round trip."""

from __future__ import annotations

from typing import Any

import pytest

from cloud_sync.errors import CloudSyncError
from cloud_sync.rollout.errors import GateError, SelectorError, SpecError
from cloud_sync.rollout.spec import DEFAULT_INSTALL_GATE, RolloutSpec, parse_waves

BASE: dict[str, Any] = {"function": "resize", "version": "1.4.0", "target": "group=west"}


def test_defaults_and_round_trip() -> None:
    spec = RolloutSpec.from_dict(BASE)
    assert spec.waves == (1.0, 10.0, 50.0, 100.0)
    assert spec.on_failure == "rollback"
    assert spec.rate_per_minute == 1000
    assert spec.max_concurrent_downloads is None
    assert [g.text for g in spec.effective_gates] == [DEFAULT_INSTALL_GATE]
    again = RolloutSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_full_spec_round_trips_and_keeps_given_install_gate() -> None:
    data = {
        **BASE,
        "target": "group=west,arch=aarch64,memory_mb>=1024",
        "waves": "10,50,100",
        "rate_per_minute": 60,
        "max_concurrent_downloads": 5,
        "bake_s": 0,
        "device_timeout_s": 120,
        "gates": ["error_rate <= max(1%, 2*previous)", "p95_ms<=200", "install_success>=0.5"],
        "min_invocations": 20,
        "failure_limit": 2,
        "interval_s": 5,
        "on_failure": "pause",
    }
    spec = RolloutSpec.from_dict(data)
    assert spec.waves == (10.0, 50.0, 100.0)
    assert spec.max_concurrent_downloads == 5
    assert str(spec.target) == "group=west,arch=aarch64,memory_mb>=1024"
    assert next(g.text for g in spec.gates) == "error_rate<=max(1%,2*previous)"
    # An explicit install gate replaces the default one instead of adding a second.
    assert [g.text for g in spec.effective_gates] == [g.text for g in spec.gates]
    assert RolloutSpec.from_dict(spec.to_dict()) == spec


def test_every_bad_field_is_reported_at_once() -> None:
    bad = {
        "function": "Bad Name",
        "version": "1.4",
        "target": "group=west",
        "waves": [50, 10],
        "rate_per_minute": 0,
        "bake_s": -1,
        "device_timeout_s": "soon",
        "min_invocations": True,
        "on_failure": "explode",
        "colour": "red",
    }
    with pytest.raises(SpecError) as info:
        RolloutSpec.from_dict(bad)
    err = info.value
    assert isinstance(err, CloudSyncError)
    assert err.code == "bad_rollout_spec"
    paths = {f.path for f in err.fields}
    assert paths == {
        "function", "version", "waves", "rate_per_minute", "bake_s", "device_timeout_s",
        "min_invocations", "on_failure", "colour",
    }  # fmt: skip
    assert "must increase" in str(err)
    assert err.to_dict()["fields"]


def test_selector_and_gate_problems_keep_their_codes_when_alone() -> None:
    with pytest.raises(SpecError) as info:
        RolloutSpec.from_dict({**BASE, "target": "group"})
    assert info.value.code == SelectorError.code
    with pytest.raises(SpecError) as info:
        RolloutSpec.from_dict({**BASE, "gates": ["latency<=3"]})
    assert info.value.code == GateError.code
    assert "unknown metric 'latency'" in str(info.value)
    with pytest.raises(SpecError) as info:
        RolloutSpec.from_dict({**BASE, "target": "", "version": "x"})
    assert info.value.code == "bad_rollout_spec"


def test_two_gates_on_one_metric_are_refused() -> None:
    with pytest.raises(SpecError, match="more than one gate on error_rate"):
        RolloutSpec.from_dict({**BASE, "gates": ["error_rate<=0.1", "error_rate<=0.2"]})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "is not a number"),
        ("10,50", "last wave must be 100"),
        ("0,100", "percentage in (0, 100]"),
        ("10,10,100", "must increase"),
        ("10,abc,100", "not a number"),
        ("150", "percentage"),
        (",".join(str(i) for i in range(1, 22)) + ",100", "at most 20 waves"),
    ],
)
def test_bad_waves(text: str, problem: str) -> None:
    _waves, problems = parse_waves(text)
    assert problems and problem in problems[0], problems


def test_waves_accept_percent_signs_and_fractions() -> None:
    assert parse_waves("0.5%, 10%, 100") == ((0.5, 10.0, 100.0), [])
    assert parse_waves([100]) == ((100.0,), [])


def test_function_reference() -> None:
    from cloud_sync.rollout.spec import parse_function_ref

    assert parse_function_ref("resize@1.4.0") == ("resize", "1.4.0")
    assert parse_function_ref("resize@1.4.0-rc.1") == ("resize", "1.4.0-rc.1")
    for bad in ("resize", "resize@", "Resize@1.0.0", "resize@1.4", "@1.0.0"):
        with pytest.raises(SpecError):
            parse_function_ref(bad)

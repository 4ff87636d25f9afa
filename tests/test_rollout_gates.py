"""The gate language: parsing, histogram quantiles, pass/fail/inconclusive with reasons."""

from __future__ import annotations

import math

import pytest

from cloud_sync.rollout.errors import GateError, MessageError
from cloud_sync.rollout.gates import (
    evaluate_bound,
    evaluate_gate,
    evaluate_gates,
    parse_gate,
    parse_gates,
)
from cloud_sync.rollout.metrics import Histogram, VersionMetrics, total

BOUNDS = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


def hist(*counts: int) -> Histogram:
    padded = tuple(counts) + (0,) * (len(BOUNDS) + 1 - len(counts))
    return Histogram(BOUNDS, padded)


@pytest.mark.parametrize(
    ("text", "previous", "bound"),
    [
        ("error_rate<=0.05", None, 0.05),
        ("error_rate <= 5%", None, 0.05),
        ("p95_ms<=200", None, 200.0),
        ("install_success>=0.9", None, 0.9),
        ("crash_count<=0", None, 0.0),
        ("error_rate<=max(0.01,2*previous)", 0.002, 0.01),
        ("error_rate<=max(0.01,2*previous)", 0.02, 0.04),
        ("error_rate<=max(1%, 2 x previous)", 0.02, 0.04),
        ("error_rate<=max(0.01,2*previous)", None, 0.01),  # unknown previous: dropped
        ("p95_ms<=previous*1.2+10", 100.0, 130.0),
        ("p95_ms<=min(300, previous*(1+0.5))", 100.0, 150.0),
        ("p99_ms<=previous/2", 100.0, 50.0),
        ("p50_ms<=-(-5)", None, 5.0),
    ],
)
def test_bounds(text: str, previous: float | None, bound: float) -> None:
    gate = parse_gate(text)
    value = evaluate_bound(gate.bound, previous)
    assert value is not None and math.isclose(value, bound), (value, bound)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty gate"),
        ("latency<=5", "unknown metric"),
        ("error_rate==0.1", "expected METRIC OP BOUND"),
        ("error_rate<=", "expected METRIC OP BOUND"),
        ("error_rate<=max(0.1", "expected )"),
        ("error_rate<=0.1 0.2", "unexpected"),
        ("error_rate<=foo", "unexpected"),
        ("p95_ms<=5%", "only for ratios"),
        ("error_rate<=" + "1+" * 120 + "1", "longer than 200"),
    ],
)
def test_bad_gates(text: str, problem: str) -> None:
    with pytest.raises(GateError) as info:
        parse_gate(text)
    assert info.value.code == "bad_gate"
    assert problem in str(info.value)


def test_parse_gates_lists_every_bad_one() -> None:
    with pytest.raises(GateError) as info:
        parse_gates(["error_rate<=0.1", "nope", "p95_ms<=x"])
    assert [f.path for f in info.value.fields] == ["gates[1]", "gates[2]"]


def test_histogram_quantiles_interpolate_like_prometheus() -> None:
    h = hist(0, 0, 0, 0, 0, 0, 100)  # all 100 in (50, 100]
    assert h.quantile(0.5) == pytest.approx(75.0)
    assert h.quantile(0.95) == pytest.approx(97.5)
    assert hist().quantile(0.95) is None
    over = Histogram(BOUNDS, (0,) * len(BOUNDS) + (10,))
    assert over.quantile(0.95) == math.inf
    assert hist(10).quantile(1.0) == pytest.approx(1.0)
    with pytest.raises(MessageError):
        Histogram(BOUNDS, (1, 2))
    with pytest.raises(MessageError):
        Histogram((2.0, 1.0), (0, 0, 0))
    with pytest.raises(MessageError):
        hist(1).merge(Histogram((1.0,), (0, 1)))


def metrics(
    inv: int, err: int = 0, crashes: int = 0, lat: Histogram | None = None
) -> VersionMetrics:
    return VersionMetrics(invocations=inv, errors=err, crashes=crashes, latency=lat)


def test_error_rate_pass_fail_and_reason_names_gate_and_value() -> None:
    gate = parse_gate("error_rate<=0.05")
    ok = evaluate_gate(gate, metrics(1000, 10), None, 100)
    assert ok.outcome == "pass" and ok.value == pytest.approx(0.01)
    bad = evaluate_gate(gate, metrics(1000, 81), None, 100)
    assert bad.outcome == "fail"
    assert "error_rate=0.081" in bad.reason and "error_rate<=0.05" in bad.reason
    assert "1000 invocations" in bad.reason
    assert bad.to_dict()["value"] == pytest.approx(0.081)


def test_too_few_invocations_is_inconclusive_unless_decided_already() -> None:
    gate = parse_gate("error_rate<=0.05")
    few = evaluate_gate(gate, metrics(40, 1), None, 100)
    assert few.outcome == "inconclusive"
    assert "only 40 of 100 invocations" in few.reason
    # 30 errors in 40: even 60 perfect calls more leave 30/100 > 5%.
    doomed = evaluate_gate(gate, metrics(40, 30), None, 100)
    assert doomed.outcome == "fail" and "already after 40" in doomed.reason
    # 3 errors in 40: 60 good calls more would give 3% -- not decided yet.
    assert evaluate_gate(gate, metrics(40, 3), None, 100).outcome == "inconclusive"
    assert evaluate_gate(gate, metrics(0), None, 100).outcome == "inconclusive"


def test_crash_count_fails_at_once_and_passes_only_with_enough_traffic() -> None:
    gate = parse_gate("crash_count<=0")
    assert evaluate_gate(gate, metrics(3, crashes=1), None, 100).outcome == "fail"
    assert evaluate_gate(gate, metrics(3), None, 100).outcome == "inconclusive"
    assert evaluate_gate(gate, metrics(300), None, 100).outcome == "pass"


def test_latency_gate() -> None:
    gate = parse_gate("p95_ms<=200")
    fast = metrics(200, lat=hist(0, 0, 100, 100))
    assert evaluate_gate(gate, fast, None, 100).outcome == "pass"
    slow = metrics(200, lat=hist(0, 0, 0, 0, 0, 0, 0, 0, 200))  # (250, 500]
    result = evaluate_gate(gate, slow, None, 100)
    assert result.outcome == "fail" and "p95_ms=487.5" in result.reason
    assert evaluate_gate(gate, metrics(200), None, 100).outcome == "inconclusive"  # no histogram
    few = metrics(20, lat=hist(20))
    assert evaluate_gate(gate, few, None, 100).outcome == "inconclusive"


def test_relative_gate_uses_previous_only_with_enough_traffic() -> None:
    gate = parse_gate("error_rate<=max(0.01,2*previous)")
    current = metrics(1000, 30)  # 3%
    noisy_before = metrics(1000, 20)  # 2% -> bound 4%
    assert evaluate_gate(gate, current, noisy_before, 100).outcome == "pass"
    clean_before = metrics(1000, 5)  # 0.5% -> bound 1%
    result = evaluate_gate(gate, current, clean_before, 100)
    assert result.outcome == "fail" and "previous=0.005" in result.reason
    # Previous with too little traffic does not count: the 1% floor decides.
    assert evaluate_gate(gate, current, metrics(10, 5), 100).outcome == "fail"
    only_prev = parse_gate("error_rate<=previous")
    r = evaluate_gate(only_prev, current, None, 100)
    assert r.outcome == "inconclusive" and "no baseline" in r.reason


def test_install_success_ignores_min_invocations() -> None:
    gate = parse_gate("install_success>=0.9")
    assert (
        evaluate_gate(gate, VersionMetrics(installs_ok=9, installs_failed=1), None, 100).outcome
        == "pass"
    )
    r = evaluate_gate(gate, VersionMetrics(installs_ok=1, installs_failed=1), None, 100)
    assert r.outcome == "fail" and "install_success=0.5" in r.reason and "2 installs" in r.reason
    none = evaluate_gate(gate, VersionMetrics(), None, 100)
    assert none.outcome == "inconclusive" and "no installs" in none.reason


def test_verdict_combines_fail_over_inconclusive_over_pass() -> None:
    gates = parse_gates(["error_rate<=0.05", "p95_ms<=200", "crash_count<=0"])
    good = metrics(500, 1, lat=hist(0, 500))
    assert evaluate_gates(gates, good, None, 100).outcome == "pass"
    assert evaluate_gates(gates, good, None, 100).reason == ""
    unsure = metrics(50, 0, lat=hist(0, 50))
    v = evaluate_gates(gates, unsure, None, 100)
    assert v.outcome == "inconclusive" and v.reason.count("only 50 of 100") == 3
    crashing = metrics(50, 0, crashes=2, lat=hist(0, 50))
    v = evaluate_gates(gates, crashing, None, 100)
    assert v.outcome == "fail" and v.reason.startswith("crash_count=2")
    assert v.to_dict()["gates"][2]["outcome"] == "fail"  # type: ignore[index]


def test_metrics_from_record_entry_and_merge() -> None:
    entry = {"invocations": 120, "errors": 2, "crashes": 1, "restarts": 1, "cache_hits": 30,
             "latency_ms": {"bounds": list(BOUNDS), "counts": [0, 3, 40, 50, 20, 5, 2, 0, 0, 0, 0],
                            "sum": 1234.5}}  # fmt: skip
    m = VersionMetrics.from_entry(entry)
    assert (m.invocations, m.errors, m.crashes) == (120, 2, 2)
    both = total([m, m, VersionMetrics(invocations=1)])
    assert both.invocations == 241 and both.latency is not None and both.latency.total == 240
    with pytest.raises(MessageError) as info:
        VersionMetrics.from_entry({"invocations": -1, "errors": "x", "latency_ms": {"bounds": []}})
    assert {f.path for f in info.value.fields} == {"invocations", "errors", "latency_ms"}


def test_metrics_record_split_by_version() -> None:
    from cloud_sync.rollout.metrics import by_version

    entry = {"invocations": 10, "errors": 1, "latency_ms": {"bounds": list(BOUNDS),
             "counts": [0, 10] + [0] * 9, "sum": 20.0}}  # fmt: skip
    record = {"schema": "edgefn.metrics/1", "device": "d", "functions": {"resize": entry,
              "other": {"invocations": 3}}, "versions": {"resize": "1.4.0"}}  # fmt: skip
    got = by_version(record)
    assert set(got) == {("resize", "1.4.0"), ("other", None)}
    assert got[("resize", "1.4.0")].errors == 1 and got[("other", None)].invocations == 3
    with pytest.raises(MessageError):
        by_version({"functions": {"resize": 5}})

"""The metrics record format (edgefn.metrics/1) and its merge: pure, tested on values alone."""

from __future__ import annotations

import pytest

from cloud_sync.errors import MetricsFormatError
from cloud_sync.metrics_record import (
    gauge,
    merge_metrics,
    new_histogram,
    observe,
    validate_metrics,
)
from tests.metrics_samples import metrics


def test_histogram_observe_buckets_by_upper_bound() -> None:
    h = new_histogram([1, 10])
    for v in (0.5, 1, 1.01, 10, 11, 1000):
        observe(h, v)
    assert h["counts"] == [2, 2, 2]
    assert h["sum"] == pytest.approx(1023.51)


def test_merge_adds_counters_and_histograms_and_widens_the_interval() -> None:
    a = metrics(0, 10, invocations=3, cpu=10)
    b = metrics(10, 30, invocations=5, cpu=40)
    b["functions"]["thumb"] = {"invocations": 2, "errors": 1}
    b["system"]["temperature_c"] = gauge(55)
    m = merge_metrics(a, b)
    assert m == merge_metrics(b, a)  # order does not matter
    assert (m["interval_start"], m["interval_end"], m["samples"]) == (0, 30, 2)
    r = m["functions"]["resize"]
    assert (r["invocations"], r["errors"], r["cache_hits"], r["cache_misses"]) == (8, 0, 2, 6)
    assert sum(r["latency_ms"]["counts"]) == 8
    assert r["latency_ms"]["counts"] == [
        x + y
        for x, y in zip(
            a["functions"]["resize"]["latency_ms"]["counts"],
            b["functions"]["resize"]["latency_ms"]["counts"],
            strict=True,
        )
    ]
    assert m["functions"]["thumb"] == {"invocations": 2, "errors": 1}
    cpu = m["system"]["cpu_percent"]
    assert cpu["avg"] == pytest.approx((10 * 10 + 40 * 20) / 30)  # weighted by duration
    assert (cpu["max"], cpu["last"]) == (40, 40)
    assert m["system"]["temperature_c"] == gauge(55)  # present in one record only
    validate_metrics(m)
    assert "thumb" not in a["functions"]  # inputs untouched


def test_merge_refuses_other_devices_and_other_bounds() -> None:
    other = metrics(10, 20)
    other["device"] = "d2"
    with pytest.raises(MetricsFormatError):
        merge_metrics(metrics(0, 10), other)
    rebucketed = metrics(10, 20)
    rebucketed["functions"]["resize"]["latency_ms"] = new_histogram([5, 50])
    with pytest.raises(MetricsFormatError, match="bounds differ"):
        merge_metrics(metrics(0, 10), rebucketed)


def test_validate_names_bad_fields() -> None:
    bad = metrics(10, 5)
    bad["functions"]["resize"]["invocations"] = -1
    bad["functions"]["resize"]["latency_ms"]["counts"] = [1]
    bad["system"]["cpu_percent"] = 3
    with pytest.raises(MetricsFormatError) as info:
        validate_metrics(bad)
    text = str(info.value)
    for field in ("interval_start", "invocations", "latency_ms.counts", "system.cpu_percent"):
        assert field in text


# ---- leases and acks -------------------------------------------------------------------------

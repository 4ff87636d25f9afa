"""The metrics record format (edgefn.metrics/1) and its merge: pure values, no I/O.

A record is one device's figures over one interval: per-function counters, a latency histogram
(`latency_ms`) and pool gauges, plus system gauges. `merge_metrics` turns two records into one
covering both intervals without losing a count -- counters add, histograms add bucket-wise,
gauges average by time covered -- which is what lets the outbox (`cloud_sync.outbox`) stay
within its byte bound by merging instead of dropping. The platform reads the same format.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from cloud_sync.errors import MetricsFormatError

METRICS_SCHEMA = "edgefn.metrics/1"
# Upper bounds (ms, inclusive) of the latency buckets; one more bucket catches everything above.
# Roughly 1-2.5-5 steps: enough resolution for p50/p99 of both 1 ms in-process calls and 30 s jobs.
DEFAULT_LATENCY_BOUNDS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
)  # fmt: skip
_GAUGE_KEYS = ("avg", "max", "last")


def new_histogram(bounds: Iterable[float] = DEFAULT_LATENCY_BOUNDS_MS) -> dict[str, Any]:
    b = [float(x) for x in bounds]
    return {"bounds": b, "counts": [0] * (len(b) + 1), "sum": 0.0}


def observe(hist: dict[str, Any], value_ms: float) -> None:
    """Count one latency into its bucket (the first bound >= value, else the overflow bucket)."""
    bounds = hist["bounds"]
    i = 0
    while i < len(bounds) and value_ms > bounds[i]:
        i += 1
    hist["counts"][i] += 1
    hist["sum"] += value_ms


def gauge(value: float) -> dict[str, float]:
    """A gauge sampled once: average, maximum and last value are all the sample."""
    return {"avg": float(value), "max": float(value), "last": float(value)}


def _num(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def validate_metrics(rec: Any) -> dict[str, Any]:
    """Check a record against edgefn.metrics/1; MetricsFormatError names every bad field."""
    bad: list[str] = []
    if not isinstance(rec, dict):
        raise MetricsFormatError("metrics record must be a JSON object")
    if rec.get("schema") != METRICS_SCHEMA:
        bad.append(f"schema: must be {METRICS_SCHEMA!r}")
    if not isinstance(rec.get("device"), str) or not rec.get("device"):
        bad.append("device: must be a non-empty string")
    start: Any = rec.get("interval_start")
    end: Any = rec.get("interval_end")
    if not (_num(start) and _num(end)) or end < start:
        bad.append("interval_start/interval_end: must be numbers with start <= end")
    samples = rec.get("samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        bad.append("samples: must be an integer >= 1")
    fns = rec.get("functions", {})
    if not isinstance(fns, dict):
        bad.append("functions: must be an object")
        fns = {}
    for name, entry in fns.items():
        path = f"functions.{name}"
        if not isinstance(entry, dict):
            bad.append(f"{path}: must be an object")
            continue
        for key, value in entry.items():
            if key == "latency_ms":
                bad.extend(_hist_problems(f"{path}.latency_ms", value))
            elif key == "pool":
                bad.extend(_gauges_problems(f"{path}.pool", value))
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad.append(f"{path}.{key}: counters must be integers >= 0")
    bad.extend(_gauges_problems("system", rec.get("system", {})))
    versions = rec.get("versions", {})
    if not isinstance(versions, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in versions.items()
    ):
        bad.append("versions: must map function names to version strings")
    if bad:
        raise MetricsFormatError("bad metrics record: " + "; ".join(bad))
    return rec


def _hist_problems(path: str, h: Any) -> list[str]:
    if not isinstance(h, dict):
        return [f"{path}: must be an object"]
    bounds, counts = h.get("bounds"), h.get("counts")
    if not isinstance(bounds, list) or not all(_num(b) for b in bounds):
        return [f"{path}.bounds: must be a list of numbers"]
    if any(b2 <= b1 for b1, b2 in itertools.pairwise(bounds)):
        return [f"{path}.bounds: must be strictly increasing"]
    if (
        not isinstance(counts, list)
        or len(counts) != len(bounds) + 1
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    ):
        return [f"{path}.counts: must be len(bounds)+1 integers >= 0"]
    if not _num(h.get("sum", 0.0)):
        return [f"{path}.sum: must be a number"]
    return []


def _gauges_problems(path: str, table: Any) -> list[str]:
    if not isinstance(table, dict):
        return [f"{path}: must be an object"]
    return [
        f"{path}.{k}: must be a gauge {{avg, max, last}}"
        for k, g in table.items()
        if not isinstance(g, dict) or not all(_num(g.get(x)) for x in _GAUGE_KEYS)
    ]


def merge_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Merge two records of one device into one record covering both intervals.

    Counters add; histograms add bucket-wise (bounds must match); gauges combine as a
    duration-weighted average, the maximum, and the later record's last value; `samples` adds.
    Order of the arguments does not matter. Neither input is modified.
    """
    first, second = sorted(
        (validate_metrics(dict(a)), validate_metrics(dict(b))),
        key=lambda r: (r["interval_start"], r["interval_end"]),
    )
    if first["device"] != second["device"]:
        raise MetricsFormatError(
            f"cannot merge metrics of {first['device']!r} and {second['device']!r}"
        )
    w1 = _weight(first)
    w2 = _weight(second)
    functions: dict[str, Any] = {}
    f1, f2 = first.get("functions", {}), second.get("functions", {})
    for name in sorted(set(f1) | set(f2)):
        if name not in f1 or name not in f2:
            functions[name] = json.loads(json.dumps(f1.get(name) or f2.get(name)))
            continue
        e1, e2 = f1[name], f2[name]
        entry: dict[str, Any] = {}
        for key in sorted(set(e1) | set(e2)):
            if key not in e1 or key not in e2:
                entry[key] = json.loads(json.dumps(e1.get(key, e2.get(key))))
            elif key == "latency_ms":
                entry[key] = _merge_hist(f"functions.{name}.latency_ms", e1[key], e2[key])
            elif key == "pool":
                entry[key] = _merge_gauges(e1[key], e2[key], w1, w2)
            else:
                entry[key] = e1[key] + e2[key]
        functions[name] = entry
    out: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "device": first["device"],
        "interval_start": first["interval_start"],
        "interval_end": max(first["interval_end"], second["interval_end"]),
        "samples": first.get("samples", 1) + second.get("samples", 1),
        "functions": functions,
    }
    system = _merge_gauges(first.get("system", {}), second.get("system", {}), w1, w2)
    if system:
        out["system"] = system
    versions = _merge_versions(first.get("versions"), second.get("versions"))
    if versions:
        out["versions"] = versions
    return out


def _merge_versions(v1: Any, v2: Any) -> dict[str, str]:
    """The `versions` maps (function -> version that ran) of two records. Counts of two
    versions of one function must never add up (the rollout gates compare versions), so such a
    pair does not merge: the outbox then merges another pair or drops the oldest."""
    a, b = dict(v1 or {}), dict(v2 or {})
    clash = sorted(n for n in set(a) & set(b) if a[n] != b[n])
    if clash:
        raise MetricsFormatError(
            f"metrics of different versions of {', '.join(clash)} cannot merge"
        )
    return {**a, **b}


def _weight(rec: Mapping[str, Any]) -> float:
    # Weigh averages by time covered; zero-length intervals (tests, clock steps) by sample count.
    duration = float(rec["interval_end"] - rec["interval_start"])
    return duration if duration > 0 else 1e-9 * rec.get("samples", 1)


def _merge_hist(path: str, h1: Mapping[str, Any], h2: Mapping[str, Any]) -> dict[str, Any]:
    if list(h1["bounds"]) != list(h2["bounds"]):
        raise MetricsFormatError(f"{path}: histogram bounds differ, cannot merge")
    return {
        "bounds": list(h1["bounds"]),
        "counts": [x + y for x, y in zip(h1["counts"], h2["counts"], strict=True)],
        "sum": h1.get("sum", 0.0) + h2.get("sum", 0.0),
    }


def _merge_gauges(
    g1: Mapping[str, Any], g2: Mapping[str, Any], w1: float, w2: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(set(g1) | set(g2)):
        if key not in g1 or key not in g2:  # e.g. temperature appeared or vanished
            out[key] = dict(g1.get(key) or g2[key])
            continue
        a, b = g1[key], g2[key]
        out[key] = {
            "avg": (a["avg"] * w1 + b["avg"] * w2) / (w1 + w2),
            "max": max(a["max"], b["max"]),
            "last": b["last"],
        }
    return out

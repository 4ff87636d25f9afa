"""Per-version function metrics as gates see them: counters and a latency histogram.

The platform sums these over the devices of a wave, once for the rollout's new version and once
for the version those devices ran before (the `previous` of a relative gate). The histogram has
the shape of the metrics record (`edgefn.metrics/1`, docs/mqtt-topics.md): `counts[i]` counts
latencies <= `bounds[i]` and above the previous bound; the last count is everything above the
last bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloud_sync.errors import FieldProblem
from cloud_sync.rollout.errors import MessageError


@dataclass(frozen=True, slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # len(bounds) + 1

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise MessageError(
                "latency histogram",
                [FieldProblem("counts", f"needs {len(self.bounds) + 1} entries")],
            )
        if any(b2 <= b1 for b1, b2 in zip(self.bounds, self.bounds[1:], strict=False)):
            raise MessageError("latency histogram", [FieldProblem("bounds", "must increase")])
        if any(c < 0 for c in self.counts):
            raise MessageError("latency histogram", [FieldProblem("counts", "must be >= 0")])

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1), interpolated linearly inside its bucket (as Prometheus'
        `histogram_quantile`); `inf` when it lies above the last bound, None with no data."""
        total = self.total
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, count in enumerate(self.counts):
            if count and seen + count >= rank:
                if i == len(self.bounds):
                    return math.inf
                lower = self.bounds[i - 1] if i > 0 else 0.0
                return lower + (self.bounds[i] - lower) * (rank - seen) / count
            seen += count
        return math.inf  # unreachable: the loop covers every observation

    def merge(self, other: Histogram) -> Histogram:
        if other.bounds != self.bounds:
            raise MessageError(
                "latency histograms differ", [FieldProblem("bounds", "must be equal to merge")]
            )
        return Histogram(
            self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        )


@dataclass(frozen=True, slots=True)
class VersionMetrics:
    """What one version did on a set of devices over the rollout's window."""

    invocations: int = 0
    errors: int = 0
    crashes: int = 0  # worker crashes / restarts of this version
    latency: Histogram | None = None
    installs_ok: int = 0  # devices that reached active/healthy
    installs_failed: int = 0  # failed or timed out (rejections are not install attempts)

    def merge(self, other: VersionMetrics) -> VersionMetrics:
        if self.latency is None or other.latency is None:
            latency = self.latency or other.latency
        else:
            latency = self.latency.merge(other.latency)
        return VersionMetrics(
            self.invocations + other.invocations,
            self.errors + other.errors,
            self.crashes + other.crashes,
            latency,
            self.installs_ok + other.installs_ok,
            self.installs_failed + other.installs_failed,
        )

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> VersionMetrics:
        """From a function entry of a metrics record (`functions.<name>` of edgefn.metrics/1)."""
        problems: list[FieldProblem] = []

        def count(key: str) -> int:
            value = entry.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(FieldProblem(key, f"must be an integer >= 0, got {value!r}"))
                return 0
            return value

        invocations, errors = count("invocations"), count("errors")
        crashes = count("crashes") + count("restarts")
        latency = None
        raw = entry.get("latency_ms")
        if raw is not None:
            try:
                latency = Histogram(
                    tuple(float(b) for b in raw["bounds"]), tuple(int(c) for c in raw["counts"])
                )
            except (KeyError, TypeError, ValueError, MessageError) as exc:
                problems.append(FieldProblem("latency_ms", f"not a histogram ({exc})"))
        if problems:
            raise MessageError("metrics entry rejected", problems)
        return cls(invocations, errors, crashes, latency)


def total(items: Sequence[VersionMetrics]) -> VersionMetrics:
    out = VersionMetrics()
    for item in items:
        out = out.merge(item)
    return out


def by_version(record: Mapping[str, Any]) -> dict[tuple[str, str | None], VersionMetrics]:
    """Split one `edgefn.metrics/1` record into (function, version) -> metrics.

    The record's optional `versions` map (function -> the version that ran during the interval,
    sent by the agent and the simulator) says which version the counts belong
    to; without it the version is None and the caller attributes it (e.g. to the version the
    device reported running). A malformed entry raises `MessageError`.
    """
    versions = record.get("versions")
    versions = versions if isinstance(versions, Mapping) else {}
    out: dict[tuple[str, str | None], VersionMetrics] = {}
    for name, entry in (record.get("functions") or {}).items():
        if not isinstance(entry, Mapping):
            raise MessageError("metrics record", [FieldProblem(f"functions.{name}", "not a table")])
        version = versions.get(name)
        key = (str(name), version if isinstance(version, str) else None)
        m = VersionMetrics.from_entry(entry)
        out[key] = out[key].merge(m) if key in out else m
    return out

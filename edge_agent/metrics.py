"""In-memory invocation metrics, rendered as Prometheus text on `/metrics`.

Hand-written rather than prometheus_client: the agent needs four metric families, and keeping
the import out saves memory on small gateways. Recording is a dict lookup and a few additions,
cheap enough for the hot path.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Latency buckets in seconds: 100 us (in-process C++, cache hits) up to 30 s (the default
# function timeout).
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(slots=True)
class FunctionStats:
    invocations: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    duration_sum: float = 0.0
    cache: dict[str, int] = field(default_factory=dict)  # hit | miss | stale | bypass

    def observe(self, duration_s: float, error_code: str | None, cache: str | None) -> None:
        self.invocations += 1
        if cache is not None:
            self.cache[cache] = self.cache.get(cache, 0) + 1
        self.duration_sum += duration_s
        self.bucket_counts[bisect.bisect_left(BUCKETS, duration_s)] += 1
        if error_code is not None:
            self.errors[error_code] = self.errors.get(error_code, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "invocations": self.invocations,
            "errors": dict(self.errors),
            "duration_sum_s": self.duration_sum,
            "cache": dict(self.cache),
            "buckets": dict(zip([*map(str, BUCKETS), "+Inf"], self.bucket_counts, strict=True)),
        }


class Metrics:
    def __init__(self) -> None:
        self.functions: dict[str, FunctionStats] = {}

    def observe(
        self,
        function: str,
        duration_s: float,
        error_code: str | None = None,
        *,
        cache: str | None = None,
    ) -> None:
        stats = self.functions.get(function)
        if stats is None:
            stats = self.functions[function] = FunctionStats()
        stats.observe(duration_s, error_code, cache)

    def render(self, gauges: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]) -> str:
        """Prometheus text format 0.0.4. `gauges` yields (name, help, labels, value)."""
        out: list[str] = [
            "# HELP edgefn_invocations_total Invocations handled, by function.",
            "# TYPE edgefn_invocations_total counter",
        ]
        for name, st in sorted(self.functions.items()):
            out.append(f'edgefn_invocations_total{{function="{_esc(name)}"}} {st.invocations}')
        out += [
            "# HELP edgefn_errors_total Failed invocations, by function and error code.",
            "# TYPE edgefn_errors_total counter",
        ]
        for name, st in sorted(self.functions.items()):
            for code, n in sorted(st.errors.items()):
                out.append(
                    f'edgefn_errors_total{{function="{_esc(name)}",code="{_esc(code)}"}} {n}'
                )
        out += [
            "# HELP edgefn_cache_requests_total Invocations by result-cache outcome.",
            "# TYPE edgefn_cache_requests_total counter",
        ]
        for name, st in sorted(self.functions.items()):
            fn = _esc(name)
            for outcome, n in sorted(st.cache.items()):
                pair = f'function="{fn}",outcome="{outcome}"'
                out.append(f"edgefn_cache_requests_total{{{pair}}} {n}")
        out += [
            "# HELP edgefn_invocation_duration_seconds Time from request to answer.",
            "# TYPE edgefn_invocation_duration_seconds histogram",
        ]
        for name, st in sorted(self.functions.items()):
            fn = _esc(name)
            running = 0
            for bound, n in zip(BUCKETS, st.bucket_counts, strict=False):
                running += n
                out.append(
                    f'edgefn_invocation_duration_seconds_bucket{{function="{fn}",le="{bound}"}} '
                    f"{running}"
                )
            out.append(
                f'edgefn_invocation_duration_seconds_bucket{{function="{fn}",le="+Inf"}} '
                f"{st.invocations}"
            )
            out.append(
                f'edgefn_invocation_duration_seconds_sum{{function="{fn}"}} {st.duration_sum}'
            )
            out.append(
                f'edgefn_invocation_duration_seconds_count{{function="{fn}"}} {st.invocations}'
            )
        # Gauges arrive function by function; the text format wants each family in one block
        # (a family's samples after another family's are invalid), so group them first.
        families: dict[str, tuple[str, list[str]]] = {}
        for gname, ghelp, labels, value in gauges():
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            families.setdefault(gname, (ghelp, []))[1].append(f"{gname}{{{lab}}} {value}")
        for gname, (ghelp, samples) in families.items():
            out += [f"# HELP {gname} {ghelp}", f"# TYPE {gname} gauge", *samples]
        return "\n".join(out) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

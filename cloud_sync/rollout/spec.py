"""The rollout spec: what to roll out, to whom, how fast, and what stops it. A frozen value.

`RolloutSpec.from_dict(...)` is the one way in (CLI flags, the HTTP API body and the platform
store all become this dict), and it reports every bad field at once with a `SpecError`
(code `bad_rollout_spec`; selector and gate problems keep their own codes when they are the only
ones). `to_dict()` is its stored/API form and round-trips.

Defaults, and why:

- waves `1,10,50,100` -- a canary, then growing slices; the last wave is always 100%.
- rate 1000 devices/minute -- AWS IoT Jobs' documented maximum; above it, broker and registry
  load grows faster than the information a wave gives.
- bake 300 s -- time for a new version to see enough traffic to judge on.
- device timeout 600 s -- a download over a slow cellular link plus warm-up; a device that has
  not finished by then counts as `timed_out` (and may still finish late).
- gates: none given -> only install success gates a wave (`install_success>=0.9`): one failed
  device in ten is tolerated, so a single flaky box does not stop a fleet rollout.
- min invocations 100 -- below that, an error rate of 1/20 says nothing.
- failure limit 0 -- the first failed evaluation applies the failure policy (Argo's default).
- evaluation interval 30 s -- gates are checked that often during bake; each failed check counts
  towards the failure limit.
- failure policy `rollback` -- Greengrass' default: a bad version leaves the fleet by itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from cloud_sync.errors import FieldProblem
from cloud_sync.rollout.errors import GateError, SelectorError, SpecError
from cloud_sync.rollout.gates import Gate, parse_gate
from cloud_sync.rollout.selector import Selector, parse_selector
from runtimes.manifest import NAME_RE, SEMVER_RE

FailurePolicy = Literal["rollback", "pause", "abort"]
FAILURE_POLICIES: tuple[str, ...] = get_args(FailurePolicy)

DEFAULT_WAVES = (1.0, 10.0, 50.0, 100.0)
DEFAULT_RATE_PER_MINUTE = 1000
DEFAULT_BAKE_S = 300.0
DEFAULT_DEVICE_TIMEOUT_S = 600.0
DEFAULT_INSTALL_GATE = "install_success>=0.9"
DEFAULT_MIN_INVOCATIONS = 100
DEFAULT_INTERVAL_S = 30.0

MAX_WAVES = 20  # more slices than this is a slow rollout that no one watches to the end
MAX_GATES = 16
MAX_BAKE_S = 7 * 86_400.0  # a week: longer is a forgotten rollout holding its function
MAX_TIMEOUT_S = 7 * 86_400.0
MAX_RATE_PER_MINUTE = 1_000_000
MAX_MIN_INVOCATIONS = 10_000_000
MAX_FAILURE_LIMIT = 1000

_KEYS = (
    "function",
    "version",
    "target",
    "waves",
    "rate_per_minute",
    "max_concurrent_downloads",
    "bake_s",
    "device_timeout_s",
    "gates",
    "min_invocations",
    "failure_limit",
    "interval_s",
    "on_failure",
)


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    function: str
    version: str
    target: Selector
    waves: tuple[float, ...] = DEFAULT_WAVES  # cumulative percentages, increasing, last 100
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE
    max_concurrent_downloads: int | None = None  # None = no cap beyond the rate
    bake_s: float = DEFAULT_BAKE_S
    device_timeout_s: float = DEFAULT_DEVICE_TIMEOUT_S
    gates: tuple[Gate, ...] = ()  # always includes an install_success gate (see effective_gates)
    min_invocations: int = DEFAULT_MIN_INVOCATIONS
    failure_limit: int = 0
    interval_s: float = DEFAULT_INTERVAL_S
    on_failure: FailurePolicy = "rollback"

    @property
    def effective_gates(self) -> tuple[Gate, ...]:
        """The gates a wave must pass: the given ones plus install success unless given."""
        if any(g.metric == "install_success" for g in self.gates):
            return self.gates
        return (parse_gate(DEFAULT_INSTALL_GATE), *self.gates)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutSpec:
        return _build(data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "version": self.version,
            "target": str(self.target),
            "waves": list(self.waves),
            "rate_per_minute": self.rate_per_minute,
            "max_concurrent_downloads": self.max_concurrent_downloads,
            "bake_s": self.bake_s,
            "device_timeout_s": self.device_timeout_s,
            "gates": [g.text for g in self.gates],
            "min_invocations": self.min_invocations,
            "failure_limit": self.failure_limit,
            "interval_s": self.interval_s,
            "on_failure": self.on_failure,
        }


def parse_waves(value: str | Sequence[Any]) -> tuple[tuple[float, ...], list[str]]:
    """`"1,10,50,100"` or a list -> (percentages, problems). Checks bounds and order."""
    items: Sequence[Any] = value.split(",") if isinstance(value, str) else value
    out: list[float] = []
    problems: list[str] = []
    for item in items:
        try:
            pct = float(item.strip().rstrip("%")) if isinstance(item, str) else float(item)
        except (TypeError, ValueError):
            problems.append(f"{item!r} is not a number")
            continue
        if isinstance(item, bool) or not math.isfinite(pct) or not 0 < pct <= 100:
            problems.append(f"{item!r} must be a percentage in (0, 100]")
            continue
        out.append(pct)
    if not problems:
        if not out:
            problems.append("give at least one wave, e.g. 10,50,100")
        elif len(out) > MAX_WAVES:
            problems.append(f"at most {MAX_WAVES} waves")
        elif any(b <= a for a, b in itertools.pairwise(out)):
            problems.append("waves are cumulative percentages and must increase, e.g. 1,10,100")
        elif out[-1] != 100:
            problems.append(f"the last wave must be 100 (the whole target), got {out[-1]:g}")
    return tuple(out), problems


class _Fields:
    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.problems: list[FieldProblem] = []

    def bad(self, path: str, problem: str) -> None:
        self.problems.append(FieldProblem(path, problem))

    def number(self, key: str, default: float, lo: float, hi: float, *, integer: bool) -> Any:
        value = self.data.get(key)
        if value is None:
            return default
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or (not integer and math.isnan(value)):
            self.bad(key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
            return default
        if not lo <= value <= hi:
            self.bad(key, f"must be between {lo:g} and {hi:g}, got {value}")
            return default
        return value if integer else float(value)


def _build(data: Mapping[str, Any]) -> RolloutSpec:
    if not isinstance(data, Mapping):
        raise SpecError("rollout spec must be an object")
    f = _Fields(data)
    for key in data:
        if key not in _KEYS:
            f.bad(str(key), f"unknown field (expected one of: {', '.join(_KEYS)})")
    function = data.get("function")
    if not isinstance(function, str) or not NAME_RE.match(function):
        f.bad("function", f"must be a function name matching {NAME_RE.pattern}, got {function!r}")
    version = data.get("version")
    if not isinstance(version, str) or not SEMVER_RE.match(version):
        f.bad("version", f"must be a semantic version like 1.2.3, got {version!r}")
    target = Selector(())
    codes: set[str] = set()
    try:
        target = parse_selector(data.get("target"))  # type: ignore[arg-type]  # checked inside
    except SelectorError as exc:
        f.problems.extend(exc.fields)
        codes.add(exc.code)
    waves, wave_problems = parse_waves(data.get("waves", DEFAULT_WAVES))
    for problem in wave_problems:
        f.bad("waves", problem)
    rate = f.number(
        "rate_per_minute", DEFAULT_RATE_PER_MINUTE, 1, MAX_RATE_PER_MINUTE, integer=True
    )
    cap = data.get("max_concurrent_downloads")
    if cap is not None:
        cap = f.number("max_concurrent_downloads", 0, 1, MAX_RATE_PER_MINUTE, integer=True) or None
    bake = f.number("bake_s", DEFAULT_BAKE_S, 0, MAX_BAKE_S, integer=False)
    timeout = f.number(
        "device_timeout_s", DEFAULT_DEVICE_TIMEOUT_S, 1, MAX_TIMEOUT_S, integer=False
    )
    minimum = f.number(
        "min_invocations", DEFAULT_MIN_INVOCATIONS, 0, MAX_MIN_INVOCATIONS, integer=True
    )
    limit = f.number("failure_limit", 0, 0, MAX_FAILURE_LIMIT, integer=True)
    interval = f.number("interval_s", DEFAULT_INTERVAL_S, 0.1, MAX_BAKE_S, integer=False)
    gates: list[Gate] = []
    raw_gates = data.get("gates") or []
    if isinstance(raw_gates, str) or not isinstance(raw_gates, Sequence):
        f.bad("gates", "must be a list of gate expressions")
        raw_gates = []
    if len(raw_gates) > MAX_GATES:
        f.bad("gates", f"at most {MAX_GATES} gates")
    for i, text in enumerate(raw_gates[:MAX_GATES]):
        try:
            gates.append(parse_gate(text, f"gates[{i}]"))
        except GateError as exc:
            f.problems.extend(exc.fields)
            codes.add(exc.code)
    metrics = [g.metric for g in gates]
    for metric in sorted({m for m in metrics if metrics.count(m) > 1}):
        f.bad("gates", f"more than one gate on {metric}: combine them into one bound")
    policy = data.get("on_failure", "rollback")
    if policy not in FAILURE_POLICIES:
        f.bad("on_failure", f"must be one of {', '.join(FAILURE_POLICIES)}, got {policy!r}")
    if f.problems:
        # Keep the specific code when the selector or the gates are the only problem.
        only = {p.path.split("[")[0] for p in f.problems}
        code = next(iter(codes)) if len(codes) == 1 and only <= {"target", "gates"} else None
        raise SpecError("rollout spec rejected", f.problems, code=code)
    return RolloutSpec(
        function=function,  # type: ignore[arg-type]  # checked above
        version=version,  # type: ignore[arg-type]
        target=target,
        waves=waves,
        rate_per_minute=rate,
        max_concurrent_downloads=cap,
        bake_s=bake,
        device_timeout_s=timeout,
        gates=tuple(gates),
        min_invocations=minimum,
        failure_limit=limit,
        interval_s=interval,
        on_failure=policy,  # type: ignore[arg-type]
    )


def parse_function_ref(text: str) -> tuple[str, str]:
    """`NAME@VERSION` (as `edge-cloud rollout start` takes it) -> (name, version)."""
    name, sep, version = text.partition("@")
    problems = []
    if not sep or not NAME_RE.match(name):
        problems.append(FieldProblem("function", f"expected NAME@VERSION, got {text!r}"))
    elif not SEMVER_RE.match(version):
        problems.append(FieldProblem("version", f"{version!r} is not a semantic version"))
    if problems:
        raise SpecError("bad function reference", problems)
    return name, version

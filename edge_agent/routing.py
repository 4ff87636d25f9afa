"""Routing policy: where a function runs and what it falls back to. Pure code.

A function's manifest may say `[routing] policy = "..."` (and `cloud_timeout_ms`); the device
config may override the policy per function; functions not installed on the device use the
agent's default policy (so `local-then-cloud` also covers "missing here").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from edge_agent.errors import AgentError
from runtimes.errors import ManifestError, RuntimeErrorBase

Policy = Literal["local", "cloud", "local-then-cloud", "cloud-then-local"]
POLICIES: tuple[str, ...] = get_args(Policy)

STEPS: dict[str, tuple[str, ...]] = {
    "local": ("local",),
    "cloud": ("cloud",),
    "local-then-cloud": ("local", "cloud"),
    "cloud-then-local": ("cloud", "local"),
}

# A function error is the function's own answer: running it elsewhere would give the same one.
# Everything else (crash, timeout, overload, missing, unreachable) is worth a second place.
NO_FALLBACK_CODES = frozenset({"function_error", "bad_request", "payload_too_large"})


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    policy: Policy = "local"
    cloud_timeout_ms: int | None = None  # None: the function's own timeout

    @property
    def steps(self) -> tuple[str, ...]:
        return STEPS[self.policy]


def check_policy(value: object, where: str) -> Policy:
    if value not in POLICIES:
        raise ManifestError(
            f"{where}: routing policy must be one of {', '.join(POLICIES)}, got {value!r}"
        )
    return cast(Policy, value)


def parse_routing(table: Mapping[str, Any] | None, where: str = "edgefn.toml") -> RoutingPolicy:
    if not table:
        return RoutingPolicy()
    if not isinstance(table, Mapping):
        raise ManifestError(f"{where}: 'routing' must be a table")
    unknown = set(table) - {"policy", "cloud_timeout_ms"}
    if unknown:
        raise ManifestError(f"{where} [routing]: unknown field(s) {', '.join(sorted(unknown))}")
    policy = check_policy(table.get("policy", "local"), f"{where} [routing]")
    timeout = table.get("cloud_timeout_ms")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
    ):
        raise ManifestError(f"{where} [routing]: 'cloud_timeout_ms' must be a positive integer")
    return RoutingPolicy(policy, timeout)


def falls_back(exc: RuntimeErrorBase) -> bool:
    return exc.code not in NO_FALLBACK_CODES


class RoutingFailed(AgentError):
    """Every step of the chain failed; the message names each step and why.

    The instance carries the last failure's code and status (what the client should act on);
    `routing_failed` is only the class's own name in the error tree.
    """

    code = "routing_failed"

    def __init__(self, failures: list[tuple[str, RuntimeErrorBase]]) -> None:
        last = failures[-1][1]
        message = "; ".join(f"{step}: {exc.message} ({exc.code})" for step, exc in failures)
        super().__init__(f"all routes failed: {message}", code=last.code)
        self.status = last.status
        self.failures = failures

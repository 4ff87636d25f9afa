"""One error tree for everything under `hardware`.

Each error carries a stable `code` (what the agent logs and reports to the cloud); callers in
`runtimes` and `edge_agent` convert these at their boundary (`raise Unavailable(...) from exc`).
Things that merely degrade (no writable cgroup v2, no board model) are not errors: they come back as
values with a reason, because the agent must keep running on any box.
"""

from __future__ import annotations


class HardwareError(Exception):
    code = "hardware_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class UnknownArchitecture(HardwareError):
    """The CPU architecture is not one we build artifacts for: no bundle could run here."""

    code = "unknown_architecture"


class LimitToolMissing(HardwareError):
    """`setpriv` or `prlimit` (util-linux) is missing: workers cannot be started safely."""

    code = "limit_tool_missing"


class WorkerUserError(HardwareError):
    """The configured unprivileged worker user or group does not exist."""

    code = "worker_user_unknown"


class CgroupError(HardwareError):
    """A cgroup that was reported available failed on a later write (e.g. it was removed)."""

    code = "cgroup_error"


class BudgetExhausted(HardwareError):
    """Starting one more worker would exceed the device's worker memory or count budget."""

    code = "budget_exhausted"

"""The one error tree of edgefn, rooted here because `hardware` is the lowest layer.

`EdgefnError` is the only root. Each package hangs one subtree under it (`HardwareError` below,
`runtimes.errors.RuntimeErrorBase`, `cloud_sync.errors.CloudSyncError`,
`edge_agent.errors.AgentError`), so a caller that must not let anything escape (a CLI's `main`,
a supervisor) catches `EdgefnError` once, and a caller that handles one package's failures
catches that subtree.

Every error carries:
* `code`: a stable, machine-readable name. It is what leaves the process (HTTP error bodies,
  reported documents, CLI messages), so it never changes once released; every class defines its
  own (tests/test_errors.py checks they are unique). An instance may carry a more precise code
  (`code=` argument) from a documented vocabulary (e.g. the bundle refusal codes).
* `category`: what kind of thing went wrong, so callers decide on retry or fallback without
  knowing every subclass (see `Category`).
* `message`: one human sentence.

HTTP status is not here: it is meaningful only where an error is answered over HTTP (the
runtimes and agent subtrees carry `status`). Foreign errors (OSError, sqlite3, ssl, aiohttp...)
are converted at the module boundary that sees them: `raise SomeError(...) from exc`.

Things that merely degrade (no writable cgroup v2, no board model) are not errors: they come back
as values with a reason, because the agent must keep running on any box.
"""

from __future__ import annotations

from typing import Literal

# transport: worth retrying (or switching path); config/auth: not until something changes;
# storage: the local disk is in trouble; resource: this box is out of budget or busy, retry later;
# function: the function itself failed (not the platform's fault); request: the caller sent
# something wrong; internal: a bug or an unexpected state.
Category = Literal[
    "config", "transport", "auth", "storage", "resource", "function", "request", "internal"
]


class EdgefnError(Exception):
    """The root of every error edgefn raises on purpose."""

    code = "edgefn_error"
    category: Category = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def to_dict(self) -> dict[str, object]:
        """The JSON shape used in reported documents, events and error bodies."""
        return {"code": self.code, "category": self.category, "message": self.message}

    def one_line(self) -> str:
        """`message (code)` on one line: what CLIs print, so users can quote the stable code."""
        return f"{' '.join(self.message.split())} ({self.code})"


class HardwareError(EdgefnError):
    """The root of the `hardware` subtree: what this box is and what it may spend."""

    code = "hardware_error"
    category: Category = "config"


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
    category = "internal"


class BudgetExhausted(HardwareError):
    """Starting one more worker would exceed the device's worker memory or count budget."""

    code = "budget_exhausted"
    category = "resource"

"""Errors of the rollout core, in the `cloud_sync` error tree with stable codes.

A spec, selector, gate or message that is wrong lists *every* bad field (`fields`), so an operator
fixes a rejected `edge-cloud rollout start` in one go, and the HTTP API can return them as-is.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloud_sync.errors import Category, CloudSyncError, FieldProblem


class RolloutError(CloudSyncError):
    """Anything the rollout core refuses; `fields` names each bad input (may be empty)."""

    code = "rollout_error"
    category: Category = "config"

    def __init__(
        self, message: str, fields: Sequence[FieldProblem] = (), *, code: str | None = None
    ) -> None:
        self.fields: tuple[FieldProblem, ...] = tuple(fields)
        if self.fields:
            message = message + ": " + "; ".join(str(f) for f in self.fields)
        super().__init__(message, code=code)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["fields"] = [{"path": f.path, "problem": f.problem} for f in self.fields]
        return out


class SpecError(RolloutError):
    """A rollout spec is invalid (bad waves, bounds, function name, version...)."""

    code = "bad_rollout_spec"


class SelectorError(SpecError):
    """A target selector does not parse (`group=west,memory_mb>=1024`)."""

    code = "bad_selector"


class GateError(SpecError):
    """A health gate does not parse (`error_rate<=max(0.01,2*previous)`)."""

    code = "bad_gate"


class TransitionError(RolloutError):
    """A state change the state machine does not allow (a bug in the caller, not bad input)."""

    code = "bad_transition"
    category = "internal"


class MessageError(RolloutError):
    """A rollout message between platform and device (desired entry, status report) is malformed."""

    code = "bad_rollout_message"

"""The message contract between platform and agent for rollouts: pure encode/decode/validate.

Platform -> device: the device's desired document (retained MQTT; the HTTP fallback serves the
same) carries, per function, the version to run in `functions.<name>.version` (checked by
`cloud_sync.state`) and the rollout that asks for it in `deployment.rollouts.<name>`::

    {"functions": {"resize": {"version": "1.4.0"}},
     "deployment": {"rollouts": {"resize": {"rollout": "r-7f3a", "version": "1.4.0",
                                            "rollback": false}}}}

`rollback: true` is the explicit permission to move *down* (bundle contract: versions only move
forward unless a rollout says rollback). `remove: true` (with rollback, no version) rolls back a
function that had no previous version: deactivate it. `desired_patch()` builds the fragment,
`parse_deployments()` reads it back from the merged config and checks both places agree.

Device -> platform: one status report per step on `edgefn/v1/devices/{id}/rollout` via the
outbox (schema `edgefn.rollout/1`, `StatusReport`). A lost, duplicated or reordered report cannot
leave the platform "in progress" because:

1. every report carries the device's report counter `seq` (persisted, increasing across all its
   reports), and the platform applies a report only if its seq is above the last one applied for
   that (device, function) -- `order()`; duplicates and late arrivals are dropped;
2. every report is the device's *whole* state for that function (not a delta), so the newest one
   alone is enough, and the device also puts its latest report per function into its reported
   document (`reported_extra()`, coalesced: always the newest), which heals a lost report;
3. the idempotency key `rollout-<rollout>-<device>-<seq>` lets the outbox resend and the platform
   drop repeats; and the platform's per-device timeout ends what a silent device leaves open.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cloud_sync.errors import FieldProblem
from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.states import DeviceState
from cloud_sync.topics import ID_RE
from runtimes.manifest import NAME_RE, SEMVER_RE

STATUS_SCHEMA = "edgefn.rollout/1"
CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_MESSAGE_CHARS = 1000  # a reason for people, not a log dump: keeps records small in the outbox

# States only the platform decides: a device never reports them.
PLATFORM_ONLY_STATES = frozenset({DeviceState.QUEUED, DeviceState.NOTIFIED, DeviceState.TIMED_OUT})
REPORTABLE_STATES = frozenset(DeviceState) - PLATFORM_ONLY_STATES
# A report in these states must say why, with a stable code.
CODE_REQUIRED = frozenset({DeviceState.FAILED, DeviceState.REJECTED, DeviceState.CANCELED})

# ---- desired --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DesiredDeployment:
    """What the desired document asks of one function."""

    function: str
    version: str | None  # None only with remove
    rollout: str | None  # None = set by an operator's config, not by a rollout
    rollback: bool = False
    remove: bool = False


def desired_patch(
    function: str, version: str | None, rollout: str, *, rollback: bool = False
) -> dict[str, Any]:
    """The JSON Merge Patch fragment a rollout puts into a device's desired config.

    `version=None` (only with `rollback=True`) rolls a first install back: deactivate.
    """
    problems = _check_desired(function, version, rollout, rollback)
    if problems:
        raise MessageError("desired rollout entry rejected", problems)
    if version is None:
        entry: dict[str, Any] = {"rollout": rollout, "rollback": True, "remove": True}
        # `None` deletes the key in a merge patch: the function no longer names a version.
        return {
            "functions": {function: {"version": None}},
            "deployment": {"rollouts": {function: {**entry, "version": None}}},
        }
    return {
        "functions": {function: {"version": version}},
        "deployment": {
            "rollouts": {
                function: {
                    "rollout": rollout,
                    "version": version,
                    "rollback": rollback,
                    "remove": None,
                }
            }
        },
    }


def _check_desired(
    function: str, version: str | None, rollout: str, rollback: bool
) -> list[FieldProblem]:
    problems = []
    if not isinstance(function, str) or not NAME_RE.match(function):
        problems.append(FieldProblem("function", f"must match {NAME_RE.pattern}"))
    if version is None:
        if not rollback:
            problems.append(FieldProblem("version", "may be empty only for a rollback (remove)"))
    elif not isinstance(version, str) or not SEMVER_RE.match(version):
        problems.append(FieldProblem("version", f"must be a semantic version, got {version!r}"))
    if not isinstance(rollout, str) or not ID_RE.match(rollout):
        problems.append(FieldProblem("rollout", f"not a rollout id: {rollout!r}"))
    return problems


def parse_deployments(config: Mapping[str, Any]) -> dict[str, DesiredDeployment]:
    """Every function the merged desired config names a version for, or removes.

    `config` is the merged desired config (`AgentConfig.raw`). Raises `MessageError` listing every
    bad entry (unknown keys, a version that disagrees with `functions.<name>.version`, ...).
    """
    problems: list[FieldProblem] = []
    out: dict[str, DesiredDeployment] = {}
    functions = config.get("functions") or {}
    deployment = config.get("deployment") or {}
    rollouts = deployment.get("rollouts") if isinstance(deployment, Mapping) else None
    if rollouts is None:
        rollouts = {}
    if not isinstance(rollouts, Mapping):
        raise MessageError(
            "desired rollouts rejected", [FieldProblem("deployment.rollouts", "must be a table")]
        )
    if isinstance(functions, Mapping):
        for name, fn in functions.items():
            if isinstance(fn, Mapping) and isinstance(fn.get("version"), str):
                out[name] = DesiredDeployment(name, fn["version"], None)
    for name, entry in rollouts.items():
        path = f"deployment.rollouts.{name}"
        if not isinstance(entry, Mapping):
            problems.append(FieldProblem(path, "must be a table"))
            continue
        extra = sorted(set(entry) - {"rollout", "version", "rollback", "remove"})
        problems.extend(FieldProblem(f"{path}.{k}", "unknown field") for k in extra)
        rollout, version = entry.get("rollout"), entry.get("version")
        # null = absent: a platform store may keep the merge patch's nulls.
        rollback = False if entry.get("rollback") is None else entry["rollback"]
        remove = False if entry.get("remove") is None else entry["remove"]
        if not isinstance(rollback, bool) or not isinstance(remove, bool):
            problems.append(FieldProblem(path, "rollback and remove must be true or false"))
            continue
        if remove and (version is not None or not rollback):
            problems.append(FieldProblem(path, "remove goes with rollback and no version"))
            continue
        if not remove:
            pinned = out.get(name)
            if pinned is None or pinned.version != version:
                have = pinned.version if pinned else None
                problems.append(
                    FieldProblem(
                        f"{path}.version",
                        f"{version!r} disagrees with functions.{name}.version ({have!r})",
                    )
                )
                continue
        for p in _check_desired(name, version, rollout, rollback):  # type: ignore[arg-type]
            problems.append(FieldProblem(f"{path}.{p.path}", p.problem))
        out[name] = DesiredDeployment(name, version, rollout, rollback, remove)
    if problems:
        raise MessageError("desired rollouts rejected", problems)
    return out


# ---- status reports --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One step of one deployment on one device, as the device saw it."""

    device: str
    function: str
    rollout: str | None  # None: a deployment no rollout asked for (an operator pin)
    version: str | None  # the version this step is about (None: a remove)
    state: DeviceState
    seq: int  # the device's report counter, > 0, increasing across all its reports
    at: float  # when the device entered `state` (Unix seconds, device clock)
    code: str | None = None  # stable code (states.REJECT_CODES, FAILURE_CODES, CANCEL_CODES)
    message: str = ""
    started_at: float | None = None  # when this deployment step began on the device
    rollback: bool = False  # the step was a rollback the desired document asked for
    previous: str | None = None  # the version active before this step

    def __post_init__(self) -> None:
        problems = _check_report(self)
        if problems:
            raise MessageError("rollout status report rejected", problems)

    @property
    def key(self) -> str:
        """The outbox idempotency key: one per report, the same on every resend."""
        return f"rollout-{self.rollout or 'none'}-{self.device}-{self.seq}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": STATUS_SCHEMA,
            "device": self.device,
            "function": self.function,
            "rollout": self.rollout,
            "version": self.version,
            "state": self.state.value,
            "code": self.code,
            "message": self.message,
            "seq": self.seq,
            "at": self.at,
            "started_at": self.started_at,
            "rollback": self.rollback,
            "previous": self.previous,
        }
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


_REPORT_KEYS = frozenset(
    {"schema", "device", "function", "rollout", "version", "state", "code", "message", "seq",
     "at", "started_at", "rollback", "previous"}
)  # fmt: skip


def _check_report(r: StatusReport) -> list[FieldProblem]:
    p: list[FieldProblem] = []
    if not isinstance(r.device, str) or not ID_RE.match(r.device):
        p.append(FieldProblem("device", f"not a device id: {r.device!r}"))
    if not isinstance(r.function, str) or not NAME_RE.match(r.function):
        p.append(FieldProblem("function", f"not a function name: {r.function!r}"))
    if r.rollout is not None and (not isinstance(r.rollout, str) or not ID_RE.match(r.rollout)):
        p.append(FieldProblem("rollout", f"not a rollout id: {r.rollout!r}"))
    if r.version is not None and (not isinstance(r.version, str) or not SEMVER_RE.match(r.version)):
        p.append(FieldProblem("version", f"not a semantic version: {r.version!r}"))
    if r.previous is not None and (
        not isinstance(r.previous, str) or not SEMVER_RE.match(r.previous)
    ):
        p.append(FieldProblem("previous", f"not a semantic version: {r.previous!r}"))
    if not isinstance(r.state, DeviceState):
        p.append(FieldProblem("state", f"not a device state: {r.state!r}"))
    elif r.state in PLATFORM_ONLY_STATES:
        p.append(FieldProblem("state", f"{r.state.value} is decided by the platform, not reported"))
    elif r.state in CODE_REQUIRED and r.code is None:
        p.append(FieldProblem("code", f"a {r.state.value} report needs a stable code"))
    if r.code is not None and (not isinstance(r.code, str) or not CODE_RE.match(r.code)):
        p.append(FieldProblem("code", f"must match {CODE_RE.pattern}, got {r.code!r}"))
    if isinstance(r.seq, bool) or not isinstance(r.seq, int) or r.seq < 1:
        p.append(FieldProblem("seq", f"must be an integer >= 1, got {r.seq!r}"))
    for name in ("at", "started_at"):
        value = getattr(r, name)
        if value is None and name == "started_at":
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            p.append(FieldProblem(name, f"must be Unix seconds, got {value!r}"))
    if not isinstance(r.message, str) or len(r.message) > MAX_MESSAGE_CHARS:
        p.append(FieldProblem("message", f"must be text of at most {MAX_MESSAGE_CHARS} characters"))
    if not isinstance(r.rollback, bool):
        p.append(FieldProblem("rollback", "must be true or false"))
    return p


def decode_status(payload: bytes | str | Mapping[str, Any]) -> StatusReport:
    """Decode and validate one status report; `MessageError` lists every bad field."""
    if isinstance(payload, bytes | str):
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MessageError(f"rollout status is not JSON ({exc})") from exc
    else:
        data = payload
    if not isinstance(data, Mapping):
        raise MessageError("rollout status must be a JSON object")
    problems = [
        FieldProblem(str(k), "unknown field") for k in sorted(set(data) - _REPORT_KEYS, key=str)
    ]
    if data.get("schema") != STATUS_SCHEMA:
        problems.append(
            FieldProblem("schema", f"must be {STATUS_SCHEMA!r}, got {data.get('schema')!r}")
        )
    state: Any = data.get("state")
    try:
        state = DeviceState(state)
    except ValueError:
        problems.append(FieldProblem("state", f"unknown state {state!r}"))
    if problems:
        raise MessageError("rollout status report rejected", problems)
    return StatusReport(
        device=data.get("device"),  # type: ignore[arg-type]  # __post_init__ checks every field
        function=data.get("function"),  # type: ignore[arg-type]
        rollout=data.get("rollout"),
        version=data.get("version"),
        state=state,
        seq=data.get("seq"),  # type: ignore[arg-type]
        at=data.get("at"),  # type: ignore[arg-type]
        code=data.get("code"),
        message=data.get("message", ""),
        started_at=data.get("started_at"),
        rollback=data.get("rollback", False),
        previous=data.get("previous"),
    )


Order = Literal["new", "duplicate", "stale"]


def order(last_seq: int | None, report: StatusReport) -> Order:
    """Whether to apply `report`, given the highest seq applied for its (device, function)."""
    if last_seq is None or report.seq > last_seq:
        return "new"
    return "duplicate" if report.seq == last_seq else "stale"


def reported_extra(latest: Mapping[str, StatusReport]) -> dict[str, Any]:
    """`extra` for `state.reported_document`: the latest report per function, under `rollouts`."""
    return {"rollouts": {name: r.to_dict() for name, r in sorted(latest.items())}}


def reports_from_reported(doc: Mapping[str, Any]) -> tuple[list[StatusReport], list[FieldProblem]]:
    """The status reports embedded in a reported document, and what was wrong with the others.

    A bad entry does not spoil the good ones: the reported document carries other state too.
    """
    raw = doc.get("rollouts")
    if raw is None:
        return [], []
    if not isinstance(raw, Mapping):
        return [], [FieldProblem("rollouts", "must be a table")]
    good: list[StatusReport] = []
    bad: list[FieldProblem] = []
    for name, entry in raw.items():
        try:
            report = decode_status(entry)
        except MessageError as exc:
            bad.extend(FieldProblem(f"rollouts.{name}.{f.path}", f.problem) for f in exc.fields)
            continue
        if report.function != name:
            bad.append(FieldProblem(f"rollouts.{name}.function", f"is {report.function!r}"))
            continue
        good.append(report)
    return good, bad

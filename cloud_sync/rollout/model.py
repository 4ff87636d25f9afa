"""The rollout as stored: a frozen `Rollout` with one `DeviceRecord` per target device.

`plan()` turns a spec and the platform's view of the fleet into waves and the list of devices
that cannot take the version (the `--dry-run` answer); `new_rollout()` makes the `pending`
rollout from a plan. `to_dict()`/`from_dict()` are the stored form, so a restarted platform
continues exactly where it was; `status_view()` is the `rollout status --json` shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from cloud_sync.errors import FieldProblem
from cloud_sync.rollout import waves as wave_math
from cloud_sync.rollout.eligibility import BundleFacts, Ineligible, partition
from cloud_sync.rollout.errors import RolloutError
from cloud_sync.rollout.selector import DeviceFacts
from cloud_sync.rollout.spec import RolloutSpec
from cloud_sync.rollout.states import ACTIVE_ROLLOUT_STATES, DeviceState, RolloutState
from cloud_sync.topics import validate_id

# Gate evaluations kept per rollout: at the default 30 s interval, about two hours of history.
GATE_HISTORY_MAX = 240


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device: str
    wave: int | None  # None: never in a wave (ineligible at planning)
    state: DeviceState = DeviceState.QUEUED
    code: str | None = None
    version: str | None = None  # what the device runs now, as far as the platform knows
    previous: str | None = None  # what it ran before the rollout: the rollback target
    notified_at: float | None = None  # when its desired last changed (timeouts count from here)
    updated_at: float | None = None
    seq: int = 0  # highest report seq applied (messages.order)
    reached: int = 0  # furthest index in states.PIPELINE seen: evidence it may have switched
    rollback_pending: bool = False  # asked to go back, not confirmed yet

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "wave": self.wave,
            "state": self.state.value,
            "code": self.code,
            "version": self.version,
            "previous": self.previous,
            "notified_at": self.notified_at,
            "updated_at": self.updated_at,
            "seq": self.seq,
            "reached": self.reached,
            "rollback_pending": self.rollback_pending,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceRecord:
        return cls(
            device=str(d["device"]),
            wave=d.get("wave"),
            state=DeviceState(d.get("state", "queued")),
            code=d.get("code"),
            version=d.get("version"),
            previous=d.get("previous"),
            notified_at=d.get("notified_at"),
            updated_at=d.get("updated_at"),
            seq=int(d.get("seq") or 0),
            reached=int(d.get("reached") or 0),
            rollback_pending=bool(d.get("rollback_pending", False)),
        )


@dataclass(frozen=True, slots=True)
class Rollout:
    id: str
    spec: RolloutSpec
    state: RolloutState = RolloutState.PENDING
    reason: str = ""  # why it is paused or stopped: names the gate and its value
    wave: int = 0  # the current wave index
    devices: Mapping[str, DeviceRecord] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    wave_started_at: float | None = None
    settled_at: float | None = None  # every device of the waves so far settled: bake starts
    last_eval_at: float | None = None
    failures: int = 0  # failed gate evaluations in this wave (vs spec.failure_limit)
    tokens: float = 0.0  # the rate limit's token bucket (controller.BUCKET_S)
    tokens_at: float | None = None  # when `tokens` was computed; None: a full bucket
    verdict: Mapping[str, Any] | None = None  # the last gate verdict (gates.Verdict.to_dict())
    superseded_by: str | None = None
    # Every gate evaluation, oldest first, at most GATE_HISTORY_MAX: what the console charts as
    # "each gate's value over time against its bound" (`gate_point`).
    gate_history: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", MappingProxyType(dict(self.devices)))

    def with_devices(self, changed: Mapping[str, DeviceRecord], **fields: Any) -> Rollout:
        """A copy with some device records replaced (one dict copy per event, not per device)."""
        devices = dict(self.devices)
        devices.update(changed)
        return replace(self, devices=devices, **fields)

    def in_waves(self, upto: int | None = None) -> list[DeviceRecord]:
        """Records of the devices in waves 0..upto (default: the current wave)."""
        last = self.wave if upto is None else upto
        return [r for r in self.devices.values() if r.wave is not None and r.wave <= last]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spec": self.spec.to_dict(),
            "state": self.state.value,
            "reason": self.reason,
            "wave": self.wave,
            "devices": [r.to_dict() for r in sorted(self.devices.values(), key=_by_id)],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "wave_started_at": self.wave_started_at,
            "settled_at": self.settled_at,
            "last_eval_at": self.last_eval_at,
            "failures": self.failures,
            "tokens": self.tokens,
            "tokens_at": self.tokens_at,
            "verdict": dict(self.verdict) if self.verdict is not None else None,
            "superseded_by": self.superseded_by,
            "gate_history": [dict(p) for p in self.gate_history],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rollout:
        records = [DeviceRecord.from_dict(r) for r in d.get("devices") or ()]
        return cls(
            id=str(d["id"]),
            spec=RolloutSpec.from_dict(d["spec"]),
            state=RolloutState(d["state"]),
            reason=str(d.get("reason") or ""),
            wave=int(d.get("wave") or 0),
            devices={r.device: r for r in records},
            created_at=float(d.get("created_at") or 0.0),
            updated_at=float(d.get("updated_at") or 0.0),
            wave_started_at=d.get("wave_started_at"),
            settled_at=d.get("settled_at"),
            last_eval_at=d.get("last_eval_at"),
            failures=int(d.get("failures") or 0),
            tokens=float(d.get("tokens") or 0.0),
            tokens_at=d.get("tokens_at"),
            verdict=d.get("verdict"),
            superseded_by=d.get("superseded_by"),
            gate_history=tuple(p for p in d.get("gate_history") or () if isinstance(p, Mapping))[
                -GATE_HISTORY_MAX:
            ],
        )

    def with_gate_point(self, now: float, verdict: Mapping[str, Any]) -> Rollout:
        """A copy with one more evaluation in `gate_history` (the oldest dropped past the cap)."""
        history = (*self.gate_history, gate_point(now, self.wave, verdict))
        return replace(self, gate_history=history[-GATE_HISTORY_MAX:])

    def status_view(self) -> dict[str, Any]:
        """`edge-cloud rollout status --json`: the rollout, per-wave progress, every device."""
        waves = []
        sizes: Counter[int] = Counter()
        states: dict[int, Counter[str]] = {}
        for rec in self.devices.values():
            if rec.wave is not None:
                sizes[rec.wave] += 1
                states.setdefault(rec.wave, Counter())[rec.state.value] += 1
        for index, pct in enumerate(self.spec.waves):
            waves.append(
                {
                    "index": index,
                    "percent": pct,
                    "devices": sizes[index],
                    "states": dict(sorted(states.get(index, Counter()).items())),
                }
            )
        counts = Counter(r.state.value for r in self.devices.values())
        return {
            "id": self.id,
            "function": self.spec.function,
            "version": self.spec.version,
            "state": self.state.value,
            "reason": self.reason,
            "wave": self.wave,
            "waves": waves,
            "counts": dict(sorted(counts.items())),
            "gates": self.verdict,
            "gate_history": [dict(p) for p in self.gate_history],
            "spec": self.spec.to_dict(),
            "superseded_by": self.superseded_by,
            "devices": [
                {
                    "device": r.device,
                    "wave": r.wave,
                    "state": r.state.value,
                    "version": r.version,
                    "code": r.code,
                }
                for r in sorted(self.devices.values(), key=_by_id)
            ],
        }


def gate_point(now: float, wave: int, verdict: Mapping[str, Any]) -> dict[str, Any]:
    """One evaluation, compact: the time, the wave, and per gate its value, bound and outcome.

    The whole rollout document is rewritten on every change, so a point keeps only what a chart
    needs (no reasons, no sample counts)."""
    gates = verdict.get("gates") if isinstance(verdict, Mapping) else None
    return {
        "t": now,
        "wave": wave,
        "gates": [
            {k: g.get(k) for k in ("gate", "value", "bound", "outcome")}
            for g in gates or ()
            if isinstance(g, Mapping)
        ],
    }


def _by_id(r: DeviceRecord) -> str:
    return r.device


@dataclass(frozen=True, slots=True)
class Plan:
    """Which eligible device goes in which wave, and who cannot take the version."""

    rollout_id: str
    waves: tuple[tuple[str, ...], ...]  # device ids per wave
    ineligible: tuple[Ineligible, ...]
    previous: Mapping[str, str | None]  # device -> its version of the function now

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.rollout_id,
            "waves": [list(w) for w in self.waves],
            "ineligible": [i.to_dict() for i in self.ineligible],
        }


def plan(
    rollout_id: str, spec: RolloutSpec, fleet: Sequence[DeviceFacts], bundle: BundleFacts
) -> Plan:
    """Select the target, drop the devices that cannot take the bundle, cut the rest in waves."""
    validate_id(rollout_id, "rollout id")
    target = spec.target.select(list(fleet))
    eligible, ineligible = partition(target, bundle)
    assignment = wave_math.assign(rollout_id, (d.id for d in eligible), spec.waves)
    per_wave: list[list[str]] = [[] for _ in spec.waves]
    for device, index in assignment.items():
        per_wave[index].append(device)
    return Plan(
        rollout_id,
        tuple(tuple(sorted(w)) for w in per_wave),
        tuple(ineligible),
        {d.id: d.functions.get(spec.function) for d in target},
    )


def new_rollout(spec: RolloutSpec, p: Plan, now: float) -> Rollout:
    """The `pending` rollout of a plan; refuses a plan with no device to update."""
    if not any(p.waves):
        raise RolloutError(
            f"no device in target {spec.target} can take {spec.function}@{spec.version}",
            [FieldProblem(i.device, f"{i.code}: {i.reason}") for i in p.ineligible[:20]],
            code="empty_target",
        )
    records: dict[str, DeviceRecord] = {}
    for index, devices in enumerate(p.waves):
        for device in devices:
            prev = p.previous.get(device)
            records[device] = DeviceRecord(device, index, version=prev, previous=prev)
    for bad in p.ineligible:
        prev = p.previous.get(bad.device)
        records[bad.device] = DeviceRecord(
            bad.device, None, DeviceState.REJECTED, bad.code, prev, prev, updated_at=now
        )
    return Rollout(p.rollout_id, spec, devices=records, created_at=now, updated_at=now)


def admit(function: str, existing: Sequence[Rollout], *, supersede: bool) -> list[str]:
    """One active rollout per function: the ids a new rollout must supersede, or an error.

    Refuses (code `rollout_active`) with a message naming the active rollout unless `supersede`,
    in which case the caller steps each returned id with `controller.Supersede` first.
    """
    active = [
        r for r in existing if r.spec.function == function and r.state in ACTIVE_ROLLOUT_STATES
    ]
    if active and not supersede:
        r = active[0]
        raise RolloutError(
            f"rollout {r.id} of {function}@{r.spec.version} is {r.state.value}: pause it, abort "
            "it, wait for it, or start the new one with --supersede",
            code="rollout_active",
        )
    return [r.id for r in active]

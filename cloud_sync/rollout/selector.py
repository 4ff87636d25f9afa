"""Target selectors: which devices a rollout is for, matched on labels and hardware profile.

Syntax (comma = AND)::

    group=west,arch=aarch64,memory_mb>=1024     labels and profile fields
    group=west|east,board_model!=pi3            `|` = any of (with `=`), none of (with `!=`)
    device=edge-01|edge-02                      explicit device ids
    *                                           every device (must be said explicitly)

Operators: `=`, `!=`, `>=`, `<=`, `>`, `<`. Ordering operators need a number and compare
numerically; a device whose value is missing or not a number does not match them. `=`/`!=`
compare numbers as numbers when both sides are numeric (`cpu_count=4` matches `4`) and text
otherwise. A missing key never equals anything, so `group!=west` also matches devices without a
`group` label (the Kubernetes label-selector rule).

Keys: `device` (or `id`) is the device id; a name in `PROFILE_KEYS` reads the reported hardware
profile (`memory_mb` is `memory_total_mb`, what a device has, not what is free at the moment);
`labels.NAME` reads a label whose name collides with a profile field; any other key is a label.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from cloud_sync.errors import FieldProblem
from cloud_sync.rollout.errors import SelectorError
from cloud_sync.topics import ID_RE

Op = Literal["=", "!=", ">=", "<=", ">", "<"]
ORDERING_OPS = frozenset({">=", "<=", ">", "<"})

# Reported profile fields (hardware/profile.py `to_dict`) a selector may name, and aliases.
PROFILE_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "arch": "arch",
        "system": "system",
        "artifact_key": "artifact_key",
        "libc": "libc",
        "libc_version": "libc_version",
        "cpu_count": "cpu_count",
        "cpu_model": "cpu_model",
        "memory_mb": "memory_total_mb",
        "memory_total_mb": "memory_total_mb",
        "memory_available_mb": "memory_available_mb",
        "disk_total_mb": "disk_total_mb",
        "disk_free_mb": "disk_free_mb",
        "board_vendor": "board_vendor",
        "board_model": "board_model",
        "kernel": "kernel",
        "hostname": "hostname",
    }
)
DEVICE_KEYS = frozenset({"device", "id"})
ALL = "*"
MAX_TERMS = 32  # a selector is typed by a person; more terms than this is a mistake
MAX_VALUES = 10_000  # explicit id lists can be long, but not unbounded

_TERM_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]{0,127})\s*(!=|>=|<=|=|>|<)\s*(.*?)\s*$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9._:/+@-]{1,256}$")


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the platform knows about one device when it targets a rollout.

    `profile` is the reported hardware profile (`DeviceProfile.to_dict()`), None until the device
    has reported one; `runtimes` the runtimes it reports it can run, None when it does not say;
    `functions` its reported installed versions (the "previous version" of a rollout).
    """

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    profile: Mapping[str, Any] | None = None
    runtimes: frozenset[str] | None = None
    functions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_view(cls, view: Mapping[str, Any]) -> DeviceFacts:
        """From one entry of the platform's device list (`FleetStore.devices()`)."""
        profile = view.get("profile")
        profile = profile if isinstance(profile, Mapping) else None
        runtimes = view.get("runtimes")
        if runtimes is None and profile is not None:
            runtimes = profile.get("runtimes")
        functions = view.get("functions")
        return cls(
            id=str(view["id"]),
            labels={str(k): str(v) for k, v in (view.get("labels") or {}).items()},
            profile=profile,
            runtimes=frozenset(str(r) for r in runtimes) if isinstance(runtimes, list) else None,
            functions=(
                {str(k): str(v) for k, v in functions.items()}
                if isinstance(functions, Mapping)
                else {}
            ),
        )


@dataclass(frozen=True, slots=True)
class Term:
    key: str
    op: Op
    values: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.key}{self.op}{'|'.join(self.values)}"

    def matches(self, device: DeviceFacts) -> bool:
        actual = _lookup(device, self.key)
        if self.op in ORDERING_OPS:
            have, want = _number(actual), float(self.values[0])
            if have is None:
                return False
            return {
                ">=": have >= want,
                "<=": have <= want,
                ">": have > want,
                "<": have < want,
            }[self.op]
        equal = actual is not None and any(_equal(actual, v) for v in self.values)
        return equal if self.op == "=" else not equal


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector; `str()` gives its canonical text (stored with the rollout)."""

    terms: tuple[Term, ...]  # empty = every device (only from "*")

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms) if self.terms else ALL

    def matches(self, device: DeviceFacts) -> bool:
        return all(t.matches(device) for t in self.terms)

    def select(self, devices: list[DeviceFacts]) -> list[DeviceFacts]:
        return [d for d in devices if self.matches(d)]


def parse_selector(text: str) -> Selector:
    """Parse a selector; `SelectorError` lists every bad term."""
    if not isinstance(text, str) or not text.strip():
        raise SelectorError(
            "empty target selector",
            [FieldProblem("target", "name the devices, or '*' for the whole fleet")],
        )
    if text.strip() == ALL:
        return Selector(())
    problems: list[FieldProblem] = []
    terms: list[Term] = []
    parts = text.split(",")
    if len(parts) > MAX_TERMS:
        raise SelectorError(
            "target selector too long", [FieldProblem("target", f"at most {MAX_TERMS} terms")]
        )
    for i, part in enumerate(parts):
        where = f"target[{i}]"
        m = _TERM_RE.match(part)
        if m is None:
            problems.append(
                FieldProblem(where, f"{part.strip()!r} is not KEY OP VALUE (ops: = != >= <= > <)")
            )
            continue
        key, op, raw = m.group(1), m.group(2), m.group(3)
        values = tuple(v.strip() for v in raw.split("|"))
        problem = _check_term(key, op, values)
        if problem:
            problems.append(FieldProblem(where, f"{part.strip()!r}: {problem}"))
            continue
        terms.append(Term(key, op, values))  # type: ignore[arg-type]  # op matched the regex
    if problems:
        raise SelectorError(f"target selector {text!r} rejected", problems)
    return Selector(tuple(terms))


def _check_term(key: str, op: str, values: tuple[str, ...]) -> str | None:
    if not values or any(not v for v in values):
        return "empty value"
    if len(values) > MAX_VALUES:
        return f"at most {MAX_VALUES} values"
    if op in ORDERING_OPS:
        if len(values) != 1:
            return f"{op} takes one number, not a list"
        if _number(values[0]) is None:
            return f"{op} needs a number, got {values[0]!r}"
        return None
    if key in DEVICE_KEYS:
        bad = [v for v in values if not ID_RE.match(v)]
        return f"not a device id: {', '.join(bad[:3])}" if bad else None
    bad = [v for v in values if not _VALUE_RE.match(v)]
    return f"bad characters in {bad[0]!r}" if bad else None


def _lookup(device: DeviceFacts, key: str) -> Any:
    if key in DEVICE_KEYS:
        return device.id
    if key.startswith("labels."):
        return device.labels.get(key[len("labels.") :])
    if key in PROFILE_KEYS:
        return None if device.profile is None else device.profile.get(PROFILE_KEYS[key])
    return device.labels.get(key)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    try:
        out = float(str(value))
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _equal(actual: Any, wanted: str) -> bool:
    a, w = _number(actual), _number(wanted)
    if a is not None and w is not None and not isinstance(actual, str):
        return a == w
    return str(actual) == wanted

"""Misbehaviour on purpose for the fleet simulator: which version, what, on which devices.

`VERSION:KIND[=VALUE][@FRACTION]`, e.g. `1.4.0:crash@0.5`, `1.4.0:errors=0.3`,
`*:offline=30@0.1`; kinds and their meaning are listed in cloud_sync/platform/simulator.py.
Which devices a fraction hits is a stable hash of (fault, device id): a run is repeatable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from cloud_sync.errors import CloudSyncError


class SimulatorError(CloudSyncError):
    code = "simulator_error"
    category = "config"


FaultKind = Literal["crash", "errors", "latency", "offline", "drop"]
_FAULT_RE = re.compile(
    r"^(?P<version>\*|[0-9A-Za-z.+-]+):(?P<kind>crash|errors|latency|offline|drop)"
    r"(?:=(?P<value>[0-9.]+))?(?:@(?P<fraction>[0-9.]+))?$"
)
_NEEDS_VALUE = {"errors", "latency", "offline"}


@dataclass(frozen=True, slots=True)
class Fault:
    version: str  # "*" = any
    kind: FaultKind
    value: float = 0.0
    fraction: float = 1.0

    def hits(self, device: str, version: str | None) -> bool:
        if self.version != "*" and self.version != version:
            return False
        digest = hashlib.sha256(f"{self.kind}:{self.version}\x00{device}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fraction


def parse_fault(text: str) -> Fault:
    m = _FAULT_RE.match(text.strip())
    if m is None:
        raise SimulatorError(
            f"bad fault {text!r}: expected VERSION:KIND[=VALUE][@FRACTION], e.g. "
            "1.4.0:errors=0.3@0.5 (kinds: crash, errors, latency, offline, drop)"
        )
    kind = m.group("kind")
    value = float(m.group("value") or 0.0)
    fraction = float(m.group("fraction") or 1.0)
    if kind in _NEEDS_VALUE and m.group("value") is None:
        raise SimulatorError(f"fault {text!r}: {kind} needs a value ({kind}=...)")
    if not 0.0 <= fraction <= 1.0 or (kind == "errors" and value > 1.0):
        raise SimulatorError(f"fault {text!r}: fractions and error rates are between 0 and 1")
    return Fault(m.group("version"), kind, value, fraction)  # type: ignore[arg-type]


def check_loopback(url: str, what: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SimulatorError(f"{what} {url!r} is not on loopback: the simulator only runs there")

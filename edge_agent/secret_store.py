"""The device's secrets at rest: `secrets.json` in the data dir, every value sealed to the device.

What the platform delivers (`cloud_sync.secrets_sync`) is kept exactly as it arrived: each value
a sealed box (`cloud_sync.sealbox`) encrypted to the device's enrolment key and bound to this
device, the secret's name and its version. So the file holds no clear value and no key of its
own: only the device key (in `credentials.json`, 0600) opens it, and a box copied under another
name or version does not open. The file is written atomically with mode 0600.

Values are opened once when loaded or replaced and kept in memory, where the capability broker
reads them per call (`get`): a rotation is visible to the very next `secret(name)` call.

A damaged file (not JSON, wrong shape, a box that does not open) is set aside as
`secrets.json.corrupt-<stamp>` and the store starts empty: the agent keeps serving and the next
fetch from the platform fills it again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sync.sealbox import SealError, device_aad, open_box
from runtimes.fsio import atomic_write
from runtimes.setaside import set_aside

log = logging.getLogger("edgefn.secrets")

FILE_NAME = "secrets.json"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """One secret as delivered: its name, version and the box sealed to this device."""

    name: str
    version: int
    box: Mapping[str, Any]


class SecretStore:
    """Blocking file I/O (`load`, `replace`): call them in a thread. `get` is memory only."""

    def __init__(self, path: Path, device_id: str, key: ec.EllipticCurvePrivateKey) -> None:
        self.path = Path(path)
        self.device_id = device_id
        self._key = key
        self._values: dict[str, tuple[int, bytes]] = {}
        self._lock = threading.Lock()  # `replace` runs in a thread, `get` on the loop
        self.set_aside: str | None = None

    def get(self, name: str) -> bytes | None:
        held = self._values.get(name)
        return held[1] if held is not None else None

    def versions(self) -> dict[str, int]:
        return {name: v for name, (v, _) in sorted(self._values.items())}

    def load(self) -> None:
        """Read the file; a damaged one is set aside (logged) and the store starts empty."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            sealed = _parse(raw, self.device_id)
            values = self._open_all(sealed)
        except (ValueError, SealError) as exc:
            self.set_aside = set_aside(self.path)
            log.warning(
                "secrets file %s is damaged (%s): set aside as %s, starting with no secrets "
                "until the platform delivers them again",
                self.path.name,
                exc,
                self.set_aside,
            )
            return
        with self._lock:
            self._values = values

    def replace(self, sealed: list[SealedSecret]) -> None:
        """Make `sealed` the device's secrets: every box must open, then the file is replaced
        atomically, then the values in memory; a box that does not open changes nothing."""
        values = self._open_all(sealed)
        doc = {
            "format": FORMAT,
            "device_id": self.device_id,
            "secrets": {s.name: {"version": s.version, "box": dict(s.box)} for s in sealed},
        }
        atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
        with self._lock:
            self._values = values

    def _open_all(self, sealed: list[SealedSecret]) -> dict[str, tuple[int, bytes]]:
        out: dict[str, tuple[int, bytes]] = {}
        for s in sealed:
            aad = device_aad(self.device_id, s.name, s.version)
            out[s.name] = (s.version, open_box(self._key, s.box, aad))
        return out


def _parse(raw: bytes, device_id: str) -> list[SealedSecret]:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a format {FORMAT} secrets document")
    if doc.get("device_id") != device_id:
        raise ValueError(f"it belongs to device {doc.get('device_id')!r}")
    entries = doc.get("secrets")
    if not isinstance(entries, dict):
        raise ValueError("'secrets' must be an object")
    return [parse_entry(name, e) for name, e in entries.items()]


def parse_entry(name: Any, entry: Any) -> SealedSecret:
    """One `{"version": n, "box": {...}}` (the file's and the platform's shape)."""
    if not isinstance(name, str) or not isinstance(entry, dict):
        raise ValueError("a secret entry must be an object under its name")
    version, box = entry.get("version"), entry.get("box")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"secret {name!r}: 'version' must be a positive integer")
    if not isinstance(box, dict):
        raise ValueError(f"secret {name!r}: 'box' must be an object")
    return SealedSecret(name, version, box)

"""Which target devices cannot take a version, and why: for `--dry-run` and for wave planning.

The platform knows from the registry what a bundle needs (its runtime, the artifact keys it
ships, its manifest memory limit, its size) and from each device what it reported (hardware
profile, runtimes). A device the platform can *prove* unfit gets a reason code and is never
notified; the codes are the device's own `rejected` codes (states.REJECT_CODES), so a dry run and
a live device refusal read the same. A device that has not reported enough to tell is eligible:
it checks again itself when it installs, and rejects with the same code if it must.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloud_sync.rollout.selector import DeviceFacts
from hardware.errors import HardwareError
from hardware.profile import DeviceProfile

_MB = 1024 * 1024
# Download the archive, then unpack beside the previous version: about twice the bundle size
# must be free, plus a margin so the install does not leave the data dir full.
DISK_FACTOR = 2
DISK_MARGIN_MB = 16


@dataclass(frozen=True, slots=True)
class BundleFacts:
    """What a registry version requires (cloud_sync/platform/store.py `VersionRecord`)."""

    name: str
    version: str
    runtime: str
    arches: tuple[str, ...] = ()  # artifact keys; empty = arch-independent (e.g. Node)
    memory_mb: int = 0  # the manifest's [limits] memory_mb; 0 = not set
    size: int = 0  # bytes of the bundle file

    @classmethod
    def from_record(cls, record: Mapping[str, Any], memory_mb: int = 0) -> BundleFacts:
        """From a registry version's JSON (`VersionRecord.to_json()`)."""
        return cls(
            name=str(record["name"]),
            version=str(record["version"]),
            runtime=str(record.get("runtime", "")),
            arches=tuple(str(a) for a in record.get("arches") or ()),
            memory_mb=memory_mb,
            size=int(record.get("size") or 0),
        )


@dataclass(frozen=True, slots=True)
class Ineligible:
    device: str
    code: str  # one of states.REJECT_CODES
    reason: str  # for people: names the fact that decided

    def to_dict(self) -> dict[str, str]:
        return {"device": self.device, "code": self.code, "reason": self.reason}


def check_device(device: DeviceFacts, bundle: BundleFacts) -> Ineligible | None:
    """None when the device can (as far as the platform knows) take the version."""
    if device.runtimes is not None and bundle.runtime and bundle.runtime not in device.runtimes:
        have = ", ".join(sorted(device.runtimes)) or "none"
        return Ineligible(
            device.id, "no_runtime", f"needs runtime {bundle.runtime}; device has {have}"
        )
    profile = _profile(device)
    if profile is None:
        return None
    if bundle.arches and not set(profile.artifact_keys) & set(bundle.arches):
        return Ineligible(
            device.id,
            "wrong_arch",
            f"device is {'/'.join(profile.artifact_keys)}; bundle has {', '.join(bundle.arches)}",
        )
    if bundle.memory_mb and profile.memory_total_mb < bundle.memory_mb:
        return Ineligible(
            device.id,
            "insufficient_memory",
            f"bundle asks {bundle.memory_mb} MB; device has {profile.memory_total_mb} MB",
        )
    need_mb = -(-bundle.size * DISK_FACTOR // _MB) + DISK_MARGIN_MB if bundle.size else 0
    if need_mb and profile.disk_free_mb < need_mb:
        return Ineligible(
            device.id,
            "disk_full",
            f"needs about {need_mb} MB free; device has {profile.disk_free_mb} MB",
        )
    return None


def partition(
    devices: Sequence[DeviceFacts], bundle: BundleFacts
) -> tuple[list[DeviceFacts], list[Ineligible]]:
    """(eligible devices, ineligible with reasons), each in the input order."""
    ok: list[DeviceFacts] = []
    bad: list[Ineligible] = []
    for device in devices:
        verdict = check_device(device, bundle)
        if verdict is None:
            ok.append(device)
        else:
            bad.append(verdict)
    return ok, bad


def _profile(device: DeviceFacts) -> DeviceProfile | None:
    if device.profile is None:
        return None
    try:
        return DeviceProfile.from_dict(device.profile)
    except HardwareError:
        # A profile from an older or broken agent: the device decides for itself at install.
        return None

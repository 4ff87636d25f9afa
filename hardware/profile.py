"""What this box is: the device profile the agent reports and the cloud targets rollouts with.

Flow: `detect(data_dir, labels)` reads, in order, the architecture (normalised to the names bundle
artifacts use, or `UnknownArchitecture`), the C library, CPUs, memory, the disk holding the data
dir, the board/gateway model where the firmware tells it, kernel release and hostname, and returns
one frozen `DeviceProfile`. `to_dict()` is what goes to the cloud, `from_dict()` reads it back on
the platform, `artifact_key` picks a bundle's per-arch artifact and `human_text()` is what
`edge-agent profile` prints.

Every reader of /proc and /sys takes `root` (default "/") so tests can point it at a fake tree of
hardware that cannot exist on the test machine. Facts that only the running interpreter can tell
(its libc, its pointer size, psutil's memory figures) are used only when `root` is the real "/".
Detection does blocking file I/O: call it via `asyncio.to_thread` from async code.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the venv: types-psutil

from hardware.arch import ARCHES, normalise_arch
from hardware.errors import HardwareError, UnknownArchitecture

# ARM does not put a readable CPU name in /proc/cpuinfo on arm64; map the common (implementer 0x41)
# part numbers of edge boards. https://developer.arm.com/documentation (Main ID Register, PartNum)
_ARM_PARTS: Mapping[str, str] = MappingProxyType(
    {
        "0xc07": "Cortex-A7",
        "0xc09": "Cortex-A9",
        "0xc0f": "Cortex-A15",
        "0xd03": "Cortex-A53",
        "0xd04": "Cortex-A35",
        "0xd05": "Cortex-A55",
        "0xd07": "Cortex-A57",
        "0xd08": "Cortex-A72",
        "0xd09": "Cortex-A73",
        "0xd0a": "Cortex-A75",
        "0xd0b": "Cortex-A76",
        "0xd0c": "Neoverse-N1",
        "0xd40": "Neoverse-V1",
        "0xd49": "Neoverse-N2",
    }
)

# Placeholders firmware vendors leave in DMI instead of a real name: report "unknown" instead.
_DMI_JUNK = frozenset(
    {
        "",
        "default string",
        "none",
        "not applicable",
        "not specified",
        "o.e.m.",
        "oem",
        "system manufacturer",
        "system product name",
        "system version",
        "to be filled by o.e.m.",
        "type1productconfigid",
        "unknown",
        "x.x",
    }
)

_GLIBC_LOADERS = ("lib/ld-linux-*.so.*", "lib64/ld-linux-*.so.*", "lib/*/ld-linux-*.so.*")
_MUSL_LOADERS = ("lib/ld-musl-*.so.1",)

_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """A snapshot of this device; memory/disk figures are as of detection time."""

    arch: str  # one of ARCHES
    libc: str  # "glibc", "musl" or "unknown"
    libc_version: str  # "" when unknown
    cpu_count: int
    cpu_model: str  # "" when the kernel does not say
    memory_total_mb: int
    memory_available_mb: int
    disk_total_mb: int
    disk_free_mb: int
    data_dir: str
    board_vendor: str  # "" when the firmware does not say
    board_model: str  # "" when the firmware does not say
    kernel: str
    hostname: str
    system: str = "linux"
    labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)

    def __post_init__(self) -> None:
        # Freeze the labels too: a profile is shared between the API, metrics and the sync client.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def artifact_key(self) -> str:
        """The bundle artifact key for this box, e.g. "linux-aarch64"."""
        return f"{self.system}-{self.arch}"

    @property
    def artifact_keys(self) -> tuple[str, ...]:
        """Artifact keys in order of preference: a musl build first on musl systems.

        A plain "linux-<arch>" artifact is expected to be static or glibc-linked; on musl it is
        still the fallback because static Go and C++ binaries run there too.
        """
        if self.libc == "musl":
            return (f"{self.artifact_key}-musl", self.artifact_key)
        return (self.artifact_key,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as reported to the cloud (keys are stable, see docs/hardware.md)."""
        return {
            "system": self.system,
            "arch": self.arch,
            "artifact_key": self.artifact_key,
            "libc": self.libc,
            "libc_version": self.libc_version,
            "cpu_count": self.cpu_count,
            "cpu_model": self.cpu_model,
            "memory_total_mb": self.memory_total_mb,
            "memory_available_mb": self.memory_available_mb,
            "disk_total_mb": self.disk_total_mb,
            "disk_free_mb": self.disk_free_mb,
            "data_dir": self.data_dir,
            "board_vendor": self.board_vendor,
            "board_model": self.board_model,
            "kernel": self.kernel,
            "hostname": self.hostname,
            "labels": dict(self.labels),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceProfile:
        """Read a reported profile back (platform side); refuses missing or mistyped fields."""
        ints = (
            "cpu_count",
            "memory_total_mb",
            "memory_available_mb",
            "disk_total_mb",
            "disk_free_mb",
        )
        strs = (
            "arch",
            "libc",
            "libc_version",
            "cpu_model",
            "data_dir",
            "board_vendor",
            "board_model",
            "kernel",
            "hostname",
            "system",
        )
        values: dict[str, Any] = {}
        for key in ints:
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise HardwareError(
                    f"device profile: {key!r} must be an integer", code="bad_profile"
                )
            values[key] = value
        for key in strs:
            value = data.get(key)
            if not isinstance(value, str):
                raise HardwareError(f"device profile: {key!r} must be a string", code="bad_profile")
            values[key] = value
        if values["arch"] not in ARCHES:
            raise UnknownArchitecture(
                f"device profile: arch {values['arch']!r} is not one of {', '.join(ARCHES)}"
            )
        labels = data.get("labels", {})
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise HardwareError(
                "device profile: 'labels' must map strings to strings", code="bad_profile"
            )
        return cls(labels=labels, **values)


def detect(
    data_dir: Path, labels: Mapping[str, str] = _NO_LABELS, *, root: Path = Path("/")
) -> DeviceProfile:
    """Detect this device's profile. `data_dir` need not exist yet; nothing is created."""
    real = root == Path("/")
    machine = _read_text(root / "proc/sys/kernel/arch") or os.uname().machine
    bits = struct.calcsize("P") * 8 if real else 64
    arch = normalise_arch(machine, userland_bits=bits)
    libc, libc_version = detect_libc(root)
    cpuinfo = _read_text(root / "proc/cpuinfo")
    if real:
        vm = psutil.virtual_memory()
        mem_total, mem_available = vm.total // _MB, vm.available // _MB
    else:
        mem_total, mem_available = _meminfo(root)
    disk = psutil.disk_usage(str(_existing_ancestor(data_dir)))
    vendor, model = detect_board(root, cpuinfo)
    return DeviceProfile(
        arch=arch,
        libc=libc,
        libc_version=libc_version,
        cpu_count=_cpu_count(root, cpuinfo),
        cpu_model=cpu_model(cpuinfo),
        memory_total_mb=mem_total,
        memory_available_mb=mem_available,
        disk_total_mb=disk.total // _MB,
        disk_free_mb=disk.free // _MB,
        data_dir=str(data_dir),
        board_vendor=vendor,
        board_model=model,
        kernel=_read_text(root / "proc/sys/kernel/osrelease") or os.uname().release,
        hostname=_read_text(root / "proc/sys/kernel/hostname") or socket.gethostname(),
        labels=labels,
    )


def detect_libc(root: Path = Path("/")) -> tuple[str, str]:
    """("glibc" | "musl" | "unknown", version or "").

    On the real root the running interpreter is asked first (it is linked against the system
    libc), then `ldd --version`; loader files decide last because Debian's musl package installs
    /lib/ld-musl-* beside glibc and Alpine's gcompat installs a glibc-named loader beside musl.
    """
    if root == Path("/"):
        name, version = platform.libc_ver()
        if name == "glibc":
            return "glibc", version
        ldd = _ldd_version()
        if ldd is not None:
            return ldd
    musl = any(next(iter(root.glob(p)), None) for p in _MUSL_LOADERS)
    glibc = any(next(iter(root.glob(p)), None) for p in _GLIBC_LOADERS)
    if musl and not glibc:
        return "musl", ""
    if glibc:
        return "glibc", ""
    return ("musl", "") if musl else ("unknown", "")


def _ldd_version() -> tuple[str, str] | None:
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    try:
        # musl's ldd prints its banner to stderr and exits 1; glibc's prints to stdout.
        done = subprocess.run(
            [ldd, "--version"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = done.stdout + done.stderr
    found = re.search(r"Version\s+([\d.]+)", out)
    if "musl" in out.lower():
        return "musl", found.group(1) if found else ""
    if "glibc" in out.lower() or "gnu libc" in out.lower():
        found = re.search(r"\)\s+([\d.]+)", out)
        return "glibc", found.group(1) if found else ""
    return None


def cpu_model(cpuinfo: str) -> str:
    """The CPU's name from /proc/cpuinfo text (x86 "model name", ARM part numbers, "Hardware")."""
    fields = _cpuinfo_fields(cpuinfo)
    if fields.get("model name"):
        return fields["model name"]
    if fields.get("cpu implementer") == "0x41" and fields.get("cpu part") in _ARM_PARTS:
        return f"ARM {_ARM_PARTS[fields['cpu part']]}"
    for key in ("processor name", "cpu model", "hardware"):
        if fields.get(key):
            return fields[key]
    return ""


def detect_board(root: Path = Path("/"), cpuinfo: str | None = None) -> tuple[str, str]:
    """(vendor, model) of the board or gateway, "" where the firmware does not say.

    Device tree first (ARM boards), then DMI (x86 gateways), then the "Model" line some ARM
    kernels put in /proc/cpuinfo.
    """
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        model = _read_text(root / base / "model")
        if model:
            compatible = _read_text(root / base / "compatible")
            vendor = compatible.split(",", 1)[0] if "," in compatible else ""
            return vendor, model
    dmi = root / "sys/class/dmi/id"
    vendor = _dmi(dmi / "sys_vendor") or _dmi(dmi / "board_vendor")
    model = _dmi(dmi / "product_name") or _dmi(dmi / "board_name")
    if vendor or model:
        return vendor, model
    if cpuinfo is None:
        cpuinfo = _read_text(root / "proc/cpuinfo")
    # Capital "Model" is the board on ARM kernels; x86's lower-case "model" is a CPU model number.
    found = re.search(r"^Model\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return "", found.group(1).strip() if found else ""


def human_text(profile: DeviceProfile) -> str:
    """Multi-line text for `edge-agent profile`."""
    libc = f"{profile.libc} {profile.libc_version}".strip()
    board = profile.board_model or "unknown"
    if profile.board_vendor:
        board += f" ({profile.board_vendor})"
    labels = ", ".join(f"{k}={v}" for k, v in sorted(profile.labels.items())) or "none"
    rows = [
        ("arch", f"{profile.arch} ({profile.artifact_key}, {libc})"),
        ("board", board),
        ("cpu", f"{profile.cpu_count} x {profile.cpu_model or 'unknown model'}"),
        (
            "memory",
            f"{profile.memory_total_mb} MB total, {profile.memory_available_mb} MB available",
        ),
        (
            "disk",
            f"{profile.disk_total_mb} MB total, {profile.disk_free_mb} MB free "
            f"(data dir {profile.data_dir})",
        ),
        ("kernel", profile.kernel),
        ("hostname", profile.hostname),
        ("labels", labels),
    ]
    return "\n".join(f"{name:<10}{value}" for name, value in rows) + "\n"


def _read_text(path: Path) -> str:
    """File text with device-tree NULs and whitespace stripped; "" when unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def _dmi(path: Path) -> str:
    value = _read_text(path)
    return "" if value.lower() in _DMI_JUNK else value


def _cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    """First value of each key (lower-cased) in /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _cpu_count(root: Path, cpuinfo: str) -> int:
    """Online CPUs (/sys/devices/system/cpu/online, e.g. "0-3,6"), else cpuinfo, else Python."""
    online = _read_text(root / "sys/devices/system/cpu/online")
    count = 0
    for part in filter(None, online.split(",")):
        low, _, high = part.partition("-")
        try:
            count += int(high or low) - int(low) + 1
        except ValueError:
            count = 0
            break
    if count > 0:
        return count
    processors = sum(1 for line in cpuinfo.splitlines() if re.match(r"processor\s*:", line))
    return processors or os.cpu_count() or 1


def _meminfo(root: Path) -> tuple[int, int]:
    """(total, available) MB from /proc/meminfo (values there are in kB)."""
    values: dict[str, int] = {}
    for line in _read_text(root / "proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        number = rest.split()
        if number and number[0].isdigit():
            values[key.strip()] = int(number[0]) // 1024
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", total))


def _existing_ancestor(path: Path) -> Path:
    """The data dir, or its nearest existing parent: profiling must not create directories."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path

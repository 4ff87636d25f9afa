"""Device profile detection: this machine, and fake /proc + /sys trees of boards it is not."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from hardware.errors import HardwareError, UnknownArchitecture
from hardware.profile import (
    ARCHES,
    DeviceProfile,
    cpu_model,
    detect,
    detect_libc,
    human_text,
    normalise_arch,
)

PI_CPUINFO = "".join(
    f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
    "CPU revision\t: 3\n\n"
    for n in range(4)
) + ("Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")

MEMINFO = "MemTotal:        3884164 kB\nMemFree:          812345 kB\nMemAvailable:    3012345 kB\n"


def _tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def _pi(root: Path, arch: str = "aarch64") -> Path:
    return _tree(
        root,
        {
            "proc/sys/kernel/arch": f"{arch}\n",
            "proc/sys/kernel/osrelease": "6.6.31+rpt-rpi-v8\n",
            "proc/sys/kernel/hostname": "pi-gw-7\n",
            "proc/cpuinfo": PI_CPUINFO,
            "proc/meminfo": MEMINFO,
            "proc/device-tree/model": b"Raspberry Pi 4 Model B Rev 1.4\0",
            "proc/device-tree/compatible": b"raspberrypi,4-model-b\0brcm,bcm2711\0",
            "sys/devices/system/cpu/online": "0-3\n",
            "lib/ld-linux-aarch64.so.1": "",
        },
    )


def test_raspberry_pi_like_board(tmp_path: Path) -> None:
    root = _pi(tmp_path / "root")
    data_dir = tmp_path / "data" / "edgefn"
    profile = detect(data_dir, {"site": "plant-3"}, root=root)
    assert profile.arch == "aarch64"
    assert profile.artifact_key == "linux-aarch64"
    assert profile.artifact_keys == ("linux-aarch64",)
    assert profile.libc == "glibc"
    assert profile.cpu_count == 4
    assert profile.cpu_model == "ARM Cortex-A72"
    assert profile.memory_total_mb == 3884164 // 1024
    assert profile.memory_available_mb == 3012345 // 1024
    assert profile.board_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert profile.board_vendor == "raspberrypi"
    assert profile.kernel == "6.6.31+rpt-rpi-v8"
    assert profile.hostname == "pi-gw-7"
    assert dict(profile.labels) == {"site": "plant-3"}
    assert profile.disk_total_mb > 0
    assert not data_dir.exists() and not data_dir.parent.exists()  # detection creates nothing


def test_musl_gateway_with_dmi_and_firmware_placeholders(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "proc/sys/kernel/arch": "x86_64\n",
            "proc/cpuinfo": "processor\t: 0\nmodel\t\t: 92\nmodel name\t: Intel Atom E3940\n",
            "proc/meminfo": MEMINFO,
            "sys/class/dmi/id/sys_vendor": "Advantech\n",
            "sys/class/dmi/id/product_name": "To be filled by O.E.M.\n",
            "sys/class/dmi/id/board_name": "UNO-2271G\n",
            "lib/ld-musl-x86_64.so.1": "",
        },
    )
    profile = detect(tmp_path, root=root)
    assert profile.arch == "x86_64"
    assert profile.libc == "musl"
    assert profile.artifact_keys == ("linux-x86_64-musl", "linux-x86_64")
    assert profile.cpu_count == 1  # no /sys online list: counted from cpuinfo
    assert profile.cpu_model == "Intel Atom E3940"
    assert (profile.board_vendor, profile.board_model) == ("Advantech", "UNO-2271G")


def test_board_from_cpuinfo_when_firmware_is_silent(tmp_path: Path) -> None:
    root = _pi(tmp_path)
    for name in ("model", "compatible"):
        (root / "proc/device-tree" / name).unlink()
    profile = detect(tmp_path, root=root)
    assert (profile.board_vendor, profile.board_model) == ("", "Raspberry Pi 4 Model B Rev 1.4")


def test_unknown_architecture_is_refused_clearly(tmp_path: Path) -> None:
    root = _pi(tmp_path, arch="mips64")
    with pytest.raises(UnknownArchitecture) as caught:
        detect(tmp_path, root=root)
    assert caught.value.code == "unknown_architecture"
    assert isinstance(caught.value, HardwareError)
    assert "'mips64'" in caught.value.message
    for arch in ARCHES:
        assert arch in caught.value.message


@pytest.mark.parametrize(
    ("machine", "bits", "expected"),
    [
        ("x86_64", 64, "x86_64"),
        ("amd64", 64, "x86_64"),
        ("AMD64", 64, "x86_64"),
        ("aarch64", 64, "aarch64"),
        ("arm64", 64, "aarch64"),
        ("aarch64", 32, "armv7"),  # 64-bit kernel, 32-bit userland (Raspberry Pi OS 32-bit)
        ("armv7l", 32, "armv7"),
        ("armhf", 32, "armv7"),
        ("armv8l", 32, "armv7"),
    ],
)
def test_arch_names_are_normalised(machine: str, bits: int, expected: str) -> None:
    assert normalise_arch(machine, userland_bits=bits) == expected


@pytest.mark.parametrize("machine", ["i686", "armv6l", "riscv64", "mips", ""])
def test_arches_we_do_not_build_for(machine: str) -> None:
    with pytest.raises(UnknownArchitecture):
        normalise_arch(machine)


def test_cpu_model_fallbacks() -> None:
    assert cpu_model("Hardware\t: BCM2835\n") == "BCM2835"
    assert cpu_model("CPU implementer\t: 0x41\nCPU part\t: 0xfff\n") == ""
    assert cpu_model("") == ""


def test_this_machine(tmp_path: Path) -> None:
    profile = detect(tmp_path, {"role": "ci"})
    assert profile.arch == normalise_arch(platform.machine())
    assert profile.libc in ("glibc", "musl")
    assert profile.libc == detect_libc()[0]
    assert profile.cpu_count >= 1
    assert 0 < profile.memory_available_mb <= profile.memory_total_mb
    assert 0 <= profile.disk_free_mb <= profile.disk_total_mb
    assert profile.kernel == os.uname().release
    assert profile.hostname == platform.node()
    text = human_text(profile)
    assert profile.artifact_key in text and "role=ci" in text


def test_dict_round_trip_is_json(tmp_path: Path) -> None:
    profile = detect(tmp_path, {"site": "lab"}, root=_pi(tmp_path / "root"))
    data = json.loads(json.dumps(profile.to_dict()))
    assert data["artifact_key"] == "linux-aarch64"
    assert DeviceProfile.from_dict(data) == profile


def test_from_dict_refuses_bad_reports(tmp_path: Path) -> None:
    data = detect(tmp_path, root=_pi(tmp_path / "root")).to_dict()
    with pytest.raises(HardwareError, match="cpu_count"):
        DeviceProfile.from_dict({**data, "cpu_count": "4"})
    with pytest.raises(UnknownArchitecture):
        DeviceProfile.from_dict({**data, "arch": "sparc"})
    with pytest.raises(HardwareError, match="labels"):
        DeviceProfile.from_dict({**data, "labels": {"a": 1}})


def test_profile_is_immutable(tmp_path: Path) -> None:
    labels = {"site": "lab"}
    profile = detect(tmp_path, labels, root=_pi(tmp_path / "root"))
    labels["site"] = "changed"
    assert profile.labels["site"] == "lab"
    with pytest.raises(TypeError):
        profile.labels["x"] = "y"  # type: ignore[index]

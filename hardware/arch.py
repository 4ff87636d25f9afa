"""The one architecture vocabulary: every name edgefn uses for a CPU architecture, in one table.

A device reports its arch (`hardware.profile`), a bundle keys its per-arch artifacts by it
(`linux-aarch64`), the Go builder turns it into GOARCH/GOARM, the C++ builder into a GNU cross
triple and the Debian package that provides the cross compiler, and the author CLI accepts the
names people type (`arm64`, `armhf`, `linux-armv7l`). All of them read this table, so they
cannot disagree again (they once did, on `armv7` vs `armv7l`).

Canonical names are what devices report and what artifact keys carry: `x86_64`, `aarch64`,
`armv7`. Aliases are what kernels (`uname -m`), Debian (`dpkg --print-architecture`), Docker and
Go call the same thing. Pure code: no I/O except `host_arch`, which asks the running interpreter.
"""

from __future__ import annotations

import platform
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hardware.errors import UnknownArchitecture

# Bundles are built for Linux only: the agent relies on setpriv, prctl and cgroups.
SYSTEM = "linux"


@dataclass(frozen=True, slots=True)
class Arch:
    """One architecture we build artifacts for, under every name a tool gives it."""

    name: str  # canonical: what devices report, the middle of the artifact key
    aliases: tuple[str, ...]  # other spellings accepted on input (uname -m, Debian, Docker, Go)
    goarch: str  # GOARCH
    goarm: str  # GOARM ("" when GOARCH is not arm)
    triple: str  # GNU triple of the Debian cross compiler: <triple>-g++
    cross_package: str  # the Debian package providing <triple>-g++
    elf_machine: int  # ELF e_machine of binaries for it (EM_X86_64, EM_AARCH64, EM_ARM)
    elf_class: int  # 1 = ELFCLASS32, 2 = ELFCLASS64

    @property
    def bundle_key(self) -> str:
        """The artifact key in a bundle: `artifacts/<bundle_key>.tar.gz`."""
        return f"{SYSTEM}-{self.name}"


TABLE: tuple[Arch, ...] = (
    Arch(
        name="x86_64",
        aliases=("amd64", "x64"),
        goarch="amd64",
        goarm="",
        triple="x86_64-linux-gnu",
        cross_package="g++-x86-64-linux-gnu",
        elf_machine=62,
        elf_class=2,
    ),
    Arch(
        name="aarch64",
        aliases=("arm64",),
        goarch="arm64",
        goarm="",
        triple="aarch64-linux-gnu",
        cross_package="g++-aarch64-linux-gnu",
        elf_machine=183,
        elf_class=2,
    ),
    # armv8l is a 32-bit ARM personality on an ARMv8 CPU: it runs armv7 (armhf) binaries.
    # GOARM=7 matches armhf: hardware floating point, ARMv7 instructions.
    Arch(
        name="armv7",
        aliases=("armv7l", "armhf", "armv8l", "arm"),
        goarch="arm",
        goarm="7",
        triple="arm-linux-gnueabihf",
        cross_package="g++-arm-linux-gnueabihf",
        elf_machine=40,
        elf_class=1,
    ),
)

ARCHES: tuple[str, ...] = tuple(a.name for a in TABLE)
BY_NAME: Mapping[str, Arch] = MappingProxyType(
    {spelling: a for a in TABLE for spelling in (a.name, *a.aliases)}
)


def lookup(name: str) -> Arch:
    """The table row for any accepted spelling, with or without `linux-` (`linux-armv7l`).

    Raises UnknownArchitecture naming what is supported.
    """
    key = name.strip().lower()
    key = key.removeprefix(f"{SYSTEM}-")
    arch = BY_NAME.get(key)
    if arch is None:
        raise UnknownArchitecture(
            f"unsupported CPU architecture {name.strip()!r}: edgefn runs on "
            f"{', '.join(ARCHES)} (also known as amd64, arm64, armv7l/armhf); no bundle "
            "artifact could run on this device"
        )
    return arch


def normalise_arch(machine: str, *, userland_bits: int = 64) -> str:
    """Map a kernel/toolchain machine name to one of ARCHES, or raise UnknownArchitecture.

    `userland_bits` is the pointer size of the programs that will run: a 64-bit ARM kernel with a
    32-bit userland (Raspberry Pi OS 32-bit) says "aarch64" but can only run armv7 binaries.
    """
    arch = lookup(machine).name
    if arch == "aarch64" and userland_bits == 32:
        return "armv7"
    return arch


def host_arch() -> Arch:
    """The row for the programs this interpreter can run (its pointer size decides 32/64-bit)."""
    return lookup(normalise_arch(platform.machine(), userland_bits=struct.calcsize("P") * 8))


def bundle_key(name: str) -> str:
    """`linux-<canonical>` for any accepted spelling: `bundle_key("arm64") == "linux-aarch64"`."""
    return lookup(name).bundle_key

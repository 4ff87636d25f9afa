"""One architecture vocabulary: the profile, the bundle format, both builders and the author CLI
all read `hardware.arch`, and what they produce for each arch agrees with the table."""

from __future__ import annotations

import platform
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cloud_sync.author.arches import target_arches
from hardware.arch import ARCHES, BY_NAME, TABLE, bundle_key, host_arch, lookup
from hardware.errors import UnknownArchitecture
from hardware.profile import ARCHES as PROFILE_ARCHES
from hardware.profile import detect, normalise_arch
from runtimes import bundle
from runtimes.cppbuild import compiler_for
from runtimes.errors import BuildError, ToolchainError
from runtimes.gobuild import build_go, find_go, goarch_name
from runtimes.verify import Ed25519Verifier
from tests.registry_helpers import build, cli, ok

SPELLINGS = sorted(BY_NAME)  # every canonical name and alias


def test_the_table_is_the_profiles_vocabulary() -> None:
    assert PROFILE_ARCHES == ARCHES == ("x86_64", "aarch64", "armv7")
    for spelling in SPELLINGS:
        assert normalise_arch(spelling) == BY_NAME[spelling].name
        assert normalise_arch(f"  {spelling.upper()} ") == BY_NAME[spelling].name


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_means_the_same_arch_everywhere(spelling: str) -> None:
    arch = BY_NAME[spelling]
    assert lookup(f"linux-{spelling}") is arch
    assert bundle_key(spelling) == f"linux-{arch.name}"
    assert bundle.ARCH_RE.match(arch.bundle_key)
    assert goarch_name(spelling) == arch.goarch
    assert target_arches(spelling)[-1] is arch
    assert target_arches(f"linux-{spelling}")[-1] is arch


def test_armv7_is_one_name_not_two() -> None:
    # The old tables said "armv7" (profile, CLI) and "armv7l" (C++ builder, bundle host key).
    assert {a.bundle_key for a in (lookup("armv7l"), lookup("armhf"), lookup("arm"))} == {
        "linux-armv7"
    }
    assert lookup("armv7").goarm == "7" and lookup("armv7").triple == "arm-linux-gnueabihf"


@pytest.mark.parametrize("name", ["i686", "armv6l", "riscv64", "mips", "linux-", ""])
def test_unknown_arches_are_refused_by_every_reader(name: str) -> None:
    with pytest.raises(UnknownArchitecture):
        lookup(name)
    with pytest.raises(BuildError):
        goarch_name(name)
    if name:
        with pytest.raises(ValueError, match="unknown arch"):
            target_arches(f"x86_64,{name}")


def test_host_arch_agrees_between_the_profile_and_the_bundle_format(tmp_path: Path) -> None:
    profile = detect(tmp_path / "data")
    assert bundle.host_arch() == profile.artifact_key == host_arch().bundle_key
    assert target_arches("")[0] == host_arch()


@pytest.mark.parametrize("name", [a.name for a in TABLE if a != host_arch()])
def test_cpp_cross_compiler_comes_from_the_table(name: str) -> None:
    row = lookup(name)
    if shutil.which(f"{row.triple}-g++"):
        assert compiler_for(row.name).endswith(f"{row.triple}-g++")
        return
    with pytest.raises(ToolchainError) as exc:
        compiler_for(row.aliases[0])
    assert row.cross_package in exc.value.message and row.triple in exc.value.message


def _elf(path: Path) -> tuple[int, int]:
    """(EI_CLASS, e_machine) of an ELF file."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not ELF"
    return head[4], struct.unpack_from("<H", head, 18)[0]


def _go_setting(go: Path, binary: Path, key: str) -> str:
    out = subprocess.run(
        [str(go), "version", "-m", str(binary)], capture_output=True, text=True, timeout=60
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["build"] and parts[1].startswith(f"{key}="):
            return parts[1].split("=", 1)[1]
    return ""


@pytest.mark.slow
def test_go_bundle_for_every_arch_holds_the_binaries_the_table_describes(tmp_path: Path) -> None:
    """`fn build --arch` with alias spellings: artifact keys a device reports, ELF headers and
    GOARCH/GOARM as the table says."""
    go = find_go()
    ok(cli("keys", "create", "--out", tmp_path / "k.key"))
    fn = tmp_path / "hello"
    ok(cli("fn", "new", "hello", "--runtime", "go", "--dir", fn))
    out = build(fn, tmp_path / "k.key", tmp_path / "h.efb", "arm64", "armv7l", "amd64")
    verified = Ed25519Verifier.from_files([tmp_path / "k.key.pub"]).verify(out)
    assert set(verified.arches) == {a.bundle_key for a in TABLE}
    for arch in TABLE:
        dest = tmp_path / arch.name
        verified.unpack(arch.bundle_key, dest)
        binary = dest / "hello"
        assert _elf(binary) == (arch.elf_class, arch.elf_machine)
        assert _go_setting(go, binary, "GOARCH") == arch.goarch
        assert _go_setting(go, binary, "GOARM") == arch.goarm


def test_go_builder_refuses_an_arch_outside_the_table(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="riscv64"):
        build_go(tmp_path, tmp_path / "bin", goarch="riscv64")


def test_host_machine_name_is_in_the_table() -> None:
    assert lookup(platform.machine()) == host_arch()

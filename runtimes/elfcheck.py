"""Does an unpacked artifact run on this device? Its ELF headers say so before anything runs.

A mislabelled bundle (an x86_64 build under `artifacts/linux-aarch64.tar.gz`) passes the
signature and digest checks: the publisher signed what it built. Without this check the device
would install it and fail at the warm start with "Exec format error", or worse run it under a
binfmt emulator. Every regular file that starts with the ELF magic must have the class (32/64
bit) and machine (`e_machine`) of the arch it was installed for (`hardware.arch` owns those
numbers); anything else is refused with `wrong_arch`. Scripts and data files are not ELF and
are not checked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from hardware.arch import lookup
from runtimes.errors import BundleError

ELF_MAGIC = b"\x7fELF"
# e_ident[EI_CLASS] at 4, e_ident[EI_DATA] at 5, e_machine (2 bytes) at 18.
_HEADER_BYTES = 20


def elf_identity(path: Path) -> tuple[int, int] | None:
    """(ELF class, e_machine) of `path`, or None when it is not an ELF file."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or not head.startswith(ELF_MAGIC):
        return None
    order: Literal["little", "big"] = "big" if head[5] == 2 else "little"
    return head[4], int.from_bytes(head[18:20], order)


def check_tree(root: Path, arch_key: str) -> int:
    """Refuse (BundleError `wrong_arch`) an ELF file under `root` not built for `arch_key`;
    returns how many ELF files were checked. Symlinks are not followed (unpack refuses them)."""
    arch = lookup(arch_key)
    checked = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            ident = elf_identity(path)
            if ident is None:
                continue
            checked += 1
            if ident != (arch.elf_class, arch.elf_machine):
                rel = path.relative_to(root)
                raise BundleError(
                    f"{rel}: ELF class {ident[0]} machine {ident[1]}, but this artifact is for "
                    f"{arch.bundle_key} (class {arch.elf_class} machine {arch.elf_machine}): "
                    "a mislabelled bundle",
                    code="wrong_arch",
                )
    return checked

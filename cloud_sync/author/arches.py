"""Which arches `fn build` targets: this machine first, then `--arch`, named by `hardware.arch`."""

from __future__ import annotations

from hardware.arch import TABLE, Arch, host_arch, lookup
from hardware.errors import UnknownArchitecture


def target_arches(extra: str) -> list[Arch]:
    """Host arch first, then the comma-separated `--arch` list (any accepted spelling), deduped.

    Raises ValueError for a name the table does not know.
    """
    out = [host_arch()]
    for item in (a.strip() for a in extra.split(",")):
        if not item:
            continue
        try:
            arch = lookup(item)
        except UnknownArchitecture:
            names = ", ".join(a.name for a in TABLE)
            raise ValueError(f"unknown arch {item!r}: use {names}") from None
        if arch not in out:
            out.append(arch)
    return out

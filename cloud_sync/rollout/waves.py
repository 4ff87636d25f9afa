"""Deterministic wave assignment: which devices go in which wave of a rollout.

Each device gets a *slot* in [0, 1): the first 8 bytes of sha256(rollout id, device id) as a
fraction. Sorting the target by slot and cutting it at the cumulative percentages gives waves that

- are the same after a platform restart (nothing random, nothing stored is needed to recompute);
- do not depend on the order devices are listed in;
- are exact: wave i ends at ceil(pct_i% of N) devices, so a 1% first wave of 50 devices still
  has one device to judge the version on, and the last wave (100%) holds everyone;
- differ between rollouts (the rollout id is in the hash), so the same unlucky devices are not
  always first.

A device that joins the target while the rollout runs (enrolled, relabelled) is placed by its
slot alone (`wave_of_slot`): the first wave whose cumulative fraction exceeds its slot. That keeps
the proportions for newcomers without moving anyone already assigned.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence


def slot(rollout_id: str, device_id: str) -> float:
    """The device's stable position in [0, 1) for this rollout."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def wave_ends(total: int, waves: Sequence[float]) -> list[int]:
    """Cumulative device counts per wave: ceil(pct% of total), the last always `total`."""
    ends = [min(total, math.ceil(total * pct / 100 - 1e-9)) for pct in waves]
    if ends:
        ends[-1] = total
    return ends


def assign(rollout_id: str, device_ids: Iterable[str], waves: Sequence[float]) -> dict[str, int]:
    """Map every device id to its wave index (0-based). `waves` are cumulative percentages."""
    ordered = sorted(set(device_ids), key=lambda d: (slot(rollout_id, d), d))
    out: dict[str, int] = {}
    start = 0
    for index, end in enumerate(wave_ends(len(ordered), waves)):
        for device in ordered[start:end]:
            out[device] = index
        start = max(start, end)
    return out


def wave_of_slot(value: float, waves: Sequence[float]) -> int:
    """The wave of a late joiner with slot `value`."""
    for index, pct in enumerate(waves):
        if value < pct / 100:
            return index
    return len(waves) - 1


def wave_sizes(assignment: dict[str, int], count: int) -> list[int]:
    """How many devices each of `count` waves holds."""
    sizes = [0] * count
    for index in assignment.values():
        sizes[index] += 1
    return sizes

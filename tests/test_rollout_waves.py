"""Deterministic wave assignment: stable, order-independent, exact proportions (bounded loops)."""

from __future__ import annotations

import math
import random

import pytest

from cloud_sync.rollout import waves

WAVES = (1.0, 10.0, 50.0, 100.0)


def ids(n: int, prefix: str = "edge") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def test_slot_is_stable_and_in_range() -> None:
    # A fixed value: a change of hash would silently reshuffle every running rollout on upgrade.
    assert waves.slot("r-1", "edge-00001") == waves.slot("r-1", "edge-00001")
    assert round(waves.slot("r-1", "edge-00001"), 12) == round(
        int.from_bytes(__import__("hashlib").sha256(b"r-1\x00edge-00001").digest()[:8], "big")
        / 2**64,
        12,
    )
    for device in ids(1000):
        assert 0.0 <= waves.slot("r-1", device) < 1.0


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 99, 100, 101, 1000, 4321])
def test_wave_sizes_are_exact_cumulative_ceilings(n: int) -> None:
    assignment = waves.assign("r-xyz", ids(n), WAVES)
    assert len(assignment) == n
    sizes = waves.wave_sizes(assignment, len(WAVES))
    cumulative = [sum(sizes[: i + 1]) for i in range(len(WAVES))]
    assert cumulative == [min(n, math.ceil(n * p / 100 - 1e-9)) for p in WAVES[:-1]] + [n]
    assert sizes[0] >= 1  # even a 1% canary of a tiny fleet has a device to judge on


def test_same_assignment_in_any_order_and_after_a_restart() -> None:
    devices = ids(500)
    first = waves.assign("r-stable", devices, WAVES)
    rng = random.Random(1234)
    for _ in range(20):  # bounded: 20 shuffles
        shuffled = devices[:]
        rng.shuffle(shuffled)
        assert waves.assign("r-stable", shuffled, WAVES) == first
    assert waves.assign("r-stable", devices + devices[:10], WAVES) == first  # duplicates ignored


def test_different_rollouts_pick_different_canaries() -> None:
    devices = ids(1000)
    canaries = [
        {d for d, w in waves.assign(f"r-{i}", devices, WAVES).items() if w == 0} for i in range(20)
    ]
    assert all(len(c) == 10 for c in canaries)
    # 20 canaries of 10 out of 1000: if they were the same devices the hash ignored the id.
    assert len(set().union(*canaries)) > 150


def test_late_joiners_by_slot_keep_the_proportions() -> None:
    counts = [0] * len(WAVES)
    n = 20_000
    for device in ids(n, "late"):  # bounded: 20k hash evaluations
        counts[waves.wave_of_slot(waves.slot("r-late", device), WAVES)] += 1
    shares = [c / n for c in counts]
    expected = [0.01, 0.09, 0.40, 0.50]
    for got, want in zip(shares, expected, strict=True):
        assert abs(got - want) < 0.02, (shares, expected)


def test_growing_the_fleet_moves_few_devices_to_an_earlier_wave() -> None:
    # Assignment is by rank, so adding devices can shift boundaries, but the order of the
    # existing devices never changes: the canary of 1000 stays a prefix of the 1100 ranking.
    small = waves.assign("r-grow", ids(1000), (50.0, 100.0))
    big = waves.assign("r-grow", ids(1100), (50.0, 100.0))
    moved_later = [d for d in small if big[d] > small[d]]
    assert len(moved_later) <= 100 * 0.5 + 1

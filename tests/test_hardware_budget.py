"""Worker budget accounting (pure)."""

from __future__ import annotations

import pytest

from hardware.budget import BudgetConfig, WorkerBudget
from hardware.errors import BudgetExhausted, HardwareError
from hardware.profile import DeviceProfile


def _profile(memory_mb: int = 4096, cpus: int = 4) -> DeviceProfile:
    return DeviceProfile(
        arch="aarch64",
        libc="glibc",
        libc_version="2.36",
        cpu_count=cpus,
        cpu_model="ARM Cortex-A72",
        memory_total_mb=memory_mb,
        memory_available_mb=memory_mb // 2,
        disk_total_mb=30000,
        disk_free_mb=20000,
        data_dir="/var/lib/edgefn",
        board_vendor="raspberrypi",
        board_model="Raspberry Pi 4 Model B Rev 1.4",
        kernel="6.6.31",
        hostname="pi",
    )


def test_defaults_from_the_profile() -> None:
    budget = WorkerBudget.from_profile(_profile(4096, 4))
    assert budget.memory_mb == 4096 // 2 - 64
    assert budget.max_workers == 16


def test_config_overrides() -> None:
    config = BudgetConfig(memory_fraction=0.25, reserve_mb=0, max_workers=3)
    budget = WorkerBudget.from_profile(_profile(4096), config)
    assert (budget.memory_mb, budget.max_workers) == (1024, 3)
    fixed = WorkerBudget.from_profile(_profile(4096), BudgetConfig(memory_mb=300))
    assert fixed.memory_mb == 300


def test_tiny_device_floors_at_zero() -> None:
    budget = WorkerBudget.from_profile(_profile(96, 1))
    assert budget.memory_mb == 0
    with pytest.raises(BudgetExhausted) as caught:
        budget.reserve(16)
    assert caught.value.code == "budget_too_small"


def test_memory_is_charged_and_released() -> None:
    budget = WorkerBudget(200, 10)
    first = budget.admit(128)
    assert first is not None
    assert budget.admit(128) is None  # 256 > 200: refused, nothing charged
    assert budget.snapshot().memory_used_mb == 128
    reason = budget.refusal(128)
    assert reason is not None and "128 of 200 MB" in reason
    first.release()
    first.release()  # idempotent: a double stop must not free memory twice
    assert budget.snapshot().memory_used_mb == 0
    assert budget.snapshot().workers == 0
    assert budget.admit(128) is not None


def test_worker_count_is_capped() -> None:
    budget = WorkerBudget(10_000, 2)
    leases = [budget.reserve(10), budget.reserve(10)]
    with pytest.raises(BudgetExhausted) as caught:
        budget.reserve(10)
    assert caught.value.code == "budget_exhausted"
    assert "2 of 2 workers" in caught.value.message
    leases[0].release()
    assert budget.admit(10) is not None


def test_unlimited_worker_is_charged_the_default() -> None:
    budget = WorkerBudget(100, 10, default_worker_mb=40)
    assert budget.charge(0) == 40
    budget.reserve(0)
    budget.reserve(0)
    assert budget.admit(0) is None
    assert budget.snapshot().memory_used_mb == 80


def test_a_worker_larger_than_the_budget_can_never_fit() -> None:
    budget = WorkerBudget(100, 10)
    with pytest.raises(BudgetExhausted) as caught:
        budget.reserve(101)
    assert caught.value.code == "budget_too_small"


@pytest.mark.parametrize(
    "config",
    [
        {"memory_fraction": 0.0},
        {"memory_fraction": 1.5},
        {"reserve_mb": -1},
        {"max_workers": -1},
        {"default_worker_mb": 0},
    ],
)
def test_bad_config_is_refused(config: dict[str, float]) -> None:
    with pytest.raises(HardwareError):
        BudgetConfig(**config)  # type: ignore[arg-type]

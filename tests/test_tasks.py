"""`runtimes.tasks.stop`: a stop always ends, and never eats the caller's own cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runtimes import tasks


@pytest.fixture(autouse=True)
def quick_recancel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_S", 0.05)


async def _stubborn(refusals: list[int], ran: list[str]) -> None:
    """Swallows its first `refusals[0]` cancellations, as a loop around 3.11's wait_for can."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if refusals[0] == 0:
                ran.append("ended")
                raise
            refusals[0] -= 1
            ran.append("refused")


async def test_a_task_that_loses_its_cancellation_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []
    task = asyncio.create_task(_stubborn([2], ran), name="stubborn loop")
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await tasks.stop(task)
    assert task.cancelled()
    assert ran == ["refused", "refused", "ended"]
    assert "stubborn loop did not stop" in caplog.text


async def test_the_callers_own_cancellation_goes_through() -> None:
    ran: list[str] = []
    refusals = [10**6]
    stubborn = asyncio.create_task(_stubborn(refusals, ran))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(tasks.stop(stubborn))
    await asyncio.sleep(0.12)  # a few re-cancels in
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await stopper
    assert stopper.cancelled()
    assert "refused" in ran and not stubborn.done()
    refusals[0] = 0  # now it gives in: the next stop ends it
    async with asyncio.timeout(5):
        await tasks.stop(stubborn)
    assert ran[-1] == "ended"


async def test_a_failed_task_is_logged_not_raised_and_none_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail() -> None:
        raise OSError("disk gone")

    failed = asyncio.create_task(fail(), name="writer")
    sleeper = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="edgefn.tasks"):
        await tasks.stop(None, failed, sleeper, None)
    assert sleeper.cancelled()
    assert "writer had failed before it was stopped: OSError('disk gone')" in caplog.text

"""A platform slow or stuck on shutdown explains itself (`shutdown_watch.py`): a slow step is
named in the log, the watchdog dumps thread and task stacks when shutdown overruns, and SIGUSR1
dumps a running platform's stacks without stopping it."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import pytest
from aiohttp import web

from cloud_sync.platform import shutdown_watch
from cloud_sync.platform.shutdown_watch import Watchdog, time_shutdown_steps
from tests.registry_helpers import start_platform


async def test_a_slow_cleanup_step_is_named_in_the_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown_watch, "SLOW_STEP_S", 0.05)
    app = web.Application()
    ran: list[str] = []

    async def close_the_slow_store(app: web.Application) -> None:
        await asyncio.sleep(0.2)
        ran.append("slow")

    async def quick(app: web.Application) -> None:
        ran.append("quick")

    app.on_cleanup.append(close_the_slow_store)
    app.on_shutdown.append(quick)
    time_shutdown_steps(app)
    runner = web.AppRunner(app)
    await runner.setup()
    with caplog.at_level(logging.WARNING, "edgefn.platform"):
        await runner.cleanup()
    assert ran == ["quick", "slow"]  # the wrapped steps still run, in order
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1 and "close_the_slow_store" in slow[0], slow


async def test_a_stuck_step_is_given_up_and_the_steps_after_it_still_run(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown_watch, "STEP_LIMIT_S", 0.2)
    app = web.Application()
    closed: list[str] = []

    async def wait_for_ever(app: web.Application) -> None:
        await asyncio.sleep(60)

    async def close_the_stores(app: web.Application) -> None:
        closed.append("stores")

    app.on_cleanup.extend([wait_for_ever, close_the_stores])
    time_shutdown_steps(app)
    runner = web.AppRunner(app)
    await runner.setup()
    with caplog.at_level(logging.ERROR, "edgefn.platform"):
        await asyncio.wait_for(runner.cleanup(), 10)
    assert closed == ["stores"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "wait_for_ever did not finish" in errors[0], errors


async def test_the_watchdog_dumps_threads_and_tasks_when_shutdown_overruns(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    async def stuck_in_cleanup() -> None:
        await asyncio.sleep(30)

    task = asyncio.create_task(stuck_in_cleanup(), name="stuck cleanup")
    with caplog.at_level(logging.ERROR, "edgefn.platform"):
        dog = Watchdog(0.2, asyncio.get_running_loop()).start()
        for _ in range(100):  # bounded: 5 s
            await asyncio.sleep(0.05)
            if any("pending task stuck cleanup" in r.getMessage() for r in caplog.records):
                break
        dog.stop()
    task.cancel()
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "has not finished after 0 s" in messages
    assert "stuck_in_cleanup" in messages  # the task's own stack, not just its name
    assert "Thread 0x" in capfd.readouterr().err  # faulthandler's dump of every thread


async def test_a_watchdog_stopped_in_time_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "edgefn.platform"):
        dog = Watchdog(0.3, asyncio.get_running_loop()).start()
        dog.stop()
        await asyncio.sleep(0.5)
    assert not caplog.records


def test_sigusr1_dumps_a_running_platforms_stacks_and_it_keeps_running(tmp_path: Path) -> None:
    plat = start_platform(tmp_path / "plat", "--no-mqtt")
    try:
        plat.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "Thread 0x" not in plat.log_text():
            time.sleep(0.1)
        assert "Thread 0x" in plat.log_text() and "serve" in plat.log_text()
        assert plat.proc.poll() is None
        assert plat.token
    finally:
        assert plat.stop() == 0

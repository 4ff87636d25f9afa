"""Seeing why a platform does not stop: timed shutdown steps, a watchdog, and a stack dump signal.

A replica that ignores SIGTERM for longer than its drain is killed by systemd (or a test) with
SIGKILL, and the log then says nothing about what it was waiting for. So:

* every `on_shutdown`/`on_cleanup` step of the app is timed; a step slower than `SLOW_STEP_S` is
  logged with its name and duration, and one still running after `STEP_LIMIT_S` is given up
  (logged as an error) so that the steps after it -- closing the stores -- still run;
* `Watchdog`, armed when shutdown begins, dumps every thread's stack (faulthandler, which works
  even when the event loop itself is blocked) and every pending asyncio task's stack to stderr if
  shutdown has not finished after the drain plus `GRACE_S`;
* `kill -USR1 <pid>` dumps every thread's stack at any time (faulthandler), for an operator
  looking at a replica that seems stuck while it runs.

Apart from giving up on a stuck step, none of this changes what shutdown does.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger("edgefn.platform")

SLOW_STEP_S = 1.0
STEP_LIMIT_S = 10.0
GRACE_S = 5.0

Step = Callable[[web.Application], Awaitable[Any]]


def time_shutdown_steps(app: web.Application) -> None:
    """Wrap the app's shutdown and cleanup steps so a slow one is named in the log.

    Call after every step was added and before the app is frozen (`AppRunner.setup`)."""
    for signal_list in (app.on_shutdown, app.on_cleanup):
        for i, step in enumerate(list(signal_list)):
            signal_list[i] = _timed(step)


def _timed(step: Step) -> Step:
    name = getattr(step, "__qualname__", repr(step))

    async def run(app: web.Application) -> Any:
        started = time.monotonic()
        try:
            async with asyncio.timeout(STEP_LIMIT_S):
                return await step(app)
        except TimeoutError:
            log.error("shutdown step %s did not finish in %.0f s; going on", name, STEP_LIMIT_S)
            return None
        finally:
            took = time.monotonic() - started
            if took > SLOW_STEP_S:
                log.warning("shutdown step %s took %.1f s", name, took)

    return run


def register_stack_dump_signal() -> None:
    """`kill -USR1` dumps every thread's stack to stderr (the journal under systemd)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)


class Watchdog:
    """Dump stacks once if shutdown is still running after `after_s` (a thread: the loop may
    be the thing that is stuck)."""

    def __init__(self, after_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self.after_s = after_s
        self._loop = loop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shutdown watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.after_s):
            return
        log.error(
            "shutdown has not finished after %.0f s; thread and task stacks follow", self.after_s
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        with_loop = threading.Event()

        def tasks() -> None:
            try:
                for task in asyncio.all_tasks(self._loop):
                    out = io.StringIO()
                    task.print_stack(file=out)
                    log.error("pending task %s:\n%s", task.get_name(), out.getvalue())
            finally:
                with_loop.set()

        try:
            self._loop.call_soon_threadsafe(tasks)
        except RuntimeError:  # the loop is closed: the thread stacks are all there is
            return
        if not with_loop.wait(2.0):
            log.error("the event loop did not run the task dump within 2 s: it is blocked")

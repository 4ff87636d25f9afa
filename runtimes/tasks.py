"""Stopping background tasks so that a stop always ends.

The usual `task.cancel(); with suppress(CancelledError): await task` has two faults. It
swallows the *caller's* cancellation together with the task's, so a shutdown that is itself
cancelled goes on waiting. And it waits forever for a task that lost its cancellation: Python
3.11's `asyncio.wait_for` drops one that lands in the same loop iteration as the awaited result
(CPython gh-86296), which once left a platform replica's leader lease running after `close()`
and hung its shutdown. `stop()` cancels again until the task has ended and lets the caller's
own cancellation through. (The code base uses `asyncio.timeout`, never `wait_for`; ruff bans it.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("edgefn.tasks")

RECANCEL_S = 1.0


async def stop(*tasks: asyncio.Task[Any] | asyncio.Future[Any] | None) -> None:
    """Cancel `tasks` (None entries are skipped) and return once every one has ended."""
    pending = {t for t in tasks if t is not None and not t.done()}
    rounds = 0
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        rounds += 1
        if pending and rounds == 1:
            names = ", ".join(_name(t) for t in pending)
            log.warning(
                "%s did not stop within %.0f s of cancel; cancelling again", names, RECANCEL_S
            )
    for ended in tasks:
        if ended is not None and ended.done() and not ended.cancelled():
            exc = ended.exception()  # retrieved here, so asyncio does not report it at exit
            if exc is not None:
                log.warning("%s had failed before it was stopped: %r", _name(ended), exc)


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else "a future"

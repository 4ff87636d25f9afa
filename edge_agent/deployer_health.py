"""The health window: how the deployer judges a version it just switched to, on its own.

The installer's warm check proves a version *starts*. What it cannot see is a version that
starts and then misbehaves: workers that die under traffic, answers that are mostly errors,
a pool that cannot start its workers in the agent's sandbox. For `window_s` after the switch
the deployer samples the function (`HealthSample`, from the agent) every `HEALTH_POLL_S` and
fails it, with the stable code the platform reads, on the first of:

* `worker_start_failed` -- the new version is not the one loaded `START_GRACE_S` after the
  reload (the agent could not start it; the sample's `problem` says why);
* `crash_loop` -- `CRASH_LIMIT` worker restarts within the window;
* `error_rate` -- more than `ERROR_RATE_LIMIT` of the calls failed, once `ERROR_MIN_CALLS`
  were made.

The bounds are deliberately coarse: the device alone judges only what is plainly broken, with
no network. Finer judgement (error rate against the previous version, p95 latency) is the
platform's gates, over a whole wave of devices. Pure decisions plus one async loop; the
sampler must be quick (it runs on the event loop).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

# How long a new version is watched before it is reported healthy. Long enough for a crash
# loop to show through the pool's restart backoff; short enough that a wave does not wait.
HEALTH_WINDOW_S = 30.0
WINDOW_ENV = "EDGEFN_DEPLOY_HEALTH_WINDOW_S"  # tests and small demos shorten it
HEALTH_POLL_S = 0.2
# Greengrass marks a component BROKEN after three errors; three restarts in one window is a
# loop, not bad luck.
CRASH_LIMIT = 3
# Over half the calls failing is broken whatever the previous version did; fewer calls than
# this decide nothing (two errors out of three calls is noise).
ERROR_RATE_LIMIT = 0.5
ERROR_MIN_CALLS = 10
# The reload runs right after the switch; a version not loaded after this never started.
START_GRACE_S = 5.0


def window_s() -> float:
    """The health window, from the environment when set (a number of seconds >= 0)."""
    raw = os.environ.get(WINDOW_ENV, "")
    try:
        value = float(raw) if raw else HEALTH_WINDOW_S
    except ValueError:
        return HEALTH_WINDOW_S
    return value if value >= 0 else HEALTH_WINDOW_S


@dataclass(frozen=True, slots=True)
class HealthSample:
    """What the agent sees of one function right now (cumulative counters)."""

    loaded_version: str | None
    restarts: int  # worker restarts of the loaded executor
    invocations: int
    errors: int
    problem: str | None = None  # why it is not loaded, when it is not


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    code: str | None = None
    message: str = ""
    superseded: bool = False


def judge(version: str, first: HealthSample, now: HealthSample, elapsed_s: float) -> Verdict | None:
    """A failure verdict, or None while nothing is wrong yet (pure)."""
    if now.loaded_version != version:
        if elapsed_s >= START_GRACE_S:
            why = now.problem or f"version {now.loaded_version} is loaded instead"
            return Verdict(False, "worker_start_failed", f"{version} did not start: {why}")
        return None
    base = first if first.loaded_version == version else HealthSample(version, 0, 0, 0)
    restarts = now.restarts - base.restarts if now.restarts >= base.restarts else now.restarts
    if restarts >= CRASH_LIMIT:
        return Verdict(
            False, "crash_loop", f"{restarts} worker restarts within {elapsed_s:.1f} s of switching"
        )
    calls = now.invocations - base.invocations
    errors = now.errors - base.errors
    if calls >= ERROR_MIN_CALLS and errors > ERROR_RATE_LIMIT * calls:
        return Verdict(False, "error_rate", f"{errors} of {calls} calls failed after switching")
    return None


async def watch(
    sample: Callable[[], HealthSample],
    version: str,
    window: float,
    interrupt: asyncio.Event,
) -> Verdict:
    """Sample until the window ends (healthy), a failure shows, or `interrupt` is set
    (a newer desired entry for this function: superseded, neither healthy nor failed)."""
    start = time.monotonic()
    first = sample()
    while True:
        elapsed = time.monotonic() - start
        verdict = judge(version, first, sample(), elapsed)
        if verdict is not None:
            return verdict
        if elapsed >= window:
            return Verdict(True)
        try:
            async with asyncio.timeout(min(HEALTH_POLL_S, window - elapsed + 0.01)):
                await interrupt.wait()
        except TimeoutError:
            continue
        return Verdict(False, superseded=True)

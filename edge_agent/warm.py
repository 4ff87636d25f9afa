"""The installer's warm check: start a version once from its staging dir, then stop it.

A version that cannot start is never switched to. Blocking (runs its own event loop): the
installer is called from the CLI, not from the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from runtimes.errors import RuntimeErrorBase
from runtimes.manifest import Manifest

# A warm start that takes longer than this is a function that does not start.
WARM_TIMEOUT_S = 60.0


class WarmFailed(RuntimeErrorBase):
    """The version did not start; raised as the installer's `warm_failed` refusal."""

    code = "warm_failed"
    status = 422


@contextlib.contextmanager
def _worker_output_hidden() -> Iterator[None]:
    """Workers inherit stderr; their noise would bury the one-line reason a refusal prints
    (the reason already carries the worker's own first error line)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def warm_check(
    manifest: Manifest,
    directory: Path,
    timeout_s: float,
    *,
    while_running: Callable[[], None] | None = None,
) -> None:
    """Start the function once from `directory` and stop it: proof that it loads and runs.

    One worker even when the manifest says min_instances = 0 (a lazy pool would prove nothing),
    started inside a `Sandbox` (parent-death signal and the manifest's rlimits), so a killed
    installer never leaves the worker behind. `while_running` (blocking) is called, off the
    loop, while the function is up: the fault-injection seam's "warm" step.
    """
    from runtimes.launchers import make_executor
    from runtimes.sandbox import Sandbox

    probe = dataclasses.replace(manifest, pool=dataclasses.replace(manifest.pool, min_instances=1))

    async def run() -> None:
        sandbox = Sandbox()
        executor = make_executor(probe, directory, sandbox=sandbox)
        try:
            async with asyncio.timeout(timeout_s):
                await executor.start()
            if while_running is not None:
                await asyncio.to_thread(while_running)
        finally:
            await executor.close(1.0)
            await sandbox.close()

    try:
        with _worker_output_hidden():
            asyncio.run(run())
    except RuntimeErrorBase as exc:
        raise WarmFailed(
            f"{manifest.name} {manifest.version} does not start: {exc.message}"
        ) from exc
    except TimeoutError as exc:
        raise WarmFailed(
            f"{manifest.name} {manifest.version} did not start within {timeout_s:g} s"
        ) from exc

"""A worker's operating-system process: its environment, its pipes and how it ended.

`runtimes.worker` drives the protocol; this module holds what is about the process itself: the
environment allow-list it starts with, the `asyncio.SubprocessProtocol` that hands its pipe
events back, the start/exit bounds, and the words for how it exited.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping
from typing import Protocol

# A worker that does not send READY within this time is killed: loading a function is local
# file I/O plus module init, seconds at most even on a slow gateway.
START_TIMEOUT_S = 20.0
# After the process exited, how long to wait for its pipes to drain before declaring it gone.
EXIT_PIPE_WAIT_S = 0.2
# A worker killed at start is reaped within this time (SIGKILL cannot be ignored; this only
# bounds a stuck kernel or a grandchild holding the pipes).
EXIT_REAP_S = 5.0
# After SHUTDOWN, how long a worker may take to exit before it is killed.
EXIT_GRACE_S = 2.0


class PipeSink(Protocol):
    """What `Pipes` hands a worker's pipe events to (the `Worker`)."""

    def _on_stdout(self, data: bytes) -> None: ...

    def _on_stderr(self, data: bytes) -> None: ...

    def _on_exit(self) -> None: ...


class Pipes(asyncio.SubprocessProtocol):
    """Routes pipe events into the owning Worker; holds no state of its own."""

    def __init__(self, worker: PipeSink) -> None:
        self._worker = worker

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._worker._on_stdout(data)
        else:
            self._worker._on_stderr(data)

    def process_exited(self) -> None:
        # stderr may still hold the lines that explain the exit: finish when the pipes close
        # (connection_lost), or shortly after if a grandchild keeps them open.
        asyncio.get_running_loop().call_later(EXIT_PIPE_WAIT_S, self._worker._on_exit)

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker._on_exit()


def describe_exit(code: int | None) -> str:
    """How a worker ended, in words for its exit reason and errors."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def worker_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """Environment of a worker: a small allow-list of the agent's plus the function's own.

    Secrets in the agent's environment (tokens, credentials) must not leak into functions.
    """
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR")
    env = {k: base[k] for k in keep if k in base}
    env.setdefault("PATH", os.defpath)
    env.update(extra)
    return env

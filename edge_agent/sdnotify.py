"""systemd's notify protocol (sd_notify(3)) over a plain datagram socket: no dependency.

With `Type=notify` systemd considers the agent started only when it sends `READY=1` (sent once
the API listens), and with `WatchdogSec=` it restarts the agent when `WATCHDOG=1` stops coming.
The keep-alive is sent by a task on the event loop, so a loop blocked by a stuck handler or a
synchronous call stops the pings and gets the agent restarted: exactly what the watchdog is for.

Outside systemd (`$NOTIFY_SOCKET` unset) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from runtimes import tasks

log = logging.getLogger("edgefn.sdnotify")


class Notifier:
    """Sends state lines to `$NOTIFY_SOCKET`; never blocks and never raises."""

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        # A leading '@' names a socket in the abstract namespace (a leading NUL byte).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Non-blocking: a receiver whose queue is full must not stall the event loop.
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of `KEY=VALUE` lines; False when it could not be delivered."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # BlockingIOError included: a missed ping is not fatal
            log.debug("sd_notify %s failed: %s", lines, exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of `$WATCHDOG_USEC` in seconds (systemd's advice), or None without a watchdog.

    `$WATCHDOG_PID`, when set, must be ours: otherwise the variable was inherited and meant for
    another process.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Lifecycle:
    """The agent's side of the protocol: ready, watchdog pings from the loop, stopping."""

    def __init__(self, notifier: Notifier | None = None) -> None:
        self._notifier = notifier if notifier is not None else Notifier.from_env()
        self._task: asyncio.Task[None] | None = None

    def ready(self, status: str) -> None:
        """Call once the API listens: starts the watchdog pings when systemd asked for them."""
        if not self._notifier.enabled:
            return
        self._notifier.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        interval = watchdog_interval()
        if interval is not None:
            self._task = asyncio.create_task(self._ping(interval), name="sd_notify watchdog")

    async def _ping(self, interval: float) -> None:
        while True:
            self._notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def stopping(self) -> None:
        """Call when shutdown starts: systemd then expects the exit, not more pings."""
        await tasks.stop(self._task)
        self._task = None
        self._notifier.send("STOPPING=1")

    def close(self) -> None:
        self._notifier.close()

"""What an MQTT session knows about its link: up or down since when, and why it is not up.

`LinkStatus` is owned by the event loop: `cloud_sync.mqtt.MqttSession` hops paho's events here
(CONNACK, disconnect, connect failure, paho's error log lines). `snapshot()` is the public
`SessionState` the sync client reads to choose between MQTT and HTTP. `classify_error` turns an
exception's or paho's text into a stable code (`certificate_revoked`, `broker_unreachable`...),
because paho reports TLS and socket failures only as text.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


def classify_error(text: str) -> str:
    """A stable code for why a connection failed, from an exception or paho log text."""
    t = text.lower()
    if "revoked" in t:
        return "certificate_revoked"
    if "certificate verify failed" in t or "hostname" in t:
        return "server_certificate_rejected"
    if any(
        s in t
        for s in (
            "unknown ca",
            "bad certificate",
            "certificate unknown",
            "certificate required",
            "certificate expired",
            "handshake failure",
            "access denied",
        )
    ):
        return "certificate_rejected"
    if "refused" in t or "unreachable" in t or "timed out" in t or "name or service" in t:
        return "broker_unreachable"
    return "connection_failed"


@dataclass(frozen=True, slots=True)
class SessionState:
    connected: bool
    last_connected: float | None  # wall clock (time.time()) of the last successful CONNACK
    since_disconnected: float | None  # seconds offline (since start if never up); None if up
    connects: int  # successful CONNACKs since start
    session_present: bool  # the broker still had our session at the last connect
    last_error: str | None  # the latest reason we were not connected, human readable
    last_error_code: str | None  # stable code: certificate_revoked, broker_unreachable, ...


class LinkStatus:
    """Connected or not, since when, and the latest reason; two events to wait on."""

    def __init__(self) -> None:
        self.connected = False
        self.connected_evt = asyncio.Event()
        self.ready_evt = asyncio.Event()  # connected and subscribed
        self.last_connected: float | None = None
        self.down_since: float | None = time.monotonic()
        self.connects = 0
        self.session_present = False
        self.last_error: str | None = None
        self.last_error_code: str | None = None
        self._error_is_specific = False

    def set_connected(self, up: bool) -> None:
        self.connected = up
        if up:
            self.connected_evt.set()
            self.down_since = None
        else:
            self.connected_evt.clear()
            self.ready_evt.clear()
            if self.down_since is None:
                self.down_since = time.monotonic()

    def record_error(self, code: str, text: str, specific: bool) -> bool:
        """Remember why we are not connected; False when a more specific reason is kept.

        A specific reason (certificate revoked) is not overwritten by the generic "connection
        lost" that paho reports right after it, until a connection succeeds again.
        """
        if not specific and self._error_is_specific:
            return False
        self.last_error, self.last_error_code = text, code
        self._error_is_specific = specific
        return True

    def came_up(self, session_present: bool) -> None:
        self.connects += 1
        self.last_connected = time.time()
        self.session_present = session_present
        self._error_is_specific = False
        # Connected: the last failure is history, not the current state (issue 11).
        self.last_error = self.last_error_code = None
        self.set_connected(True)

    def snapshot(self) -> SessionState:
        down = self.down_since
        return SessionState(
            connected=self.connected,
            last_connected=self.last_connected,
            since_disconnected=None if down is None else time.monotonic() - down,
            connects=self.connects,
            session_present=self.session_present,
            last_error=self.last_error,
            last_error_code=self.last_error_code,
        )

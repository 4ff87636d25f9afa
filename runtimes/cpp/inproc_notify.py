"""`config()` change notifications for in-process C++ functions: the agent's NOTIFY, in process.

An isolated worker gets a NOTIFY `config` frame (docs/protocol.md) and its own notification
thread hands it to the library. A library loaded into the agent gets the same through its
optional `edgefn_config_changed` symbol (edgefn.h), which the pybind11 host looked up with dlsym
(`Library.takes_config`; absent in hand-written or older libraries, which are then never told).

Listeners are user code, so they run neither on the event loop (a slow one would stall the
agent) nor on the function's call pool (a pool busy with long calls would delay them): one
thread per executor delivers, with the GIL released. One slot, as in the worker and in Go: a
config that arrives while an older one still waits replaces it, so a slow listener sees the
newest config rather than a backlog. What a listener throws comes back as log lines.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

log = logging.getLogger("edgefn.cpp")

_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


class ConfigNotices:
    """Delivers config changes to one loaded library (`lib`, a `_host.Library`)."""

    def __init__(self, lib: Any, label: str, function: str) -> None:
        self._lib = lib
        self._takes = bool(lib.takes_config)  # fixed at load: the symbol is there or not
        self._label = label
        self._function = function
        self._lock = threading.Lock()
        self._pending: bytes | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def post(self, config: bytes) -> int:
        """Queue `config` (JSON) for the library's listeners; 1 when it will be told, else 0.

        Never blocks: safe to call from the event loop."""
        if self._closed or not self._takes:
            return 0
        with self._lock:
            self._pending = config
            if self._thread is None:
                self._thread = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"edgefn-cpp-notify-{self._function}"
                )
            thread = self._thread
        try:
            thread.submit(self._deliver)
        except RuntimeError:  # closed meanwhile
            return 0
        return 1

    def _deliver(self) -> None:
        """On the notification thread: hand the newest pending config to the library."""
        with self._lock:
            config, self._pending = self._pending, None
        if config is None:
            return  # a later submit already delivered it (coalesced)
        try:
            answer = self._lib.config_changed(config)
        except Exception:  # a host bug; never lose it in an unread future
            log.exception("%s: delivering a config change failed", self._label)
            return
        if answer is None:
            return  # unloaded meanwhile
        _status, lines = answer  # a failed listener (EDGEFN_ERROR) said why in its lines
        for level, message in lines or ():
            log.log(
                _LEVELS.get(level, logging.INFO),
                "%s [config change] %s",
                self._label,
                message,
                extra={"function": self._function},
            )

    def close(self) -> None:
        """Stop delivering; a config still waiting is dropped (the library is going away)."""
        with self._lock:
            self._closed = True
            self._pending = None
            thread = self._thread
        if thread is not None:
            thread.shutdown(wait=False, cancel_futures=True)

"""Logging set-up: human text or JSON lines, with request ids and worker pids as fields.

Workers' log frames arrive with `extra={"request_id": ...}`; both formats show it, so a line a
function logged can be matched with the HTTP request that caused it.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_FIELDS = ("request_id", "trace_id", "worker_pid", "stream")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [f"{k}={getattr(record, k)}" for k in _FIELDS if getattr(record, k, None)]
        return f"{line} [{' '.join(tags)}]" if tags else line


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is off: per-request lines cost throughput; we log errors ourselves.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

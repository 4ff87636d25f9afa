"""What a worker says, in the agent's terms: answers as Results, LOG frames and stderr as logs.

Pure helpers of `runtimes.worker`: they hold no state of a worker; the worker passes in its
logger, its pid and its buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from runtimes import protocol
from runtimes.errors import FunctionError, RequestRejected
from runtimes.invocation import Result
from runtimes.protocol import Frame, Key, Kind

# Lines of stderr kept per worker to explain why it died (shown in status and errors).
STDERR_TAIL_LINES = 20
# A partial stderr line longer than this is cut (see `stderr_lines`).
STDERR_LINE_MAX = 64 * 1024

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_JSON_FLAG = int(protocol.Flag.JSON)


def result_from_frame(frame: Frame, queued_s: float, run_s: float) -> Result:
    """Turn a worker's answer into a Result, or raise the function's error."""
    if frame.kind is Kind.ERROR:
        code = frame.text(Key.ERROR_CODE, "function_error") or "function_error"
        message = frame.payload.decode("utf-8", "replace") or "function failed"
        if code == RequestRejected.code:
            raise RequestRejected(message)
        raise FunctionError(message, code=code)
    ctype = frame.text(Key.CONTENT_TYPE)
    if not ctype:
        ctype = "application/json" if frame.flags & _JSON_FLAG else "application/octet-stream"
    return Result(frame.payload, ctype, queued_s, run_s)


def forward_log(log: logging.Logger, frame: Frame, pid: int, client_request_id: str) -> None:
    """Log a LOG frame through the function's logger, with the request's ids as fields.

    `client_request_id` is the caller's id (X-Request-Id) of the request the frame's wire id
    belongs to, "" when that request is no longer pending.
    """
    level = _LEVELS.get(frame.text(Key.LOG_LEVEL, "info").lower(), logging.INFO)
    if not log.isEnabledFor(level):
        return
    message = frame.payload.decode("utf-8", "replace").rstrip("\n")
    extra: dict[str, Any] = {"worker_pid": pid}
    if frame.request_id:
        # The client's id while the request is in flight (log lines written during the
        # handler always are: frames arrive in order, before its RESULT); a line a detached
        # callback writes after the answer keeps the wire id, the only one left.
        if client_request_id:
            extra["request_id"] = client_request_id
        else:
            extra["request_id"] = str(frame.request_id)
    trace = frame.text(Key.TRACE_ID)
    if trace:
        extra["trace_id"] = trace
    log.log(level, "%s", message, extra=extra)


def stderr_lines(buf: bytearray, data: bytes) -> list[str]:
    """Add `data` to `buf` and take out the complete, non-empty lines it now holds."""
    buf += data
    # Bound the partial line: a worker printing megabytes without a newline must not grow it.
    if len(buf) > STDERR_LINE_MAX and b"\n" not in buf:
        buf += b"\n"
    lines: list[str] = []
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            break
        line = bytes(buf[:nl]).decode("utf-8", "replace").rstrip("\r")
        del buf[: nl + 1]
        if line:
            lines.append(line)
    return lines


def tail_suffix(tail: Iterable[str]) -> str:
    """The last stderr lines that say what went wrong, as a suffix for an error message."""
    # Stack frames are indented in Node, Go and C++ traces; the lines that say what went
    # wrong are not.
    lines = [line for line in tail if not line[:1].isspace()]
    if not lines:
        return ""
    return ": " + " | ".join(lines[-3:])

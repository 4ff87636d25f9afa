"""Running a function on the central platform: the agent's HTTP client for cloud invocations,
guarded by a circuit breaker so an unreachable platform costs one fast failure, not a timeout
per request.

Breaker states: closed (calls go through) -> open after `FAILURES_TO_OPEN` consecutive
failures (calls fail at once for the cool-down) -> half-open (one probe call goes through;
success closes the breaker, failure opens it again with a doubled cool-down up to
`MAX_COOLDOWN_S`). Only transport-level trouble counts as failure: unreachable, timeout, 5xx
other than a function error, or an answer that is not ours. A function that answered with an
error is a healthy platform.
"""

from __future__ import annotations

import logging
import ssl as ssl_
import time
from dataclasses import dataclass
from typing import Any

# The breaker's errors live in the one error tree (cloud_sync.errors); importable from here too.
from cloud_sync.errors import CircuitOpen as CircuitOpen
from cloud_sync.errors import CloudUnavailable as CloudUnavailable
from cloud_sync.http_client import AsyncHttpClient, Endpoint, RequestTimeout, Unreachable
from runtimes.errors import (
    FunctionError,
    InvocationTimeout,
    RuntimeErrorBase,
)
from runtimes.invocation import Invocation, Result

log = logging.getLogger("edgefn.cloud")

# Three failures in a row: one lost packet does not open the breaker, a dead link does quickly.
FAILURES_TO_OPEN = 3
# First cool-down, doubled on every failed probe up to the maximum. A minute bounds how stale
# "the cloud is down" can be once the link is back.
COOLDOWN_S = 5.0
MAX_COOLDOWN_S = 60.0
# Connecting should be fast on any working link; the rest of the budget is the function's.
CONNECT_TIMEOUT_S = 3.0


@dataclass(slots=True)
class Breaker:
    failures: int = 0
    opened_at: float = 0.0
    cooldown_s: float = COOLDOWN_S
    probing: bool = False

    @property
    def state(self) -> str:
        if self.failures < FAILURES_TO_OPEN:
            return "closed"
        if time.monotonic() - self.opened_at >= self.cooldown_s:
            return "half-open"
        return "open"

    def before_call(self) -> bool:
        """Let a call through or raise CircuitOpen; True when this call is the half-open probe."""
        state = self.state
        if state == "open" or (state == "half-open" and self.probing):
            left = self.cooldown_s - (time.monotonic() - self.opened_at)
            raise CircuitOpen(
                f"cloud calls paused after {self.failures} failures "
                f"(next try in {max(left, 0):.1f} s)"
            )
        if state == "half-open":
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.cooldown_s = COOLDOWN_S
        self.probing = False

    def failure(self) -> None:
        was_probe = self.probing
        self.probing = False
        self.failures += 1
        if was_probe:
            self.cooldown_s = min(self.cooldown_s * 2, MAX_COOLDOWN_S)
        if self.failures >= FAILURES_TO_OPEN:
            self.opened_at = time.monotonic()


class CloudInvoker:
    """POST {platform}/v1/functions/{name}/invoke with the device's credentials."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str = "",
        ssl: ssl_.SSLContext | None = None,
        fallback_urls: tuple[str, ...] = (),
    ) -> None:
        self._http = AsyncHttpClient(
            Endpoint(
                base_url,
                token=token,
                ssl_context=ssl,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                name="the cloud",
                fallback_urls=fallback_urls,
            )
        )
        self.base_url = self._http.endpoint.base_url
        self.breaker = Breaker()

    async def invoke(
        self, name: str, inv: Invocation, version: str = "", *, caller: str = ""
    ) -> tuple[Result, str]:
        """Run `name` in the cloud; returns the result and the version that answered.

        `version` pins the version the device runs, so both places run the same code.
        `caller`: the id (never the secret) of the local API token the call came with, sent as
        `X-Edgefn-Caller` so the platform can tell which LAN client used the device's rights.
        """
        probe = self.breaker.before_call()
        try:
            return await self._invoke(name, inv, version, caller)
        finally:
            # A probe that ended without a verdict (cancelled: the client went away, the agent
            # shuts down) must not keep the half-open slot, or every later call would see "a
            # probe is in flight" and fail with circuit-open forever.
            if probe:
                self.breaker.probing = False

    async def _invoke(
        self, name: str, inv: Invocation, version: str, caller: str = ""
    ) -> tuple[Result, str]:
        headers = {"X-Request-Id": inv.request_id}
        if caller:
            headers["X-Edgefn-Caller"] = caller
        if inv.content_type:
            headers["Content-Type"] = inv.content_type
        if inv.trace_id:
            headers["X-Trace-Id"] = inv.trace_id
        if version:
            headers["X-Edgefn-Version"] = version
        started = time.perf_counter()
        try:
            resp = await self._http.request(
                "POST",
                f"/v1/functions/{name}/invoke",
                data=inv.payload,
                headers=headers,
                timeout_s=inv.timeout_s,
            )
        except RequestTimeout:
            self.breaker.failure()
            raise InvocationTimeout(
                f"cloud did not answer within {inv.timeout_s:g} s", code="cloud_timeout"
            ) from None
        except Unreachable as exc:
            self.breaker.failure()
            raise CloudUnavailable(f"cloud unreachable: {exc.__cause__ or exc}") from exc
        run_s = time.perf_counter() - started
        status = resp.status
        version = resp.header("X-Edgefn-Version")
        if status == 200:
            if not version:
                self.breaker.failure()
                raise CloudUnavailable("cloud answered without an X-Edgefn-Version header")
            self.breaker.success()
            ctype = resp.header("Content-Type") or "application/octet-stream"
            return Result(resp.body, ctype, 0.0, run_s), version
        err = resp.error()
        if err is None:
            self.breaker.failure()
            raise CloudUnavailable(f"cloud answered HTTP {status} with a body that is not ours")
        code, message = err
        if code == "function_error":
            self.breaker.success()
            raise FunctionError(f"{message} (in the cloud)")
        if status >= 500 or status == 429:
            self.breaker.failure()
        else:
            self.breaker.success()
        raise _cloud_error(status, code, message)

    def status(self) -> dict[str, Any]:
        return {
            "url": self.base_url,
            "breaker": self.breaker.state,
            "failures": self.breaker.failures,
        }

    async def close(self) -> None:
        await self._http.close()


def _cloud_error(status: int, code: str, message: str) -> RuntimeErrorBase:
    exc = CloudUnavailable(f"cloud: {message} ({code}, HTTP {status})", code=f"cloud_{code}")
    exc.status = 502 if status >= 500 else status
    return exc

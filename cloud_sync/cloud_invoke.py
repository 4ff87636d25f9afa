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

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

# The breaker's errors live in the one error tree (cloud_sync.errors); importable from here too.
from cloud_sync.errors import CircuitOpen as CircuitOpen
from cloud_sync.errors import CloudUnavailable as CloudUnavailable
from cloud_sync.errors import error_of
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

    def before_call(self) -> None:
        state = self.state
        if state == "open" or (state == "half-open" and self.probing):
            left = self.cooldown_s - (time.monotonic() - self.opened_at)
            raise CircuitOpen(
                f"cloud calls paused after {self.failures} failures "
                f"(next try in {max(left, 0):.1f} s)"
            )
        if state == "half-open":
            self.probing = True

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

    def __init__(self, base_url: str, *, token: str = "", ssl: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._ssl = ssl
        self._session: Any = None
        self.breaker = Breaker()

    async def _client(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            )
        return self._session

    async def invoke(self, name: str, inv: Invocation, version: str = "") -> tuple[Result, str]:
        """Run `name` in the cloud; returns the result and the version that answered.

        `version` pins the version the device runs, so both places run the same code.
        """
        import aiohttp

        self.breaker.before_call()
        headers = {"X-Request-Id": inv.request_id}
        if inv.content_type:
            headers["Content-Type"] = inv.content_type
        if inv.trace_id:
            headers["X-Trace-Id"] = inv.trace_id
        if version:
            headers["X-Edgefn-Version"] = version
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        timeout = aiohttp.ClientTimeout(total=inv.timeout_s, connect=CONNECT_TIMEOUT_S)
        url = f"{self.base_url}/v1/functions/{name}/invoke"
        started = time.perf_counter()
        try:
            session = await self._client()
            async with session.post(url, data=inv.payload, headers=headers, timeout=timeout) as r:
                body = await r.read()
                status, ctype = r.status, r.headers.get("Content-Type", "")
                version = r.headers.get("X-Edgefn-Version", "")
        except TimeoutError:
            self.breaker.failure()
            raise InvocationTimeout(
                f"cloud did not answer within {inv.timeout_s:g} s", code="cloud_timeout"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            self.breaker.failure()
            raise CloudUnavailable(f"cloud unreachable: {exc}") from exc
        run_s = time.perf_counter() - started
        if status == 200:
            if not version:
                self.breaker.failure()
                raise CloudUnavailable("cloud answered without an X-Edgefn-Version header")
            self.breaker.success()
            return Result(body, ctype or "application/octet-stream", 0.0, run_s), version
        err = error_of(body)
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
        if self._session is not None:
            await self._session.close()
            # Let the connector close its transports (aiohttp's documented graceful close).
            await asyncio.sleep(0)


def _cloud_error(status: int, code: str, message: str) -> RuntimeErrorBase:
    exc = CloudUnavailable(f"cloud: {message} ({code}, HTTP {status})", code=f"cloud_{code}")
    exc.status = 502 if status >= 500 else status
    return exc

"""Runs a C++ function inside the agent's process: the `isolation = "in-process"` executor.

Flow: `start()` dlopens `<function_dir>/<entry>.so` through the pybind11 host
(`runtimes.cpp._host.Library`, which refuses a library without the ABI symbols or with another
ABI version) -> `invoke()` calls its C entry point in one of two ways -> `close()` stops taking
work, waits for running calls and dlcloses the library (a version switch frees its memory).

- inline (`inline = true` in the manifest): the call runs on the event loop thread with the GIL
  held. A pybind11 call costs ~0.1 us while a hop to a thread pool and back costs 70-100 us, so
  for sub-millisecond functions this is the fastest way to run code at all -- and while it runs
  nothing else on the loop does, which is why it is only for functions that are that short.
- pooled (the default): the call runs with the GIL released on a bounded thread pool sized from
  the manifest's pool concurrency (capped at MAX_THREADS); requests beyond threads + max_queue
  are refused with Overloaded (429). Building-block calls (`ctx.invoke`, `ctx.state()`, ...)
  block their pool thread while the loop answers them (`runtimes.cpp.inproc_calls`); inline
  functions get `unavailable` for them, since waiting on the loop from the loop would deadlock.

`notify_config()` is the in-process NOTIFY: the agent's config-change notification handed to
the library's listeners (`edgefn::on_config_change`) on a thread of its own, in both modes
(`runtimes.cpp.inproc_notify`).

Deadlines cannot be enforced here: a thread running native code cannot be stopped safely (no
cancellation points, no way to unwind its locks), and a process-wide kill would take the agent
with it. So a call that overruns its deadline gets InvocationTimeout (504) -- in pooled mode at
the deadline while the call keeps its thread until it returns, inline when it returns -- and is
counted in `status()["overruns"]`. Functions that need a hard deadline, or might crash, belong in
`isolation = "process"`, where the pool kills the worker (docs/runtime-cpp.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from runtimes.capabilities import CapabilityHandler
from runtimes.cpp import inproc_artifact
from runtimes.cpp.inproc_calls import Caller, InProcessCalls
from runtimes.cpp.inproc_notify import ConfigNotices
from runtimes.errors import (
    BundleError,
    FunctionError,
    InvocationTimeout,
    ManifestError,
    Overloaded,
    ToolchainError,
    Unavailable,
)
from runtimes.invocation import Health, InProcessStatus, Invocation, Result
from runtimes.manifest import Manifest

log = logging.getLogger("edgefn.cpp")

# Upper bound on threads of one in-process function: past a few dozen, threads running native
# code only contend for the same cores; the manifest's concurrency may ask for far more.
MAX_THREADS = 32
_U32_MAX = 0xFFFFFFFF
_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}

# (status, answer bytes, content type, log lines or None), as returned by _host.Library.call.
_Answer = tuple[int, bytes, str, list[tuple[int, str]] | None]
# What a pool thread hands back: the answer with queue and run seconds, None when skipped.
_Outcome = tuple[_Answer, float, float] | None


def load_host() -> ModuleType:
    """The compiled host module; ToolchainError when this install was built without it."""
    try:
        return importlib.import_module("runtimes.cpp._host")
    except ImportError as exc:
        raise ToolchainError(
            "the in-process C++ host (runtimes.cpp._host) is not built in this install; "
            "reinstall edgefn with pip on a machine with g++ and pybind11, or use "
            'isolation = "process"'
        ) from exc


class InProcessExecutor:
    """Executor for one version of a C++ function loaded into the agent (see module doc)."""

    def __init__(
        self,
        manifest: Manifest,
        function_dir: Path,
        *,
        library: Path | None = None,
        max_threads: int = MAX_THREADS,
        capabilities: CapabilityHandler | None = None,
    ) -> None:
        if manifest.runtime != "cpp":
            raise ManifestError(f"{manifest.name}: runtime {manifest.runtime!r} is not cpp")
        self.manifest = manifest
        self.library_path = (
            library if library is not None else inproc_artifact(manifest, function_dir)
        )
        self.inline = manifest.inline
        self.threads = 0 if self.inline else max(1, min(manifest.pool.concurrency, max_threads))
        self._max_waiting = manifest.pool.max_queue
        self._label = f"{manifest.name}@{manifest.version}"
        self._calls = InProcessCalls(capabilities, manifest)  # building blocks (pooled only)
        self._lib: Any = None
        self._notices: ConfigNotices | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ok = 0
        self._flag_json = 0
        self._closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._overdue: set[concurrent.futures.Future[_Outcome]] = set()
        self.invocations = 0
        self.errors = 0
        self.timeouts = 0
        self.overruns = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        if self._lib is not None:
            return
        if self._closing:
            raise Unavailable(f"{self._label}: the executor was closed")
        host = load_host()
        if not self.library_path.is_file():
            raise ManifestError(
                f"{self.library_path}: the in-process library of {self._label} does not exist "
                "(build the function first)"
            )
        try:
            # dlopen runs the library's static constructors: user code, so off the loop.
            self._lib = await asyncio.to_thread(
                host.Library, str(self.library_path), self.manifest.name, self.manifest.version
            )
        except host.LoadError as exc:
            self.last_error = str(exc)
            raise BundleError(str(exc)) from exc
        self._ok = host.OK
        self._flag_json = host.FLAG_JSON
        self._notices = ConfigNotices(self._lib, self._label, self.manifest.name)
        if not self.inline:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.threads, thread_name_prefix=f"edgefn-cpp-{self.manifest.name}"
            )

    def notify_config(self, config: bytes) -> int:
        """Tell the library its function's config changed (`config`, JSON); 1 when it will be
        told, 0 when it is not running or does not take config changes (no
        `edgefn_config_changed`: a hand-written C ABI, or built before it existed)."""
        if self._notices is None or self._closing:
            return 0
        return self._notices.post(config)

    async def invoke(self, inv: Invocation) -> Result:
        lib = self._lib
        if lib is None or self._closing:
            raise Unavailable(f"{self._label}: not running")
        deadline_ms = max(0, min(int(inv.timeout_s * 1000), _U32_MAX))
        flags = self._flag_json if inv.content_type and inv.is_json else 0
        if self.inline:
            return self._invoke_inline(lib, inv, deadline_ms, flags)
        return await self._invoke_pooled(lib, inv, deadline_ms, flags)

    def _invoke_inline(self, lib: Any, inv: Invocation, deadline_ms: int, flags: int) -> Result:
        started = time.perf_counter()
        self._in_flight += 1
        try:
            answer: _Answer = lib.call(
                inv.payload,
                inv.request_id,
                inv.trace_id,
                inv.content_type,
                deadline_ms,
                flags,
                False,
            )
        finally:
            self._in_flight -= 1
        run_s = time.perf_counter() - started
        return self._finish(inv, answer, 0.0, run_s, overran=run_s > inv.timeout_s)

    async def _invoke_pooled(
        self, lib: Any, inv: Invocation, deadline_ms: int, flags: int
    ) -> Result:
        pool = self._pool
        assert pool is not None
        if self._in_flight >= self.threads + self._max_waiting:
            raise Overloaded(
                f"{self._label}: {self._in_flight} requests in flight "
                f"({self.threads} threads + {self._max_waiting} queued)"
            )
        # A bare future, a loop timer and one call_soon_threadsafe: about half the loop-side
        # cost of asyncio.wrap_future + asyncio.wait for the same thread hop.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Outcome] = loop.create_future()
        caller = self._calls.caller(loop, inv, loop.time() + inv.timeout_s)
        cfut = pool.submit(
            self._run_in_thread, lib, inv, deadline_ms, flags, time.perf_counter(), caller
        )
        self._in_flight += 1
        self._idle.clear()
        cfut.add_done_callback(functools.partial(self._thread_done, loop, waiter))
        timer = loop.call_later(inv.timeout_s, self._deadline, waiter, cfut, inv)
        try:
            outcome = await waiter
        except asyncio.CancelledError:
            cfut.cancel()  # the caller went away: skip the call if it has not started
            raise
        except RuntimeError as exc:  # the library was closed under a queued call
            raise Unavailable(f"{self._label}: {exc}") from exc
        finally:
            timer.cancel()
        if outcome is None:
            self.timeouts += 1
            self.last_error = f"request {inv.request_id} passed its deadline while queued"
            raise InvocationTimeout(f"{self._label}: {self.last_error}")
        answer, queued_s, run_s = outcome
        return self._finish(inv, answer, queued_s, run_s, overran=queued_s + run_s > inv.timeout_s)

    @staticmethod
    def _run_in_thread(
        lib: Any, inv: Invocation, deadline_ms: int, flags: int, submitted: float, caller: Caller
    ) -> _Outcome:
        started = time.perf_counter()
        queued_s = started - submitted
        left_ms = deadline_ms - int(queued_s * 1000)
        if left_ms <= 0:
            return None  # its caller has given up already: do not spend a thread on it
        answer: _Answer = lib.call(
            inv.payload,
            inv.request_id,
            inv.trace_id,
            inv.content_type,
            left_ms,
            flags,
            True,
            caller,
        )
        return answer, queued_s, time.perf_counter() - started

    def _thread_done(
        self,
        loop: asyncio.AbstractEventLoop,
        waiter: asyncio.Future[_Outcome],
        cfut: concurrent.futures.Future[_Outcome],
    ) -> None:
        """Runs in the pool thread when a call ends (or where it was cancelled before it ran)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._call_done, waiter, cfut)

    def _call_done(
        self, waiter: asyncio.Future[_Outcome], cfut: concurrent.futures.Future[_Outcome]
    ) -> None:
        self._in_flight -= 1
        self._overdue.discard(cfut)
        if self._in_flight == 0:
            self._idle.set()
        if waiter.done():
            return  # its caller already had a timeout, or went away
        if cfut.cancelled():
            waiter.set_exception(Unavailable(f"{self._label}: shut down before the call ran"))
        elif (exc := cfut.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(cfut.result())

    def _deadline(
        self,
        waiter: asyncio.Future[_Outcome],
        cfut: concurrent.futures.Future[_Outcome],
        inv: Invocation,
    ) -> None:
        if waiter.done() or cfut.done():
            return  # answered, or finished this instant: _call_done delivers it
        self.timeouts += 1
        if cfut.cancel():
            self.last_error = (
                f"request {inv.request_id} waited {inv.timeout_s:g} s for one of "
                f"{self.threads} threads"
            )
        else:
            self.overruns += 1
            self._overdue.add(cfut)
            self.last_error = (
                f"request {inv.request_id} overran its {inv.timeout_s:g} s deadline and is still "
                'running (in-process calls cannot be stopped; isolation = "process" can)'
            )
        waiter.set_exception(InvocationTimeout(f"{self._label}: {self.last_error}"))

    def _finish(
        self, inv: Invocation, answer: _Answer, queued_s: float, run_s: float, *, overran: bool
    ) -> Result:
        status, payload, content_type, lines = answer
        self.invocations += 1
        if lines:
            for level, message in lines:
                log.log(
                    _LEVELS.get(level, logging.INFO),
                    "%s [%s] %s",
                    self._label,
                    inv.request_id,
                    message,
                    extra={"function": self.manifest.name, "request_id": inv.request_id},
                )
        if overran:
            self.timeouts += 1
            self.overruns += 1
            self.last_error = (
                f"request {inv.request_id} ran {queued_s + run_s:.3f} s, past its "
                f"{inv.timeout_s:g} s deadline (in-process calls cannot be stopped; "
                'isolation = "process" can)'
            )
            raise InvocationTimeout(f"{self._label}: {self.last_error}")
        if status != self._ok:
            self.errors += 1
            message = payload.decode("utf-8", "replace") or "function failed"
            self.last_error = message
            raise FunctionError(message)
        return Result(payload, content_type or "application/octet-stream", queued_s, run_s)

    async def close(self, drain_s: float = 5.0) -> None:
        if self._closing:
            return
        self._closing = True
        if self._in_flight:
            try:
                async with asyncio.timeout(drain_s):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "%s: %d calls still running after %g s; the library is unloaded when the "
                    "last one returns",
                    self._label,
                    self._in_flight,
                    drain_s,
                )
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._notices is not None:
            self._notices.close()  # a delivery still running keeps the library until it ends
        lib = self._lib
        if lib is not None:
            # dlclose runs the library's static destructors: user code, so off the loop.
            await asyncio.to_thread(lib.close)

    def status(self) -> InProcessStatus:
        lib = self._lib
        loaded = bool(lib is not None and lib.loaded)
        running = int(lib.active) if lib is not None else 0
        health: Health
        if self._closing:
            health = "stopped" if not loaded else "stopping"
        elif loaded:
            health = "healthy"
        else:
            health = "starting"
        return InProcessStatus(
            health=health,
            instances=1 if loaded else 0,
            in_flight=self._in_flight,
            queued=max(0, self._in_flight - running),
            last_error=self.last_error,
            mode="inline" if self.inline else "pooled",
            library=str(self.library_path),
            loaded=loaded,
            threads=self.threads,
            running=running,
            invocations=self.invocations,
            errors=self.errors,
            timeouts=self.timeouts,
            overruns=self.overruns,
            overdue_running=len(self._overdue),
        )

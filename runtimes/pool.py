"""The warm pool: worker processes of one function version, scaled by concurrency.

Flow of an invocation: `invoke()` picks the ready worker with the fewest requests in flight
that still has a free slot (`concurrency` per worker). With no free slot the request waits in a
bounded FIFO queue (full -> `Overloaded`, HTTP 429) and, while the pool is below
`max_instances`, one more worker is started. A worker that finishes a request hands its slot to
the oldest waiter. Workers above `min_instances` that stay idle for `idle_timeout_s` are retired.

Failure handling: a worker that exits or breaks the protocol fails its in-flight requests with
`WorkerCrashed` (502) and is replaced with exponential backoff; `CRASH_LOOP_COUNT` crashes within
`CRASH_LOOP_WINDOW_S` mark the function unhealthy (reported in `status()`), and while no worker
is ready requests fail fast with `Unavailable` (503) instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtimes import protocol
from runtimes.capabilities import CapabilityHandler
from runtimes.errors import (
    Overloaded,
    RuntimeErrorBase,
    Unavailable,
    WorkerCrashed,
)
from runtimes.invocation import Health, Invocation, PoolStatus, Result, WorkerStatus
from runtimes.manifest import Manifest, PoolSettings
from runtimes.pool_policy import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    CPU_SCALE_PERCENT,
    CRASH_LOOP_COUNT,
    CRASH_LOOP_WINDOW_S,
    REAP_INTERVAL_S,
    START_WAIT_ON_CLOSE_S,
    TARGET_UTILISATION,
)
from runtimes.sandbox import Prepared, Sandbox
from runtimes.worker import Worker, result_from_frame

log = logging.getLogger("edgefn.pool")

CommandFactory = Callable[[], Sequence[str]]


class Pool:
    """Executor for process-isolated runtimes (Node, Go, isolated C++)."""

    def __init__(
        self,
        manifest: Manifest,
        function_dir: Path,
        command: CommandFactory,
        *,
        env: dict[str, str],
        sandbox: Sandbox | None = None,
        capabilities: CapabilityHandler | None = None,
    ) -> None:
        self.manifest = manifest
        self._capabilities = capabilities
        self.function_dir = function_dir
        self.settings = manifest.pool
        self._command = command
        self._env = env
        self._sandbox = sandbox
        self._prepared: dict[int, Prepared] = {}  # worker id -> its sandbox share
        self._workers: list[Worker] = []
        self._starting = 0
        self._waiters: deque[asyncio.Future[Worker]] = deque()
        self._closing = False
        self._crashes: deque[float] = deque()
        self._backoff = BACKOFF_INITIAL_S
        self._replacing = False
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_error = ""
        # Why the sandbox says a worker was stopped (the kernel's memory limit...), next to
        # what the worker itself saw (a signal): see `_crash_error`. Weak: gone with the worker.
        self._stops: weakref.WeakKeyDictionary[Worker, tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self.restarts = 0
        self.timeouts = 0
        self.peak_instances = 0
        self.cold_starts: deque[float] = deque(maxlen=16)
        self._label = f"{manifest.name}@{manifest.version}"
        self._static = protocol.static_header(manifest.name, manifest.version)
        self._cpu_checked_at = 0.0
        self._cpu_hot = False

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start `min_instances` workers; fail if the function cannot start at all."""
        wanted = self.settings.min_instances
        results = await asyncio.gather(
            *(self._spawn() for _ in range(wanted)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if not isinstance(err, RuntimeErrorBase):
                raise err  # a bug, not a function problem: let it surface
        if wanted and len(errors) == wanted:
            raise errors[0]
        if wanted == 0:
            # Nothing pre-warmed: still prove the function starts, so a broken function is
            # reported at load and not on its first request.
            worker = await self._spawn()
            await self._retire(worker)
        self._reaper = asyncio.create_task(self._reap_idle(), name=f"reaper {self._label}")

    async def close(self, drain_s: float = 5.0) -> None:
        self._closing = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(Unavailable("the function is shutting down"))
        self._waiters.clear()
        if self._reaper is not None:
            self._reaper.cancel()
        deadline = time.monotonic() + drain_s
        # Polling keeps the hot path free of per-request drain bookkeeping; shutdown is rare.
        while any(w.in_flight for w in self._workers) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.gather(*(w.shutdown() for w in list(self._workers)))
        # Workers still starting check `_closing` once ready and shut themselves down; wait
        # for that rather than cancel them half-spawned (which would orphan the process).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=START_WAIT_ON_CLOSE_S)
        for task in list(self._tasks):
            task.cancel()

    def update_settings(self, settings: PoolSettings) -> None:
        """Resize a running pool (desired config from the platform).

        The new bounds hold from the next scaling decision on: a higher `min_instances` starts
        the missing workers now; workers above a lower `max_instances` or `min_instances` are
        not killed mid-request but retire through the idle reaper.
        """
        self.settings = settings
        missing = settings.min_instances - (self.instances + self._starting)
        for _ in range(max(0, missing)):
            if self._closing:
                return
            self._starting += 1
            self._background(self._spawn_quietly())

    # ---- invocation -------------------------------------------------------------------

    async def invoke(self, inv: Invocation) -> Result:
        started = time.perf_counter()
        worker = self._pick()
        if worker is None:
            worker = await self._wait_for_slot()
        queued = time.perf_counter() - started
        fut = worker.invoke(inv, static=self._static, on_timeout=self._on_timeout)
        if (
            not self._starting
            and len(self._workers) < self.settings.max_instances
            and (self._waiters or self._busy())
        ):
            self._maybe_scale_up()
        try:
            frame = await fut
        except WorkerCrashed as exc:
            err = self._crash_error(worker, exc)
            self.last_error = err.message  # now, not when the exit is reaped a moment later
            if err is exc:
                raise
            raise err from exc
        finally:
            self._release(worker)
        return result_from_frame(frame, queued, time.perf_counter() - started - queued)

    def _crash_error(self, worker: Worker, exc: WorkerCrashed) -> WorkerCrashed:
        """The request's crash, with the sandbox's reason for it when there is one.

        The worker fails its requests with what it saw ("was killed by SIGKILL") and then calls
        `_on_exit`, which asks the sandbox why; both happen before this request resumes, so the
        richer reason ("exceeded its memory limit (stopped by the kernel...)") is known here
        and must not be overwritten by the bare one.
        """
        stop = self._stops.get(worker)
        if stop is None:
            return exc
        seen, why = stop
        head = f"worker {worker.pid} {seen}"
        if exc.message.startswith(head):  # keep the stderr tail that follows
            return WorkerCrashed(f"worker {worker.pid} {why} ({seen}){exc.message[len(head) :]}")
        return WorkerCrashed(f"{exc.message}; {why}")

    def _pick(self) -> Worker | None:
        if self._closing:
            raise Unavailable("the function is shutting down")
        best: Worker | None = None
        limit = self.settings.concurrency
        for w in self._workers:
            if w.in_flight < limit and w.ready and (best is None or w.in_flight < best.in_flight):
                best = w
                if w.in_flight == 0:
                    break
        # Fairness: when others are already waiting, queue behind them.
        return None if self._waiters else best

    async def _wait_for_slot(self) -> Worker:
        if not any(w.ready for w in self._workers) and self._unhealthy():
            raise Unavailable(f"function is in a crash loop: {self.last_error}")
        if len(self._waiters) >= self.settings.max_queue:
            raise Overloaded(
                f"{self.manifest.name}: {len(self._waiters)} requests already waiting "
                f"(max_queue {self.settings.max_queue})"
            )
        fut: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._maybe_scale_up()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # We were handed a slot but the client went away: pass the slot on.
                self._release_slot(fut.result())
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            raise

    def _release(self, worker: Worker) -> None:
        # Called after the worker's own bookkeeping freed the slot.
        if self._waiters and worker.ready and worker.in_flight < self.settings.concurrency:
            self._release_slot(worker)

    def _release_slot(self, worker: Worker) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return

    def _busy(self) -> bool:
        ready = in_flight = 0
        for w in self._workers:
            if w.ready:
                ready += 1
                in_flight += w.in_flight
        if not ready:
            return True
        if in_flight > TARGET_UTILISATION * ready * self.settings.concurrency:
            return True
        if self._sandbox is None or not in_flight:
            return False
        # CPU figures change once per watchdog sample (1 s): look at them at most that often.
        now = time.monotonic()
        if now - self._cpu_checked_at >= 0.5:
            self._cpu_checked_at = now
            cpu = sum(self._sandbox.cpu_percent(w.pid) for w in self._workers if w.ready)
            self._cpu_hot = cpu / ready > CPU_SCALE_PERCENT
        return self._cpu_hot

    # ---- scaling ----------------------------------------------------------------------

    def _maybe_scale_up(self) -> None:
        if self._closing or self._starting:
            return
        if len(self._workers) + self._starting >= self.settings.max_instances:
            return
        if self._unhealthy() and self._replacing:
            return
        # Count the start now, not when the task first runs: otherwise every request that
        # arrives before then would start another worker.
        self._starting += 1
        self._background(self._spawn_quietly())

    async def _spawn_quietly(self) -> None:
        with contextlib.suppress(RuntimeErrorBase):
            await self._spawn(reserved=True)

    async def _spawn(self, *, reserved: bool = False) -> Worker:
        if not reserved:
            self._starting += 1
        prepared = None
        try:
            argv = list(self._command())
            if self._sandbox is not None:
                prepared = self._sandbox.prepare(self.manifest, argv)
                argv = prepared.argv
            worker = await Worker.spawn(
                argv,
                env=self._env,
                cwd=str(self.function_dir),
                label=self.manifest.name,
                on_exit=self._on_exit,
                capabilities=self._capabilities,
                manifest=self.manifest,
            )
        except RuntimeErrorBase as exc:
            if prepared is not None and self._sandbox is not None:
                self._sandbox.finished(prepared, None)
            self.last_error = exc.message
            if not isinstance(exc, Overloaded):  # a full budget is not the function's fault
                self._record_crash()
            self._fail_waiters_if_hopeless(exc)
            raise
        finally:
            self._starting -= 1
        if prepared is not None and self._sandbox is not None:
            self._prepared[worker.id] = prepared
            self._sandbox.attach(prepared, worker)
        if self._closing:
            await worker.shutdown()
            raise Unavailable("the function is shutting down")
        self._workers.append(worker)
        self.peak_instances = max(self.peak_instances, len(self._workers))
        self.cold_starts.append(worker.cold_start_s)
        log.debug(
            "%s: worker %d ready in %.1f ms (%s)",
            self._label,
            worker.pid,
            worker.cold_start_s * 1000,
            worker.runtime,
        )
        # Hand the new worker's slots to whoever is waiting.
        for _ in range(self.settings.concurrency):
            if not self._waiters:
                break
            self._release_slot(worker)
        return worker

    def _fail_waiters_if_hopeless(self, exc: RuntimeErrorBase) -> None:
        if any(w.ready for w in self._workers) or self._starting:
            return
        err = Unavailable(f"function failed to start a worker: {exc.message}")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(err)

    async def _retire(self, worker: Worker) -> None:
        worker.mark_closing()
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        await worker.shutdown()

    async def _reap_idle(self) -> None:
        interval = min(REAP_INTERVAL_S, self.settings.idle_timeout_s / 2)
        while not self._closing:
            await asyncio.sleep(interval)
            now = time.monotonic()
            spare = len(self._workers) - self.settings.min_instances
            for worker in list(self._workers):
                if spare <= 0:
                    break
                idle = now - worker.idle_since
                if worker.in_flight == 0 and idle >= self.settings.idle_timeout_s:
                    spare -= 1
                    log.debug("%s: retiring idle worker %d", self._label, worker.pid)
                    self._background(self._retire(worker))
            if self._workers or self._starting:
                continue
            if self.settings.min_instances and not self._replacing:
                self._schedule_replacement()

    # ---- failures ---------------------------------------------------------------------

    def _on_timeout(self, worker: Worker, inv: Invocation) -> None:
        self.timeouts += 1
        self.last_error = f"request {inv.request_id} timed out after {inv.timeout_s:g} s"

    def _on_exit(self, worker: Worker) -> None:
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        prepared = self._prepared.pop(worker.id, None)
        if prepared is not None and self._sandbox is not None:
            reason = self._sandbox.finished(prepared, worker)
            if reason:
                self._stops[worker] = (worker.exit_reason, reason)
                worker.exit_reason = f"{reason} ({worker.exit_reason})"
        if self._closing or worker.closing:
            return
        self.last_error = f"worker {worker.pid} {worker.exit_reason}"
        log.warning("%s: %s", self._label, self.last_error)
        # A worker that served for a while before dying is not a crash loop.
        if time.monotonic() - worker.ready_at > CRASH_LOOP_WINDOW_S:
            self._backoff = BACKOFF_INITIAL_S
        self._record_crash()
        if len(self._workers) + self._starting < max(1, self.settings.min_instances) or (
            self._waiters
        ):
            self._schedule_replacement()

    def _record_crash(self) -> None:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > CRASH_LOOP_WINDOW_S:
            self._crashes.popleft()

    def _unhealthy(self) -> bool:
        now = time.monotonic()
        recent = [t for t in self._crashes if now - t <= CRASH_LOOP_WINDOW_S]
        return len(recent) >= CRASH_LOOP_COUNT

    def _schedule_replacement(self) -> None:
        if self._replacing or self._closing:
            return
        self._replacing = True
        self._background(self._replace())

    async def _replace(self) -> None:
        try:
            while not self._closing:
                delay = self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    await self._spawn()
                except RuntimeErrorBase:
                    continue
                self.restarts += 1
                have = len(self._workers) + self._starting
                if have >= max(1, self.settings.min_instances) and not self._waiters:
                    return
        finally:
            self._replacing = False

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def notify_config(self, config: bytes) -> int:
        """Tell every ready worker its function's config changed (NOTIFY `config`, the new
        config as JSON); returns how many were told. Workers started later read `config()`
        themselves. Hosts that did not announce NOTIFY support (C++, an older Go SDK) are not
        sent it."""
        return sum(1 for w in self._workers if w.notify("config", config))

    # ---- status -----------------------------------------------------------------------

    @property
    def instances(self) -> int:
        return sum(1 for w in self._workers if not w.killed)

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self._workers)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.alive]

    def _worker_status(self, w: Worker) -> WorkerStatus:
        usage = self._sandbox.usage.get(w.pid) if self._sandbox is not None else None
        return WorkerStatus(
            pid=w.pid,
            in_flight=w.in_flight,
            served=w.served,
            runtime=w.runtime,
            cold_start_ms=round(w.cold_start_s * 1000, 2),
            rss_mb=round(usage.rss_mb, 1) if usage is not None else None,
            cpu_percent=round(usage.cpu_percent, 1) if usage is not None else None,
        )

    def status(self) -> PoolStatus:
        ready = sum(1 for w in self._workers if w.ready)
        health: Health
        if self._closing:
            health = "stopping"
        elif self._unhealthy():
            health = "unhealthy"
        elif ready or self.settings.min_instances == 0:
            health = "healthy"
        else:
            health = "starting"
        return PoolStatus(
            health=health,
            instances=self.instances,
            in_flight=self.in_flight,
            queued=len(self._waiters),
            last_error=self.last_error,
            peak_instances=self.peak_instances,
            ready=ready,
            starting=self._starting,
            restarts=self.restarts,
            timeouts=self.timeouts,
            recent_crashes=len(self._crashes),
            workers=tuple(self._worker_status(w) for w in self._workers),
        )

"""Which replica does the work that must happen once per fleet: a leader lease.

Several `edge-cloud serve` replicas share one database, one blob store and one broker. Most of
their work is stateless (HTTP requests, device traffic through shared subscriptions) and runs on
every replica. A little must run on exactly one: the rollout controller's loop (it is the only
writer of rollout progress), the republishing of every retained desired document after a
(re)connect or a takeover, and any roll-up over the whole fleet. That work runs under a `Lease`.

* `LocalLease` -- the single-process default (SQLite): always the leader, nothing to elect.
* `PgAdvisoryLease` -- a PostgreSQL session advisory lock (`pg_try_advisory_lock(KEY)`) held on
  a dedicated connection. Followers try to take it every `poll_s` (~1 s); the leader runs a
  trivial query on the same connection as often. When the leader process dies its connection
  closes, PostgreSQL ends the session and frees the lock, and a follower takes it at its next
  try: a takeover within about `poll_s` seconds. A leader whose connection breaks (or whose
  check does not answer within `lost_after_s`) steps down at once -- `is_leader` turns False and
  the leader's work is stopped before it reconnects as a follower -- because PostgreSQL may
  already have handed the lock to another replica.

  Beside the lease, `exclusive()` is a fleet-wide mutex (a second advisory lock, taken and
  released per use on another dedicated connection): the rollout controller holds it around
  every change of rollout state, so an operator's call served by a follower and the leader's
  loop never interleave on one rollout.

What the lease does not give: fencing. A leader cut off from PostgreSQL by a network partition
keeps running its current step until its check times out (`lost_after_s`); PostgreSQL frees the
lock only when it notices the dead connection (TCP keepalives, which this module turns on).
Keep the server's keepalive detection slower than `lost_after_s` (the defaults are) so the old
leader has stepped down before a new one starts. A process killed outright (`kill -9`, a crash,
a reboot) closes its socket and cannot overlap at all.

`LeaderDuties` runs a list of (start, stop) pairs with the lease: start when this replica becomes
the leader, stop (in reverse order) when it stops being the leader or shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from cloud_sync.errors import CloudSyncError
from runtimes import tasks

log = logging.getLogger("edgefn.leader")

# The advisory lock keys (one 64-bit key space per database): "edgefn" + a purpose.
LEADER_KEY = 0x6564_6765_666E_0001
EXCLUSIVE_KEY = 0x6564_6765_666E_0002
POLL_S = 1.0
# A leader whose check has not answered for this long steps down (and so does one whose
# connection breaks, at once).
LOST_AFTER_S = 3.0
CONNECT_TIMEOUT_S = 5
# How long `exclusive()` waits for the fleet-wide mutex before it gives up (an error, not a hang).
EXCLUSIVE_TIMEOUT_S = 30.0
# libpq TCP keepalives on the lease's connections: a silently dead peer is noticed.
KEEPALIVE_IDLE_S = 5


class LeaseError(CloudSyncError):
    """The fleet-wide mutex could not be taken (database down, or held for too long): 503,
    worth retrying."""

    code = "lease_unavailable"
    category = "transport"
    status = 503


class Lease(Protocol):
    """Who does the once-per-fleet work. Async callers only."""

    @property
    def is_leader(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def changed(self) -> bool:
        """Wait until leadership changes; return the new value of `is_leader`."""
        ...

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Fleet-wide mutual exclusion (held around each change of shared rollout state)."""
        ...

    def status(self) -> dict[str, Any]: ...


class _Signal:
    """Leadership as a value plus an event that fires on every change."""

    def __init__(self) -> None:
        self.value = False
        self.since = time.time()
        self._event = asyncio.Event()

    def set(self, value: bool) -> None:
        if value == self.value:
            return
        self.value = value
        self.since = time.time()
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def changed(self) -> bool:
        await self._event.wait()
        return self.value


class LocalLease:
    """One process, one leader: itself. `exclusive()` is the process's own lock."""

    def __init__(self) -> None:
        self._signal = _Signal()
        self._lock = asyncio.Lock()

    @property
    def is_leader(self) -> bool:
        return self._signal.value

    async def start(self) -> None:
        self._signal.set(True)

    async def close(self) -> None:
        self._signal.set(False)

    async def changed(self) -> bool:
        return await self._signal.changed()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def status(self) -> dict[str, Any]:
        return {"kind": "local", "leader": self.is_leader}


class PgAdvisoryLease:
    """A PostgreSQL advisory lock held by one replica at a time (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "",
        key: int = LEADER_KEY,
        exclusive_key: int = EXCLUSIVE_KEY,
        poll_s: float = POLL_S,
        lost_after_s: float = LOST_AFTER_S,
    ) -> None:
        self.url = url
        self.name = name
        self.key = key
        self.exclusive_key = exclusive_key
        self.poll_s = poll_s
        self.lost_after_s = lost_after_s
        self._signal = _Signal()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None  # psycopg.AsyncConnection while connected
        self._mutex_conn: Any = None
        self._mutex_local = asyncio.Lock()
        self.last_error = ""
        self.terms = 0  # how many times this replica became the leader

    @property
    def is_leader(self) -> bool:
        return self._signal.value

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader lease")

    async def close(self) -> None:
        """Step down (the lock goes with the connection) and stop trying."""
        await tasks.stop(self._task)
        self._task = None
        self._signal.set(False)
        await self._drop()
        if self._mutex_conn is not None:
            with contextlib.suppress(Exception):
                await self._mutex_conn.close()
            self._mutex_conn = None

    async def changed(self) -> bool:
        return await self._signal.changed()

    def status(self) -> dict[str, Any]:
        return {
            "kind": "postgresql-advisory-lock",
            "leader": self.is_leader,
            "since": round(self._signal.since, 3),
            "terms": self.terms,
            "last_error": self.last_error,
        }

    # ---- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                was_leader = self.is_leader
                self._lost(f"{type(exc).__name__}: {exc}")
                await self._drop()
                if was_leader:
                    # The replica whose connection just broke is the doubtful one: let a
                    # healthy follower take over first.
                    await asyncio.sleep(self.lost_after_s)
            await asyncio.sleep(self.poll_s)

    async def _step(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect("lease")
        if self.is_leader:
            # The lock lives as long as this session: a query that answers proves both.
            await self._query("SELECT 1")
            return
        row = await self._query("SELECT pg_try_advisory_lock(%s)", (self.key,))
        if row and row[0]:
            self.terms += 1
            self.last_error = ""
            log.info("replica %s is now the leader", self.name or "?")
            self._signal.set(True)

    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        async def run() -> Any:
            cur = await self._conn.execute(sql, params)
            return await cur.fetchone()

        async with asyncio.timeout(self.lost_after_s):
            return await run()

    def _lost(self, why: str) -> None:
        self.last_error = why
        if self.is_leader:
            log.warning("replica %s lost the leader lease: %s", self.name or "?", why)
        self._signal.set(False)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.lost_after_s):
                    await conn.close()

    async def _connect(self, purpose: str) -> Any:
        import psycopg  # the PostgreSQL extra; only a PostgreSQL deployment gets here

        from cloud_sync.platform.sql.pg_engine import password_from_env

        app = f"edgefn {purpose} {self.name}".strip()[:63]
        extra: dict[str, Any] = {}
        password = password_from_env()  # the store's own way (never in the URL)
        if password is not None:
            extra["password"] = password
        async with asyncio.timeout(CONNECT_TIMEOUT_S + 1):
            return await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=app,
                keepalives=1,
                keepalives_idle=KEEPALIVE_IDLE_S,
                keepalives_interval=2,
                keepalives_count=3,
                **extra,
            )

    # ---- the fleet-wide mutex ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._mutex_local:
            conn = await self._mutex_connection()
            try:
                async with asyncio.timeout(EXCLUSIVE_TIMEOUT_S):
                    await conn.execute("SELECT pg_advisory_lock(%s)", (self.exclusive_key,))
            except (TimeoutError, Exception) as exc:
                await self._drop_mutex()
                raise LeaseError(f"cannot take the fleet-wide rollout lock: {exc}") from exc
            try:
                yield
            finally:
                try:
                    async with asyncio.timeout(self.lost_after_s):
                        await conn.execute("SELECT pg_advisory_unlock(%s)", (self.exclusive_key,))
                except (TimeoutError, Exception):
                    # Closing the session releases the lock just as well.
                    await self._drop_mutex()

    async def _mutex_connection(self) -> Any:
        if self._mutex_conn is None or self._mutex_conn.closed:
            try:
                self._mutex_conn = await self._connect("mutex")
            except (TimeoutError, Exception) as exc:
                raise LeaseError(f"cannot reach PostgreSQL for the rollout lock: {exc}") from exc
        return self._mutex_conn

    async def _drop_mutex(self) -> None:
        conn, self._mutex_conn = self._mutex_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.lost_after_s):
                    await conn.close()


def replica_settings_problem(lease: str, replica_id: str) -> str:
    """What is wrong with a replica's settings ("" = nothing), said before anything starts."""
    from urllib.parse import urlsplit

    from cloud_sync.errors import TopicError
    from cloud_sync.topics import validate_id

    if lease:
        parts = urlsplit(lease)
        if parts.scheme not in ("postgresql", "postgres"):
            return f"--lease must be a postgresql:// URL, not {parts.scheme or lease!r}"
        if parts.password:
            return "--lease must not carry a password (use PGPASSWORD or ~/.pgpass)"
        if not replica_id:
            return "--lease needs --replica-id (each replica's stable name)"
    if replica_id:
        try:
            validate_id(replica_id, "replica id")
        except TopicError as exc:
            return f"bad --replica-id: {exc}"
    return ""


Duty = tuple[str, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


class LeaderDuties:
    """Runs each duty's start while this replica leads and its stop when it stops leading.

    A start that fails is logged and its stop still runs on step-down (stops are idempotent);
    the next term tries again. Stops run in reverse order of the starts.
    """

    def __init__(self, lease: Lease, duties: Sequence[Duty] = ()) -> None:
        self.lease = lease
        self.duties: list[Duty] = list(duties)
        self._task: asyncio.Task[None] | None = None
        self._running = False

    def add(
        self, name: str, start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
    ) -> None:
        self.duties.append((name, start, stop))

    async def start(self) -> None:
        await self.lease.start()
        self._task = asyncio.create_task(self._follow(), name="leader duties")

    async def close(self) -> None:
        await tasks.stop(self._task)
        self._task = None
        await self._stop_all()
        await self.lease.close()

    async def _follow(self) -> None:
        while True:
            # Re-check after every start/stop (leadership may have changed meanwhile); wait
            # only when nothing is to do -- no await between the check and the wait.
            if self.lease.is_leader and not self._running:
                await self._start_all()
            elif not self.lease.is_leader and self._running:
                await self._stop_all()
            else:
                await self.lease.changed()

    async def _start_all(self) -> None:
        self._running = True
        for name, start, _ in self.duties:
            try:
                await start()
            except Exception:
                log.exception("leader duty %s did not start", name)

    async def _stop_all(self) -> None:
        if not self._running:
            return
        self._running = False
        for name, _, stop in reversed(self.duties):
            try:
                await stop()
            except Exception:
                log.exception("leader duty %s did not stop cleanly", name)

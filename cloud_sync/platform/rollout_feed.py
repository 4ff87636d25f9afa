"""What devices sent that the rollout controller needs, read from the fleet store's records.

Every device -> platform record is stored once in the fleet store's `records` table, whichever
way it came (MQTT intake or the HTTP fallback's `POST /v1/devices/{id}/records`), de-duplicated
there by idempotency key and payload digest. The controller reads that table forward by row id
instead of hooking into each transport: one input path for MQTT and HTTP, and a restarted
platform re-reads what it needs from the same rows (status reports are applied by seq, so
reading one twice changes nothing).

Per record kind:

* `rollout`  -- one `StatusReport` (`messages.decode_status`);
* `reported` -- the latest report per function under `rollouts` (`reports_from_reported`),
  which heals a lost report;
* `metrics`  -- `edgefn.metrics/1`, split per (function, version) by `metrics.by_version`.

A report whose `device` is not the record's sender is dropped: a device speaks for itself only.
Reads go through the fleet store's engine (`sql.Engine.read`): on SQLite a read-only connection
the store's writer never waits for (WAL), on PostgreSQL a pooled read-only transaction.

Record ids on PostgreSQL are not committed in order: several replicas (and several connections
of one) insert at once, so id 41 may become visible after id 42, and a rolled-back insert leaves
41 missing for good. A cursor that stepped over 41 would never see it. So on PostgreSQL the feed
stops before a gap until it is old (`GAP_WAIT_S`): either the row after the gap was received
that long ago, or this feed has been waiting that long; no ingest transaction runs for seconds,
so a gap that old is an id nobody will commit. On SQLite one writer commits ids in order and a
gap is final at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.platform.sql import Conn, Engine, SqliteEngine
from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.messages import StatusReport, decode_status, reports_from_reported
from cloud_sync.rollout.metrics import VersionMetrics, by_version

log = logging.getLogger("edgefn.rollouts")

# Rows read per call: bounds one controller pass (memory and time) when a large backlog waits,
# e.g. after a platform restart; the next pass continues from the cursor.
BATCH_ROWS = 5000
# How long a gap in PostgreSQL's record ids may still be filled by a transaction in flight.
GAP_WAIT_S = 5.0

MetricsKey = tuple[str, str, str]  # (device, function, version)


@dataclass
class Batch:
    """What one read brought: reports to apply and metrics to add; `last_id` is the cursor."""

    last_id: int
    reports: list[StatusReport] = field(default_factory=list)
    metrics: dict[MetricsKey, VersionMetrics] = field(default_factory=dict)
    rows: int = 0


class RecordFeed:
    def __init__(self, where: Path | Engine) -> None:
        """`where`: the fleet store's SQLite file (a reader of its own, opened here) or its
        engine (`FleetStore.engine`), which the store owns and closes."""
        self._own: SqliteEngine | None = None
        if isinstance(where, Path | str):
            self.path: Path | None = Path(where)
            self._own = SqliteEngine(self.path, synchronous="NORMAL", name="edgefn-feed-db")
            self._engine: Engine = self._own
        else:
            self.path, self._engine = None, where
        self._lock = threading.Lock()  # the gap bookkeeping, from worker threads
        # First id of a gap -> when this feed first stopped before it (PostgreSQL only).
        self._gaps: dict[int, float] = {}

    def close(self) -> None:
        if self._own is not None:
            self._own.close()

    def first_id_since(self, received_at: float) -> int:
        """The cursor to start from so that records received since `received_at` are read."""

        def query(c: Conn) -> int:
            row = c.execute(
                "SELECT MIN(id) FROM records WHERE received_at >= ?", (received_at,)
            ).fetchone()
            if row is None or row[0] is None:
                (top,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()
                return int(top)
            return int(row[0]) - 1

        return self._engine.read(query)

    def read(self, after_id: int) -> Batch:
        """Records with id > after_id (at most BATCH_ROWS), decoded. Metrics counts that name
        no version are skipped: a gate judges one version, and guessing could blame another."""
        rows = self._engine.read(
            lambda c: c.execute(
                "SELECT id, device, kind, payload, received_at FROM records WHERE id > ?"
                " ORDER BY id LIMIT ?",
                (after_id, BATCH_ROWS),
            ).fetchall()
        )
        if self._engine.dialect == "postgresql":
            rows = self._up_to_young_gap(after_id, rows, time.time())
        batch = Batch(last_id=after_id, rows=len(rows))
        for ident, device, kind, payload, _at in rows:
            batch.last_id = int(ident)
            if kind not in ("rollout", "reported", "metrics"):
                continue
            try:
                _decode(batch, str(device), str(kind), bytes(payload))
            except (MessageError, ValueError, TypeError, AttributeError) as exc:
                log.debug("record %s of %s not usable for rollouts: %s", ident, device, exc)
        return batch

    def _up_to_young_gap(self, after_id: int, rows: list[Any], now: float) -> list[Any]:
        """The rows before the first gap that a transaction in flight may still fill."""
        with self._lock:
            expected = after_id + 1
            for i, row in enumerate(rows):
                ident, received_at = int(row[0]), float(row[4])
                if ident != expected:
                    noticed = self._gaps.setdefault(expected, now)
                    if now - received_at < GAP_WAIT_S and now - noticed < GAP_WAIT_S:
                        rows = rows[:i]
                        break
                expected = ident + 1
            for start in [g for g in self._gaps if g < expected]:
                del self._gaps[start]  # passed: forget
            return rows


def _decode(batch: Batch, device: str, kind: str, payload: bytes) -> None:
    if kind == "rollout":
        report = decode_status(payload)
        if report.device == device:
            batch.reports.append(report)
        return
    doc: Any = json.loads(payload)
    if not isinstance(doc, dict):
        return
    if kind == "reported":
        good, _bad = reports_from_reported(doc)
        batch.reports.extend(r for r in good if r.device == device)
        return
    for (function, version), m in by_version(doc).items():
        if version is None:
            continue  # counts no version can be named for: no gate may judge them
        key = (device, function, version)
        have = batch.metrics.get(key)
        batch.metrics[key] = have.merge(m) if have is not None else m

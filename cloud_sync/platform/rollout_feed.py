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
The connection is read-only (`query_only`); the fleet store's writer never waits for it (WAL).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.messages import StatusReport, decode_status, reports_from_reported
from cloud_sync.rollout.metrics import VersionMetrics, by_version
from runtimes.sqlitedb import connect_reader

log = logging.getLogger("edgefn.rollouts")

# Rows read per call: bounds one controller pass (memory and time) when a large backlog waits,
# e.g. after a platform restart; the next pass continues from the cursor.
BATCH_ROWS = 5000

MetricsKey = tuple[str, str, str]  # (device, function, version)


@dataclass
class Batch:
    """What one read brought: reports to apply and metrics to add; `last_id` is the cursor."""

    last_id: int
    reports: list[StatusReport] = field(default_factory=list)
    metrics: dict[MetricsKey, VersionMetrics] = field(default_factory=dict)
    rows: int = 0


class RecordFeed:
    def __init__(self, fleet_db: Path) -> None:
        self.path = Path(fleet_db)
        self._lock = threading.Lock()  # one reader connection, used from worker threads
        self._conn: sqlite3.Connection | None = None

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect_reader(self.path, busy_timeout_s=1.0)
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def first_id_since(self, received_at: float) -> int:
        """The cursor to start from so that records received since `received_at` are read."""
        with self._lock:
            row = (
                self._c()
                .execute("SELECT MIN(id) FROM records WHERE received_at >= ?", (received_at,))
                .fetchone()
            )
            if row is None or row[0] is None:
                (top,) = self._c().execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()
                return int(top)
            return int(row[0]) - 1

    def read(self, after_id: int) -> Batch:
        """Records with id > after_id (at most BATCH_ROWS), decoded. Metrics counts that name
        no version are skipped: a gate judges one version, and guessing could blame another."""
        with self._lock:
            rows = (
                self._c()
                .execute(
                    "SELECT id, device, kind, payload FROM records WHERE id > ? AND kind IN"
                    " ('rollout', 'reported', 'metrics') ORDER BY id LIMIT ?",
                    (after_id, BATCH_ROWS),
                )
                .fetchall()
            )
        batch = Batch(last_id=after_id, rows=len(rows))
        for ident, device, kind, payload in rows:
            batch.last_id = int(ident)
            try:
                _decode(batch, str(device), str(kind), bytes(payload))
            except (MessageError, ValueError, TypeError, AttributeError) as exc:
                log.debug("record %s of %s not usable for rollouts: %s", ident, device, exc)
        return batch


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

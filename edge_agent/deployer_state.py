"""The deployer's durable memory: one JSON file in the data dir, replaced atomically.

What must survive `kill -9` and power loss (`DATA_DIR/deployer-state.json`):

* `seq` -- the report counter. The platform applies a report only when its seq is above the
  last one it applied (`cloud_sync.rollout.messages.order`), so it must never go back. A fresh
  or damaged file starts from the clock in milliseconds, which is above any counter an earlier
  life of this agent could have reached (it would need 1,000 reports a second to catch up).
* `step` -- the deployment in progress (its desired entry, the version it replaces, how often it
  was started). After a restart the deployer finishes it, or reports `failed: interrupted` when
  it was started `MAX_ATTEMPTS` times already (a version that kills the agent must not loop).
* `done` -- per function, the desired entry last handled to the end, so a redelivered or
  re-applied desired document does nothing.
* `refused` -- per function, the version that failed or was rejected here: not tried again
  until the desired version changes (no install loop against a desired state that keeps naming
  it).
* `latest` -- per function, the latest status report, repeated in the reported document.

A file that cannot be read is renamed aside (`deployer-state.json.damaged-<time>`) and the
deployer starts empty: the desired document is still there, so it converges again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.messages import DesiredDeployment, StatusReport, decode_status
from runtimes.fsio import atomic_write

log = logging.getLogger("edgefn.deployer")

STATE_FILE = "deployer-state.json"
# Starts of one step before the deployer gives up on it with `interrupted`: one restart is an
# outage, three in a row mean the step itself takes the agent down.
MAX_ATTEMPTS = 3


def want_key(want: DesiredDeployment) -> dict[str, Any]:
    """A desired entry as stored: equal entries mean the same request."""
    return {
        "version": want.version,
        "rollout": want.rollout,
        "rollback": want.rollback,
        "remove": want.remove,
    }


@dataclass(slots=True)
class DeployerState:
    path: Path
    seq: int = 0
    step: dict[str, Any] | None = None  # {function, want, previous, started_at, attempts, state}
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    latest: dict[str, StatusReport] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: Path) -> DeployerState:
        """Blocking (file I/O): call in a thread."""
        path = data_dir / STATE_FILE
        fresh = cls(path, seq=int(time.time() * 1000))
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return fresh
        try:
            data = json.loads(raw)
            if not isinstance(data, Mapping):
                raise ValueError("not a JSON object")
            latest = {str(k): decode_status(v) for k, v in (data.get("latest") or {}).items()}
            state = cls(
                path,
                seq=max(int(data["seq"]), 0),
                step=dict(data["step"]) if data.get("step") else None,
                done={str(k): dict(v) for k, v in (data.get("done") or {}).items()},
                refused={str(k): str(v) for k, v in (data.get("refused") or {}).items()},
                latest=latest,
            )
        except (ValueError, KeyError, TypeError, MessageError) as exc:
            aside = path.with_name(f"{STATE_FILE}.damaged-{int(time.time())}")
            os.replace(path, aside)
            log.warning("deployer: damaged state file set aside as %s (%s)", aside.name, exc)
            return fresh
        return state

    def save(self) -> None:
        """Blocking (atomic replace + fsync): call in a thread."""
        data = {
            "seq": self.seq,
            "step": self.step,
            "done": self.done,
            "refused": self.refused,
            "latest": {k: r.to_dict() for k, r in sorted(self.latest.items())},
        }
        atomic_write(self.path, json.dumps(data, sort_keys=True).encode(), mode=0o600)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

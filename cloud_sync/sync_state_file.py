"""The sync client's state file (`<data_dir>/sync-state.json`): load, save, damaged-file handling.

Split out of `cloud_sync.sync` so that module stays one concept, the link to the platform, and
under the project's module size. What survives a restart: the tracker snapshot (versions seen /
applied, effective config), the latest desired documents and the report counter. The file is
written atomically (before a desired message is acknowledged); a damaged one is set aside
(`runtimes.setaside`) so the next write starts clean and the operator keeps the copy.
Both functions block: call them in a thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.errors import ConfigError
from cloud_sync.state import ConfigTracker, DesiredDoc, parse_desired
from runtimes.fsio import atomic_write
from runtimes.setaside import set_aside

log = logging.getLogger("edgefn.sync")


@dataclass(frozen=True, slots=True)
class SavedState:
    tracker: ConfigTracker
    seq: int
    device_doc: DesiredDoc | None
    group_doc: DesiredDoc | None


def load_state(path: Path) -> SavedState | None:
    """The saved state, or None to start afresh: no file, an unreadable one, or a damaged one
    (set aside; the platform resends desired state, and sequence numbers only need to grow
    per boot)."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("sync: ignoring unreadable %s (%s)", path, exc.strerror)
        return None
    try:
        data = json.loads(content)
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        tracker = ConfigTracker(data.get("tracker"))
        seq = int(data.get("seq", 0))
    except (ValueError, TypeError, AttributeError, KeyError, ConfigError) as exc:
        try:
            aside = set_aside(path)
        except OSError as err:
            log.warning(
                "sync: %s is damaged (%s) and cannot be set aside: %s",
                path.name,
                exc,
                err.strerror,
            )
            return None
        log.warning(
            "sync: %s was damaged (%s): set aside as %s, starting afresh",
            path.name,
            exc,
            aside,
        )
        return None
    docs: dict[str, DesiredDoc | None] = {"device_doc": None, "group_doc": None}
    for key in docs:
        raw = data.get(key)
        if raw:
            with contextlib.suppress(ConfigError):
                docs[key] = parse_desired(raw)
    return SavedState(tracker, seq, docs["device_doc"], docs["group_doc"])


def save_state(
    path: Path,
    tracker: ConfigTracker,
    seq: int,
    device_doc: DesiredDoc | None,
    group_doc: DesiredDoc | None,
) -> None:
    def doc(d: DesiredDoc | None) -> Any:
        return {"version": d.version, "config": dict(d.config)} if d else None

    data = {
        "tracker": tracker.snapshot(),
        "seq": seq,
        "device_doc": doc(device_doc),
        "group_doc": doc(group_doc),
    }
    atomic_write(path, json.dumps(data).encode(), mode=0o600)

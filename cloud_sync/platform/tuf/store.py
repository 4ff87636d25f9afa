"""The metadata files on disk, in the TUF specification's consistent-snapshot layout.

`<data_dir>/tuf/metadata/` holds `N.root.json`, `N.targets.json`, `N.snapshot.json`,
`N.<delegated role>.json` and `timestamp.json`. A versioned file that a signed snapshot (or the
root chain) names is never replaced: writers only add versions above the current ones, so a
reader that has a snapshot can always fetch the exact files it names. Each file is
written atomically and fsynced (`runtimes.fsio.atomic_write`). A publication writes its new
versioned files first and `timestamp.json` last: the timestamp is the one switch, so a reader
never sees a snapshot whose files are not there yet.

`lock()` serialises every writer, threads of the platform and `edge-cloud tuf` commands run
beside it alike: a threading lock plus `flock` on `<data_dir>/tuf/lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from cloud_sync.platform.tuf.errors import NotInitialised, TufError
from cloud_sync.platform.tuf.keys import tuf_dir
from runtimes.fsio import atomic_write

# A role name in a file name: top-level roles and `publisher-<16 hex>`.
FILE_RE = re.compile(r"^(?:timestamp|([1-9][0-9]{0,17})\.([a-z][a-z0-9-]{0,63}))\.json$")
_ROOT_RE = re.compile(r"^([1-9][0-9]{0,17})\.root\.json$")
_SERIALIZER = JSONSerializer(compact=True)
_THREAD_LOCK = threading.Lock()


def to_bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(_SERIALIZER)


class MetadataStore:
    """Read and write the repository's metadata files."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = tuf_dir(data_dir) / "metadata"
        self._lock_path = tuf_dir(data_dir) / "lock"

    @property
    def initialised(self) -> bool:
        return (self.dir / "timestamp.json").is_file()

    def require(self) -> None:
        if not self.initialised:
            raise NotInitialised(
                "TUF is not initialised on this platform: run `edge-cloud tuf init --data-dir D`"
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with _THREAD_LOCK:
            self._lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._lock_path, "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def read(self, filename: str) -> bytes | None:
        """The bytes of one metadata file (a validated name), or None when there is none."""
        if not FILE_RE.match(filename):
            return None
        try:
            return (self.dir / filename).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def load(self, filename: str) -> Metadata[Any]:
        data = self.read(filename)
        if data is None:
            raise TufError(f"metadata file {filename} is missing", code="tuf_metadata_missing")
        return Metadata.from_bytes(data)

    def root_version(self) -> int:
        versions = [
            int(m.group(1)) for p in self.dir.glob("*.root.json") if (m := _ROOT_RE.match(p.name))
        ]
        if not versions:
            raise NotInitialised("no root metadata: run `edge-cloud tuf init`")
        return max(versions)

    def root(self) -> Metadata[Root]:
        md: Metadata[Root] = self.load(f"{self.root_version()}.root.json")
        return md

    def timestamp(self) -> Metadata[Timestamp]:
        self.require()
        md: Metadata[Timestamp] = self.load("timestamp.json")
        return md

    def snapshot(self, timestamp: Metadata[Timestamp] | None = None) -> Metadata[Snapshot]:
        ts = timestamp or self.timestamp()
        md: Metadata[Snapshot] = self.load(f"{ts.signed.snapshot_meta.version}.snapshot.json")
        return md

    def role(self, name: str, snapshot: Metadata[Snapshot]) -> Metadata[Targets] | None:
        """The current version of a targets role (top-level or delegated), None if never written."""
        meta = snapshot.signed.meta.get(f"{name}.json")
        if meta is None:
            return None
        md: Metadata[Targets] = self.load(f"{meta.version}.{name}.json")
        return md

    def write(self, files: Mapping[str, bytes], timestamp: bytes | None) -> None:
        """Write the new versioned files, then `timestamp.json` (the switch) when given."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if not FILE_RE.match(name) or name == "timestamp.json":
                raise TufError(f"not a versioned metadata file name: {name}")
            # Callers only write versions above the current chain (under the lock), so a file
            # already there is an orphan of an interrupted commit that no snapshot names.
            atomic_write(self.dir / name, data)
        if timestamp is not None:
            atomic_write(self.dir / "timestamp.json", timestamp)

"""The repository's online side: what the running platform signs, and the publish check.

The platform holds only the snapshot and timestamp keys (`<data_dir>/tuf/online-keys/`). It
never signs `root`, `targets` or a publisher's role: `root` and `targets` are signed offline by
`edge-cloud tuf ...` (`admin.py`), a publisher's role by the publisher (`claim.py`). Every
change goes through `commit`: under the repository lock, write the changed roles' new versions,
a new snapshot naming them, then the new timestamp (the switch, `store.py`).

`TufRepository` reads the files on each call rather than caching them, so `edge-cloud tuf init`
or `add-publisher` run beside a live platform take effect at once, and an uninitialised data dir
keeps the registry working as before (the routes answer 404 `tuf_not_initialised`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.exceptions import UnverifiedSignatureError
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Targets

from cloud_sync.platform.tuf import claim as claims
from cloud_sync.platform.tuf.errors import BadClaim, PublishRefused, RoleConflict
from cloud_sync.platform.tuf.keys import load_signer, online_dir, raw_public
from cloud_sync.platform.tuf.store import MetadataStore, to_bytes

log = logging.getLogger("edgefn.tuf")

T = TypeVar("T")
DEFAULT_TIMESTAMP_EXPIRY_S = 86400.0
DEFAULT_SNAPSHOT_EXPIRY_S = 7 * 86400.0
# The background task never sleeps longer than this between checks.
MAX_CHECK_INTERVAL_S = 600.0


def meta_file(data: bytes, version: int) -> MetaFile:
    """Version, length and sha256 of a metadata file: what snapshot/timestamp pin."""
    return MetaFile(version, len(data), {"sha256": hashlib.sha256(data).hexdigest()})


class TufRepository:
    def __init__(
        self,
        data_dir: Path,
        *,
        timestamp_expiry_s: float = DEFAULT_TIMESTAMP_EXPIRY_S,
        snapshot_expiry_s: float = DEFAULT_SNAPSHOT_EXPIRY_S,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store = MetadataStore(self.data_dir)
        self.timestamp_expiry = dt.timedelta(seconds=timestamp_expiry_s)
        self.snapshot_expiry = dt.timedelta(seconds=max(snapshot_expiry_s, timestamp_expiry_s))

    @property
    def initialised(self) -> bool:
        return self.store.initialised

    def root_json(self) -> dict[str, Any] | None:
        """The newest root document as a JSON object (enrolment pins it), None without TUF."""
        if not self.initialised:
            return None
        data = self.store.read(f"{self.store.root_version()}.root.json")
        return None if data is None else dict(json.loads(data))

    # ---- commit: the one way metadata changes -----------------------------------------------

    def commit(
        self, roles: Mapping[str, Metadata[Targets]], *, resign_snapshot: bool = True
    ) -> None:
        """Write `roles` (signed), a snapshot naming them and a timestamp. Caller holds lock()."""
        ts = self.store.timestamp()
        snap = self.store.snapshot(ts)
        files: dict[str, bytes] = {}
        for name, md in roles.items():
            data = to_bytes(md)
            files[f"{md.signed.version}.{name}.json"] = data
            snap.signed.meta[f"{name}.json"] = meta_file(data, md.signed.version)
        if roles or resign_snapshot:
            snap.signed.version += 1
            snap.signed.expires = claims.utc_in(self.snapshot_expiry)
            snap.signatures.clear()
            snap.sign(load_signer(online_dir(self.data_dir) / "snapshot.pem"))
            snap_bytes = to_bytes(snap)
            files[f"{snap.signed.version}.snapshot.json"] = snap_bytes
            ts.signed.snapshot_meta = meta_file(snap_bytes, snap.signed.version)
        ts.signed.version += 1
        ts.signed.expires = claims.utc_in(self.timestamp_expiry)
        ts.signatures.clear()
        ts.sign(load_signer(online_dir(self.data_dir) / "timestamp.pem"))
        self.store.write(files, to_bytes(ts))

    # ---- expiry: re-signing timestamp (and snapshot) -----------------------------------------

    def refresh_expiry(self, *, force: bool = False) -> bool:
        """Re-sign the timestamp when half its life is gone (the snapshot likewise), or always
        with `force`. True when something was re-signed."""
        if not self.initialised:
            return False
        with self.store.lock():
            now = dt.datetime.now(dt.UTC)
            ts = self.store.timestamp()
            snap = self.store.snapshot(ts)
            snap_due = snap.signed.expires - now < self.snapshot_expiry / 2
            left = ts.signed.expires - now
            # Half its life gone, or signed for longer than the platform now allows.
            ts_due = left < self.timestamp_expiry / 2 or left > self.timestamp_expiry
            if not (force or ts_due or snap_due):
                return False
            self.commit({}, resign_snapshot=snap_due)
        log.info("re-signed the TUF timestamp%s", " and snapshot" if snap_due else "")
        return True

    def check_interval_s(self) -> float:
        return max(0.2, min(MAX_CHECK_INTERVAL_S, self.timestamp_expiry.total_seconds() / 8))

    async def run_resigner(self) -> None:
        """The platform's background task: keep timestamp and snapshot fresh until cancelled."""
        while True:
            try:
                await asyncio.to_thread(self.refresh_expiry)
            except Exception as exc:  # a missing online key must not kill the task; say why
                log.error("TUF timestamp re-signing failed: %s", exc)
            await asyncio.sleep(self.check_interval_s())

    # ---- publish --------------------------------------------------------------------------------

    def publish(
        self,
        *,
        name: str,
        version: str,
        sha256: str,
        length: int,
        publisher: str,
        claim: claims.Claim | None,
        store: Callable[[], T],
    ) -> T:
        """Check `claim` against the delegations, run `store` (blob + record), then commit the
        publisher's new role version. Refusals raise before `store` runs: nothing is kept."""
        if claim is None:
            raise BadClaim(
                "this registry serves TUF metadata: publish with `edge-cloud fn publish --key "
                "KEY` so the publisher key signs its targets role",
                code="tuf_signature_required",
            )
        path = claims.target_path(name, version)
        with self.store.lock():
            snap = self.store.snapshot()
            targets = self.store.role("targets", snap)
            assert targets is not None
            new = self._check(targets, snap, claim, path, sha256, length, publisher)
            result = store()
            if new is not None:
                self.commit({claim.role: new})
        if new is not None:
            log.info("TUF: %s signed %s (role version %d)", claim.role, path, claim.version)
        return result

    def _check(
        self,
        targets: Metadata[Targets],
        snap: Metadata[Snapshot],
        claim: claims.Claim,
        path: str,
        sha256: str,
        length: int,
        publisher: str,
    ) -> Metadata[Targets] | None:
        """The role to commit, None when the target is already there with the same bytes."""
        delegations = targets.signed.delegations
        role = delegations.roles.get(claim.role) if delegations and delegations.roles else None
        if delegations is None or role is None:
            raise PublishRefused(
                f"{claim.role} is not a publisher of this registry (revoked, or never added: "
                "`edge-cloud tuf add-publisher`)",
                code="tuf_unknown_publisher",
            )
        if not role.is_delegated_path(path):
            owned = ", ".join(p.removesuffix("/*") for p in role.paths or ())
            raise PublishRefused(
                f"{claim.role} may not publish {path}: its delegation covers {owned or 'nothing'}",
                code="tuf_not_delegated",
            )
        keys = [delegations.keys[k] for k in role.keyids if k in delegations.keys]
        edgefn_ids = {hashlib.sha256(raw_public(k)).hexdigest()[:16] for k in keys}  # type: ignore[arg-type]
        if publisher not in edgefn_ids:
            raise PublishRefused(
                f"the bundle is signed by publisher {publisher}, not by the key of {claim.role}",
                code="tuf_publisher_mismatch",
            )
        current = self.store.role(claim.role, snap)
        cur_version = snap.signed.meta[f"{claim.role}.json"].version if current else 0
        if current is not None and path in current.signed.targets:
            have = current.signed.targets[path]
            if have.hashes.get("sha256") == sha256 and have.length == length:
                return None
            raise RoleConflict(
                f"{path} is already signed with other bytes", code="tuf_target_conflict"
            )
        if claim.version != cur_version + 1:
            raise RoleConflict(
                f"{claim.role} is at version {cur_version}: the signed role must be version "
                f"{cur_version + 1}, got {claim.version} (fetch the role again and re-sign)"
            )
        now = dt.datetime.now(dt.UTC)
        if not now < claim.expires <= now + claims.MAX_ROLE_EXPIRY:
            raise BadClaim(f"{claims.HEADER_EXPIRES} must be in the next two years")
        new = claims.next_role(
            current, path, length, sha256, version=claim.version, expires=claim.expires
        )
        claims.attach(new, claim)
        try:
            targets.signed.verify_delegate(claim.role, claims.payload(new), new.signatures)
        except (UnsignedMetadataError, UnverifiedSignatureError) as exc:
            raise PublishRefused(
                f"the signature over {claim.role} version {claim.version} does not verify with "
                "its delegated key (signed other bytes, or another key)",
                code="tuf_bad_signature",
            ) from exc
        return new

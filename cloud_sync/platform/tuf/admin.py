"""The repository's offline operations: init, rotate-root, add and revoke a publisher.

These need keys the platform does not hold while it runs: the root keys (a threshold of them)
and the targets key, kept in `<data_dir>/tuf/offline-keys/` only until the operator moves them
off the host (`--offline-keys DIR` brings them back for one command). Snapshot and timestamp
are re-signed here with the online keys, under the same lock the platform uses, so running
these beside a live platform is safe and takes effect at once.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import CanonicalJSONSerializer

from cloud_sync.platform.tuf.claim import utc_in
from cloud_sync.platform.tuf.errors import AlreadyInitialised, PublishRefused, TufError
from cloud_sync.platform.tuf.keys import (
    OFFLINE_DIR,
    ONLINE_DIR,
    load_public_pem,
    load_signer,
    new_key,
    offline_dir,
    online_dir,
    public_key,
    role_name,
    tuf_dir,
)
from cloud_sync.platform.tuf.repository import TufRepository, meta_file
from cloud_sync.platform.tuf.store import MetadataStore, to_bytes
from runtimes.fsio import fsync_dir
from runtimes.manifest import NAME_RE

ROOT_EXPIRY = dt.timedelta(days=365)
TARGETS_EXPIRY = dt.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class InitResult:
    root_keyids: tuple[str, ...]
    offline_dir: Path
    online_dir: Path


def _root_key_file(directory: Path, key: SSlibKey) -> Path:
    return directory / f"root-{key.keyid[:16]}.pem"


def _new_root_keys(directory: Path, count: int) -> list[CryptoSigner]:
    signers: list[CryptoSigner] = []
    for _ in range(count):
        scratch = directory / f".new-root-{os.getpid()}-{len(signers)}.pem"
        signer = new_key(scratch)
        os.replace(scratch, _root_key_file(directory, public_key(signer)))
        signers.append(signer)
    fsync_dir(directory)
    return signers


def init(data_dir: Path, *, threshold: int = 1, timestamp_expiry_s: float = 86400.0) -> InitResult:
    """Create every key and version 1 of every role, built aside and moved into place at once."""
    if threshold < 1 or threshold > 16:
        raise TufError("--threshold must be between 1 and 16", code="tuf_bad_threshold")
    final = tuf_dir(data_dir)
    if final.exists():
        raise AlreadyInitialised(f"{final} exists: TUF is already initialised on this data dir")
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tuf-init-", dir=data_dir))
    try:
        offline, online = work / OFFLINE_DIR, work / ONLINE_DIR
        roots = _new_root_keys(offline, threshold)
        signers = {
            "targets": new_key(offline / "targets.pem"),
            "snapshot": new_key(online / "snapshot.pem"),
            "timestamp": new_key(online / "timestamp.pem"),
        }
        root = Root(expires=utc_in(ROOT_EXPIRY), consistent_snapshot=True)
        for signer in roots:
            root.add_key(public_key(signer), "root")
        root.roles["root"].threshold = threshold
        for name, signer in signers.items():
            root.add_key(public_key(signer), name)
        root_md = Metadata(root)
        for signer in roots:
            root_md.sign(signer, append=True)
        targets_md = Metadata(Targets(expires=utc_in(TARGETS_EXPIRY)))
        targets_md.signed.delegations = Delegations(keys={}, roles={})
        targets_md.sign(signers["targets"])
        targets_bytes = to_bytes(targets_md)
        snap_md = Metadata(Snapshot(expires=utc_in(dt.timedelta(days=7))))
        snap_md.signed.meta["targets.json"] = meta_file(targets_bytes, 1)
        snap_md.sign(signers["snapshot"])
        snap_bytes = to_bytes(snap_md)
        ts_md = Metadata(Timestamp(expires=utc_in(dt.timedelta(seconds=timestamp_expiry_s))))
        ts_md.signed.snapshot_meta = meta_file(snap_bytes, 1)
        ts_md.sign(signers["timestamp"])
        store = MetadataStore(work.parent)
        store.dir = work / "metadata"
        store.write(
            {
                "1.root.json": to_bytes(root_md),
                "1.targets.json": targets_bytes,
                "1.snapshot.json": snap_bytes,
            },
            to_bytes(ts_md),
        )
        os.rename(work, final)
        fsync_dir(Path(data_dir))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return InitResult(
        tuple(public_key(s).keyid for s in roots), final / OFFLINE_DIR, final / ONLINE_DIR
    )


def _signers_for(directory: Path, keyids: Sequence[str], pattern: str) -> list[CryptoSigner]:
    """The signers in `directory` (files matching `pattern`) whose key id is in `keyids`."""
    found = []
    for path in sorted(directory.glob(pattern)):
        signer = load_signer(path)
        if public_key(signer).keyid in keyids:
            found.append(signer)
    return found


def rotate_root(
    data_dir: Path,
    *,
    keys_dir: Path | None = None,
    threshold: int | None = None,
    online: bool = False,
) -> Metadata[Root]:
    """Root version N+1 with new root keys, signed by a threshold of the old ones and all the
    new ones (a device holding version N verifies N+1 with N's keys, then N+1 with its own).

    With `online`, the snapshot and timestamp keys are replaced too (the platform host was
    compromised): the new root names the new keys, then snapshot and timestamp are re-signed
    with them at once."""
    keys_dir = keys_dir or offline_dir(data_dir)
    repo = TufRepository(data_dir)
    repo.store.require()
    with repo.store.lock():
        old = repo.store.root()
        old_role = old.signed.roles["root"]
        old_signers = _signers_for(keys_dir, old_role.keyids, "root-*.pem")
        if len(old_signers) < old_role.threshold:
            raise TufError(
                f"rotating root needs {old_role.threshold} of the current root keys; found "
                f"{len(old_signers)} in {keys_dir} (bring the offline keys: --offline-keys DIR)",
                code="tuf_threshold_not_met",
            )
        count = threshold or old_role.threshold
        if count < 1 or count > 16:
            raise TufError("--threshold must be between 1 and 16", code="tuf_bad_threshold")
        new_signers = _new_root_keys(keys_dir, count)
        new = Metadata[Root].from_bytes(old.to_bytes())
        new.signatures.clear()
        for keyid in list(old_role.keyids):
            new.signed.revoke_key(keyid, "root")
        for signer in new_signers:
            new.signed.add_key(public_key(signer), "root")
        new.signed.roles["root"].threshold = count
        fresh = _new_online_keys(data_dir, new.signed) if online else []
        new.signed.version += 1
        new.signed.expires = utc_in(ROOT_EXPIRY)
        for signer in old_signers[: old_role.threshold] + new_signers:
            new.sign(signer, append=True)
        payload = CanonicalJSONSerializer().serialize(new.signed)
        old.signed.verify_delegate("root", payload, new.signatures)  # what a device checks
        new.signed.verify_delegate("root", payload, new.signatures)
        repo.store.write({f"{new.signed.version}.root.json": to_bytes(new)}, None)
        if fresh:
            for scratch in fresh:  # the platform signs with these from now on
                os.replace(scratch, scratch.with_name(scratch.name.removeprefix(".new-")))
            fsync_dir(online_dir(data_dir))
            repo.commit({}, resign_snapshot=True)
    for signer in old_signers:  # retired: worthless to keep, dangerous to leak
        _root_key_file(keys_dir, public_key(signer)).unlink(missing_ok=True)
    return new


def _new_online_keys(data_dir: Path, root: Root) -> list[Path]:
    """New snapshot and timestamp keys, put into `root` and kept aside as `.new-<role>.pem`."""
    made = []
    for role in ("snapshot", "timestamp"):
        scratch = online_dir(data_dir) / f".new-{role}.pem"
        scratch.unlink(missing_ok=True)  # left by an interrupted rotation: never used
        signer = new_key(scratch)
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(public_key(signer), role)
        made.append(scratch)
    return made


def _change_targets(
    data_dir: Path, keys_dir: Path | None, edit: Callable[[Delegations], None]
) -> Metadata[Targets]:
    """Apply `edit` to the top-level delegations, re-sign targets offline, commit."""
    signer = load_signer((keys_dir or offline_dir(data_dir)) / "targets.pem")
    repo = TufRepository(data_dir)
    repo.store.require()
    with repo.store.lock():
        md = repo.store.role("targets", repo.store.snapshot())
        assert md is not None
        delegations = md.signed.delegations or Delegations(keys={}, roles={})
        edit(delegations)
        md.signed.delegations = delegations
        md.signed.version += 1
        md.signed.expires = utc_in(TARGETS_EXPIRY)
        md.signatures.clear()
        md.sign(signer)
        repo.commit({"targets": md})
    return md


def add_publisher(
    data_dir: Path, public_pem: Path, functions: Sequence[str], *, keys_dir: Path | None = None
) -> str:
    """Delegate `fn/*` for each function to the publisher key; a known key gains functions.

    A function belongs to one publisher: delegating one another publisher owns is refused
    (revoke that one first), so which key may sign a function is never ambiguous.
    """
    key = load_public_pem(public_pem)
    name = role_name(key)
    bad = [f for f in functions if not NAME_RE.match(f)]
    if bad or not functions:
        raise TufError(
            f"--functions: not function names: {bad or '(none)'}", code="tuf_bad_functions"
        )

    def edit(delegations: Delegations) -> None:
        roles = delegations.roles if delegations.roles is not None else {}
        wanted = {f"{f}/*" for f in functions}
        for other in roles.values():
            taken = wanted & set(other.paths or ()) if other.name != name else set()
            if taken:
                raise PublishRefused(
                    f"{', '.join(sorted(p[:-2] for p in taken))} already delegated to "
                    f"{other.name}: revoke it first",
                    code="tuf_function_owned",
                )
        current = roles.get(name)
        paths = sorted(wanted | set(current.paths or ()) if current else wanted)
        delegations.keys[key.keyid] = key
        roles[name] = DelegatedRole(name, [key.keyid], 1, True, paths=paths)
        delegations.roles = roles

    _change_targets(data_dir, keys_dir, edit)
    return name


def revoke_publisher(
    data_dir: Path,
    *,
    public_pem: Path | None = None,
    role: str | None = None,
    keys_dir: Path | None = None,
) -> str:
    """Remove a publisher's delegation (and its key). Its role file stays listed in snapshot at
    its last version -- TUF clients refuse a snapshot that drops a file -- but nothing delegates
    to it any more, so no client looks at it and its targets are gone."""
    if public_pem is not None:
        role = role_name(load_public_pem(public_pem))
    if not role:
        raise TufError("say which publisher: --key PUB.pem or --role NAME", code="tuf_bad_request")
    name = role

    def edit(delegations: Delegations) -> None:
        roles = delegations.roles or {}
        gone = roles.pop(name, None)
        if gone is None:
            raise TufError(f"{name} is not a delegated publisher", code="tuf_unknown_publisher")
        still = {k for r in roles.values() for k in r.keyids}
        for keyid in gone.keyids:
            if keyid not in still:
                delegations.keys.pop(keyid, None)
        delegations.roles = roles

    _change_targets(data_dir, keys_dir, edit)
    return name

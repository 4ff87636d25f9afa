"""TUF repository keys and time: threshold-2 root rotated 1->2->3 and walked by ngclient,
offline keys moved away, the timestamp re-signed by the platform, concurrent publishes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.platform.tuf.repository import TufRepository
from tests.registry_helpers import _env, cli, ok, platform_running
from tests.tuf_repo_helpers import bundle, fetch_verified, new_key, refused, root_v1, updater


def _root(data: Path, version: int) -> dict[str, object]:
    doc: dict[str, object] = json.loads(
        (data / "tuf" / "metadata" / f"{version}.root.json").read_text()
    )
    return doc


def test_threshold_two_rotated_twice_is_walked_from_version_one(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    ok(cli("tuf", "init", "--data-dir", data, "--threshold", "2"))
    offline = data / "tuf" / "offline-keys"
    v1_keys = sorted(offline.glob("root-*.pem"))
    assert len(v1_keys) == 2
    signed = _root(data, 1)["signed"]
    assert signed["roles"]["root"]["threshold"] == 2  # type: ignore[index]
    # One of the two root keys is not enough to rotate; nothing is written.
    aside = tmp_path / "aside"
    aside.mkdir()
    shutil.move(str(v1_keys[0]), aside / v1_keys[0].name)
    refused(cli("tuf", "rotate-root", "--data-dir", data), "tuf_threshold_not_met")
    assert not (data / "tuf" / "metadata" / "2.root.json").exists()
    shutil.move(str(aside / v1_keys[0].name), v1_keys[0])
    ok(cli("tuf", "rotate-root", "--data-dir", data))
    ok(cli("tuf", "rotate-root", "--data-dir", data))
    v3_keys = sorted(offline.glob("root-*.pem"))
    assert len(v3_keys) == 2 and not set(v3_keys) & set(v1_keys)  # old keys deleted
    for version in (2, 3):
        doc = _root(data, version)
        assert len(doc["signatures"]) == 4  # type: ignore[arg-type]  # two old, two new
        assert doc["signed"]["version"] == version  # type: ignore[index]
    with platform_running(data, "--no-mqtt") as p:
        dev = tmp_path / "dev"
        up = updater(p, dev, root_v1(data))
        up.refresh()
        cached = json.loads((dev / "metadata" / "root.json").read_text())
        assert cached["signed"]["version"] == 3


def test_offline_keys_moved_away_are_needed_and_found(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    ok(cli("tuf", "init", "--data-dir", data))
    key = new_key(tmp_path, "alice")
    vault = tmp_path / "vault"
    shutil.move(str(data / "tuf" / "offline-keys"), vault)  # what the operator is told to do
    add = ["tuf", "add-publisher", "--data-dir", data, "--key", f"{key}.pub", "--functions", "a"]
    refused(cli(*add), "tuf_key_missing")
    ok(cli(*add, "--offline-keys", vault))
    refused(cli("tuf", "rotate-root", "--data-dir", data), "tuf_threshold_not_met")
    ok(cli("tuf", "rotate-root", "--data-dir", data, "--offline-keys", vault, "--threshold", "3"))
    assert _root(data, 2)["signed"]["roles"]["root"]["threshold"] == 3  # type: ignore[index]
    assert len(list(vault.glob("root-*.pem"))) == 3


def test_forced_resign_moves_the_timestamp(tmp_path: Path) -> None:
    ok(cli("tuf", "init", "--data-dir", tmp_path))
    repo = TufRepository(tmp_path)
    before = repo.store.timestamp().signed
    assert repo.refresh_expiry() is False  # fresh: nothing to do
    assert repo.refresh_expiry(force=True) is True
    after = repo.store.timestamp().signed
    assert after.version == before.version + 1
    assert after.snapshot_meta.version == before.snapshot_meta.version  # snapshot not due


@pytest.mark.slow
def test_platform_resigns_the_timestamp_before_it_expires(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    ok(cli("tuf", "init", "--data-dir", data))
    with platform_running(data, "--no-mqtt", "--tuf-timestamp-expiry", "4") as p:
        seen: list[tuple[int, dt.datetime]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ts = TufRepository(data).store.timestamp().signed
            if not seen or ts.version != seen[-1][0]:
                seen.append((ts.version, ts.expires))
            # Two re-signings: the first shortens the day-long init timestamp to 4 s, the
            # second moves the expiry forward.
            if len(seen) >= 3 and seen[-1][1] > seen[-2][1]:
                break
            time.sleep(0.1)
        assert len(seen) >= 3 and seen[-1][1] > seen[-2][1], seen
        assert [v for v, _ in seen] == sorted(v for v, _ in seen)
        limit = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
        assert seen[-1][1] <= limit  # signed for the configured 4 s, not a day
        updater(p, tmp_path / "dev", root_v1(data)).refresh()  # and it verifies


def _consistent(data: Path) -> None:
    """Every snapshot ever written names files that exist with its lengths and hashes; the
    timestamp names an existing snapshot."""
    meta = data / "tuf" / "metadata"
    ts = json.loads((meta / "timestamp.json").read_text())["signed"]
    assert (meta / f"{ts['meta']['snapshot.json']['version']}.snapshot.json").exists()
    for snap_file in meta.glob("*.snapshot.json"):
        snap = json.loads(snap_file.read_text())["signed"]
        for name, info in snap["meta"].items():
            f = meta / f"{info['version']}.{name}"
            assert f.exists(), f"{snap_file.name} names missing {f.name}"
            body = f.read_bytes()
            assert len(body) == info["length"]
            assert hashlib.sha256(body).hexdigest() == info["hashes"]["sha256"]
    assert not list(meta.glob(".*.tmp"))  # no half-written file left


@pytest.mark.slow
def test_concurrent_publishes_leave_consistent_metadata(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    ok(cli("tuf", "init", "--data-dir", data))
    alice, bob, carol = (new_key(tmp_path, n) for n in ("alice", "bob", "carol"))
    add = ["tuf", "add-publisher", "--data-dir", data, "--key"]
    ok(cli(*add, f"{alice}.pub", "--functions", "a,b"))
    ok(cli(*add, f"{bob}.pub", "--functions", "c"))
    jobs = [(alice, "a", "1.0.0"), (alice, "b", "1.0.0"), (bob, "c", "1.0.0"), (bob, "c", "2.0.0")]
    files = [bundle(tmp_path / "b", k, n, v) for k, n, v in jobs]
    with platform_running(data, "--no-mqtt") as p:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cloud_sync.platform.cli",
                    "fn",
                    "publish",
                    str(f),
                    "--platform",
                    p.url,
                    "--token",
                    p.token,
                    "--key",
                    str(k),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            for f, (k, _, _) in zip(files, jobs, strict=True)
        ]
        # An offline change at the same time: the same lock serialises it with the publishes.
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cloud_sync.platform.cli",
                    *add,
                    f"{carol}.pub",
                    "--functions",
                    "d",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            )
        )
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{out}\n{err}"
        _consistent(data)
        up = updater(p, tmp_path / "dev", root_v1(data))
        for f, (_, name, version) in zip(files, jobs, strict=True):
            fetch_verified(up, name, version, f)
        snap = TufRepository(data).store.snapshot()
        versions = {k: m.version for k, m in snap.signed.meta.items()}
        assert versions[next(k for k in versions if k.startswith("publisher-"))] >= 1
        targets = TufRepository(data).store.role("targets", snap)
        assert targets is not None and targets.signed.delegations is not None
        assert len(targets.signed.delegations.roles or {}) == 3


def test_commit_after_an_interrupted_one_overwrites_its_orphans(tmp_path: Path) -> None:
    """A crash after the new versioned files but before the timestamp leaves files no snapshot
    names; the next publish writes the same version numbers over them and all verifies."""
    from securesystemslib.signer import CryptoSigner, SSlibKey

    from cloud_sync.platform.tuf import claim as claims
    from cloud_sync.platform.tuf.keys import load_public_pem, role_name
    from runtimes.signing import key_id, load_private_key

    ok(cli("tuf", "init", "--data-dir", tmp_path))
    key_file = new_key(tmp_path, "alice")
    ok(cli("tuf", "add-publisher", "--data-dir", tmp_path, "--key", f"{key_file}.pub",
           "--functions", "lamp"))  # fmt: skip
    repo = TufRepository(tmp_path)
    meta = repo.store.dir
    snap_version = repo.store.snapshot().signed.version
    (meta / "1.publisher-x.json").write_bytes(b"{}")  # not a role anyone delegates
    role = role_name(load_public_pem(Path(f"{key_file}.pub")))
    orphans = [f"1.{role}.json", f"{snap_version + 1}.snapshot.json"]
    for name in orphans:
        (meta / name).write_bytes(b"half-written by a process that was killed")
    private = load_private_key(key_file)
    signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
    sha = hashlib.sha256(b"bundle").hexdigest()
    md = claims.next_role(
        None, "lamp/1.0.0.edgefn", 6, sha, version=1, expires=claims.utc_in(claims.ROLE_EXPIRY)
    )
    claim = claims.sign(md, role, signer)
    stored: list[bool] = []
    repo.publish(
        name="lamp",
        version="1.0.0",
        sha256=sha,
        length=6,
        publisher=key_id(private),
        claim=claim,
        store=lambda: stored.append(True) or True,
    )
    assert stored == [True]
    _consistent(tmp_path)
    got = repo.store.role(role, repo.store.snapshot())
    assert got is not None and "lamp/1.0.0.edgefn" in got.signed.targets


@pytest.mark.slow
def test_rotating_the_online_keys_keeps_devices_updating(tmp_path: Path) -> None:
    from tests.tuf_repo_helpers import tuf_publish

    data = tmp_path / "cloud"
    ok(cli("tuf", "init", "--data-dir", data))
    key = new_key(tmp_path, "alice")
    ok(cli("tuf", "add-publisher", "--data-dir", data, "--key", f"{key}.pub",
           "--functions", "lamp"))  # fmt: skip
    online = data / "tuf" / "online-keys"
    before = {p.name: p.read_bytes() for p in online.iterdir()}
    with platform_running(data, "--no-mqtt") as p:
        b1 = bundle(tmp_path, key, "lamp", "1.0.0")
        tuf_publish(p, b1, key)
        dev = tmp_path / "dev"
        fetch_verified(updater(p, dev, root_v1(data)), "lamp", "1.0.0", b1)  # trusts v1 keys
        ok(cli("tuf", "rotate-root", "--data-dir", data, "--online"))
        after = {p.name: p.read_bytes() for p in online.iterdir()}
        assert sorted(after) == ["snapshot.pem", "timestamp.pem"]  # no scratch file left
        assert all(after[n] != before[n] for n in after)
        r1, r2 = (_root(data, v)["signed"]["roles"] for v in (1, 2))  # type: ignore[index]
        for role in ("snapshot", "timestamp"):
            assert r1[role]["keyids"] != r2[role]["keyids"]  # type: ignore[index]
        b2 = bundle(tmp_path, key, "lamp", "1.1.0")
        tuf_publish(p, b2, key)  # the platform signs with the new keys at once
        again = updater(p, dev, None)  # cached v1 root, timestamp and snapshot signed by old keys
        fetch_verified(again, "lamp", "1.1.0", b2)
        assert json.loads((dev / "metadata" / "root.json").read_text())["signed"]["version"] == 2

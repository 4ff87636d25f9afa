"""The registry's TUF repository through the real CLI and platform, checked by python-tuf's
own client (`tuf.ngclient.Updater`): if ngclient accepts the chain, the layout is the spec's."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.platform.tuf import claim as claims
from cloud_sync.platform.tuf.keys import role_name
from tests.harness import http
from tests.registry_helpers import Platform, cli, ok, platform_running
from tests.tuf_repo_helpers import (
    bundle,
    fetch_verified,
    get_json,
    new_key,
    refused,
    root_v1,
    tuf_publish,
    updater,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    return {name: new_key(d, name) for name in ("alice", "bob", "mallory")}


@pytest.fixture(scope="module")
def tuf_platform(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]
) -> Iterator[Platform]:
    """A platform whose data dir got `tuf init`; alice owns echo and lamp, bob owns horn."""
    data = tmp_path_factory.mktemp("cloud")
    ok(cli("tuf", "init", "--data-dir", data))
    ok(cli("tuf", "add-publisher", "--data-dir", data, "--key", f"{keys['alice']}.pub",
           "--functions", "echo,lamp"))  # fmt: skip
    ok(cli("tuf", "add-publisher", "--data-dir", data, "--key", f"{keys['bob']}.pub",
           "--functions", "horn"))  # fmt: skip
    with platform_running(data, "--no-mqtt") as p:
        yield p


def test_init_makes_private_key_dirs_and_refuses_twice(tmp_path: Path) -> None:
    proc = cli("tuf", "init", "--data-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "offline-keys" in proc.stderr and "WARNING" in proc.stderr  # move them offline
    tuf = tmp_path / "tuf"
    for d in ("offline-keys", "online-keys"):
        assert stat.S_IMODE((tuf / d).stat().st_mode) == 0o700
        for key in (tuf / d).iterdir():
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert sorted(p.name for p in (tuf / "online-keys").iterdir()) == [
        "snapshot.pem",
        "timestamp.pem",
    ]
    names = sorted(p.name for p in (tuf / "metadata").iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
    root = json.loads((tuf / "metadata" / "1.root.json").read_text())["signed"]
    assert root["consistent_snapshot"] is True
    before = (tuf / "metadata" / "1.root.json").read_bytes()
    refused(cli("tuf", "init", "--data-dir", tmp_path), "tuf_already_initialised")
    ok(cli("tuf", "init", "--data-dir", tmp_path, "--exist-ok"))  # the demo's second run
    assert (tuf / "metadata" / "1.root.json").read_bytes() == before


def test_publish_is_verified_by_ngclient(
    tuf_platform: Platform, keys: dict[str, Path], tmp_path: Path
) -> None:
    b = bundle(tmp_path, keys["alice"], "echo", "1.0.0")
    out = tuf_publish(tuf_platform, b, keys["alice"])
    assert "published: echo@1.0.0" in out
    up = updater(tuf_platform, tmp_path / "dev", root_v1(tuf_platform.data_dir))
    fetch_verified(up, "echo", "1.0.0", b)
    # The consistent-snapshot URL ngclient used, and the bundle URL, serve the same bytes.
    digest = hashlib.sha256(b.read_bytes()).hexdigest()
    target = http("GET", f"{tuf_platform.url}/v1/tuf/targets/echo/{digest}.1.0.0.edgefn")
    assert target.status == 200 and target.body == b.read_bytes()
    assert (
        http("GET", f"{tuf_platform.url}/v1/tuf/targets/echo/{'0' * 64}.1.0.0.edgefn").status == 404
    )
    # Publishing the same bytes again is a no-op for the registry and for TUF.
    ts = get_json(f"{tuf_platform.url}/v1/tuf/timestamp.json")[1]
    assert "already published" in tuf_publish(tuf_platform, b, keys["alice"])
    assert get_json(f"{tuf_platform.url}/v1/tuf/timestamp.json")[1] == ts


def test_metadata_layout_and_unknown_versions(tuf_platform: Platform) -> None:
    status, ts = get_json(f"{tuf_platform.url}/v1/tuf/timestamp.json")
    assert status == 200
    snap_version = ts["signed"]["meta"]["snapshot.json"]["version"]  # type: ignore[index]
    status, snap = get_json(f"{tuf_platform.url}/v1/tuf/{snap_version}.snapshot.json")
    assert status == 200 and "targets.json" in snap["signed"]["meta"]  # type: ignore[index]
    assert get_json(f"{tuf_platform.url}/v1/tuf/1.root.json")[0] == 200
    for missing in ("99.root.json", "99.snapshot.json", "0.targets.json", "root.json", "x.json"):
        status, body = get_json(f"{tuf_platform.url}/v1/tuf/{missing}")
        assert status == 404, missing
        assert body["error"]["code"] == "not_found"  # type: ignore[index]


def test_refusals_have_stable_codes_and_store_nothing(
    tuf_platform: Platform, keys: dict[str, Path], tmp_path: Path
) -> None:
    url, token = tuf_platform.url, tuf_platform.token
    base = ["fn", "publish", "--platform", url, "--token", token]
    # alice does not own horn (bob does).
    foreign = bundle(tmp_path, keys["alice"], "horn", "1.0.0")
    line = refused(cli(*base, foreign, "--key", keys["alice"]), "tuf_not_delegated")
    assert "horn" in line
    # mallory was never added.
    stranger = bundle(tmp_path, keys["mallory"], "echo", "9.0.0")
    refused(cli(*base, stranger, "--key", keys["mallory"]), "tuf_unknown_publisher")
    # No key at all on a TUF registry.
    refused(cli(*base, bundle(tmp_path, keys["alice"], "lamp", "1.0.0")), "tuf_signature_required")
    # A bundle signed by mallory, the role signed by alice: the keys must be the same.
    refused(cli(*base, stranger, "--key", keys["alice"]), "tuf_publisher_mismatch")
    for name in ("horn", "lamp"):
        assert http("GET", f"{url}/v1/registry/functions/{name}").status == 404


def test_signature_over_other_bytes_is_refused(
    tuf_platform: Platform, keys: dict[str, Path], tmp_path: Path
) -> None:
    """A claim signed for one bundle cannot carry another: the registry rebuilds the role from
    the bytes it received, and the signature does not verify."""
    from cloud_sync.http_client import Endpoint, SyncHttpClient
    from cloud_sync.platform.tuf.publisher import make_claim
    from runtimes.signing import load_private_key

    client = SyncHttpClient(Endpoint(tuf_platform.url, timeout_s=10))
    signed_for = bundle(tmp_path, keys["alice"], "lamp", "2.0.0", b"exports.a = 1;\n")
    sent = bundle(tmp_path / "x", keys["alice"], "lamp", "2.0.0", b"exports.b = 2;\n")
    claim = make_claim(client, load_private_key(keys["alice"]), signed_for)
    headers = {"Authorization": f"Bearer {tuf_platform.token}", **claim.headers()}
    resp = http("POST", f"{tuf_platform.url}/v1/registry/bundles", sent.read_bytes(), headers)
    assert resp.status == 403 and resp.json()["error"]["code"] == "tuf_bad_signature"
    bad = dict(headers, **{claims.HEADER_VERSION: "x"})
    resp = http("POST", f"{tuf_platform.url}/v1/registry/bundles", sent.read_bytes(), bad)
    assert resp.status == 400 and resp.json()["error"]["code"] == "tuf_bad_claim"
    assert (
        http("GET", f"{tuf_platform.url}/v1/registry/functions/lamp/versions/2.0.0").status == 404
    )


def test_enroll_writes_the_pinned_root(tuf_platform: Platform, tmp_path: Path) -> None:
    creds = tmp_path / "dev.json"
    ok(cli("device", "enroll", "dev-tuf-1", "--out", creds, "--data-dir", tuf_platform.data_dir,
           "--platform", tuf_platform.url))  # fmt: skip
    doc = json.loads(creds.read_text())
    newest = sorted((tuf_platform.data_dir / "tuf" / "metadata").glob("*.root.json"))[-1]
    assert doc["tuf_root"] == json.loads(newest.read_bytes())
    # The pinned root is a working trust anchor.
    up = updater(tuf_platform, tmp_path / "dev", json.dumps(doc["tuf_root"]).encode())
    up.refresh()


def test_platform_without_tuf_keeps_working(tmp_path: Path, keys: dict[str, Path]) -> None:
    with platform_running(tmp_path / "cloud", "--no-mqtt") as p:
        status, body = get_json(f"{p.url}/v1/tuf/timestamp.json")
        assert status == 404 and body["error"]["code"] == "tuf_not_initialised"  # type: ignore[index]
        b = bundle(tmp_path, keys["alice"], "echo", "1.0.0")
        assert "published" in tuf_publish(p, b, keys["alice"])  # --key is harmless here
        creds = tmp_path / "dev.json"
        ok(cli("device", "enroll", "dev-plain", "--out", creds, "--platform", p.url,
               "--token", p.token))  # fmt: skip
        assert "tuf_root" not in json.loads(creds.read_text())


def test_revoke_publisher_removes_its_targets(tmp_path: Path, keys: dict[str, Path]) -> None:
    data = tmp_path / "cloud"
    ok(cli("tuf", "init", "--data-dir", data))
    bob_pub = f"{keys['bob']}.pub"
    ok(cli("tuf", "add-publisher", "--data-dir", data, "--key", bob_pub, "--functions", "horn"))
    with platform_running(data, "--no-mqtt") as p:
        b1 = bundle(tmp_path, keys["bob"], "horn", "1.0.0")
        tuf_publish(p, b1, keys["bob"])
        dev = tmp_path / "dev"
        up = updater(p, dev, root_v1(data))
        fetch_verified(up, "horn", "1.0.0", b1)
        proc = ok(cli("tuf", "revoke-publisher", "--data-dir", data, "--key", bob_pub))
        assert role_name_of(keys["bob"]) in proc
        # The device that trusted bob's role refreshes fine (the snapshot still lists the role
        # file at its last version) and no longer finds bob's target.
        again = updater(p, dev, None)
        again.refresh()
        assert again.get_targetinfo("horn/1.0.0.edgefn") is None
        b2 = bundle(tmp_path, keys["bob"], "horn", "1.1.0")
        refused(
            cli("fn", "publish", b2, "--platform", p.url, "--token", p.token, "--key", keys["bob"]),
            "tuf_unknown_publisher",
        )
        refused(cli("tuf", "revoke-publisher", "--data-dir", data, "--key", bob_pub),
                "tuf_unknown_publisher")  # fmt: skip


def role_name_of(key: Path) -> str:
    from cloud_sync.platform.tuf.keys import load_public_pem

    return role_name(load_public_pem(Path(f"{key}.pub")))


def test_add_publisher_refuses_a_function_another_owns(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    ok(cli("tuf", "init", "--data-dir", tmp_path))
    add = ["tuf", "add-publisher", "--data-dir", tmp_path, "--key"]
    ok(cli(*add, f"{keys['alice']}.pub", "--functions", "echo"))
    refused(cli(*add, f"{keys['bob']}.pub", "--functions", "lamp,echo"), "tuf_function_owned")
    ok(cli(*add, f"{keys['alice']}.pub", "--functions", "lamp"))  # alice gains lamp
    status = json.loads(ok(cli("tuf", "status", "--data-dir", tmp_path, "--json")))
    assert status[role_name_of(keys["alice"])]["functions"] == ["echo", "lamp"]
    refused(cli(*add, f"{keys['bob']}.pub", "--functions", "Bad Name"), "tuf_bad_functions")

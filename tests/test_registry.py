"""The registry on loopback: `edge-cloud serve` as a subprocess, real bundles, real HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.platform.registry import parse_range
from cloud_sync.registry_client import DigestMismatch, RegistryClient
from runtimes.bundle import read_bundle
from tests.harness import http
from tests.registry_helpers import (
    Entry,
    Platform,
    build,
    cli,
    craft_bundle,
    ok,
    platform_running,
    publish,
    set_version,
    start_platform,
    tar_gz,
    write_outer,
)

ECHO = {"name": "echo", "version": "0.1.0", "runtime": "node", "entry": "handler.js"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    ok(cli("keys", "create", "--out", d / "publisher.key"))
    ok(cli("keys", "create", "--out", d / "other.key"))
    return {"publisher": d / "publisher.key", "other": d / "other.key"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    ok(cli("fn", "new", "echo", "--runtime", "node", "--dir", d / "echo"))
    (d / "echo" / "blob.bin").write_bytes(os.urandom(128 * 1024))  # incompressible: a big bundle
    out = {"v1": build(d / "echo", keys["publisher"], d / "echo-0.1.0.efb")}
    # Same name and version, other bytes: a conflict for the registry.
    (d / "echo" / "handler.js").write_text("exports.handler = async (e) => e; // changed\n")
    out["v1b"] = build(d / "echo", keys["publisher"], d / "echo-0.1.0-b.efb")
    set_version(d / "echo", "0.2.0")
    out["v2"] = build(d / "echo", keys["publisher"], d / "echo-0.2.0.efb")
    return out


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with platform_running(tmp_path_factory.mktemp("cloud")) as p:
        yield p


def post(platform: Platform, body: bytes, token: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/vnd.edgefn.bundle"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = http("POST", f"{platform.url}/v1/registry/bundles", body, headers)
    return resp.status, resp.json()


def test_token_file_is_private_and_kept_across_restarts(tmp_path: Path) -> None:
    with platform_running(tmp_path) as p:
        token = p.token
        assert stat.S_IMODE((tmp_path / "admin.token").stat().st_mode) == 0o600
        assert len(token) >= 40
        state = json.loads((tmp_path / "platform.json").read_text())
        assert state == {"url": p.url, "pid": p.proc.pid}
    assert not (tmp_path / "platform.json").exists()  # removed on clean shutdown
    with platform_running(tmp_path) as p:
        assert p.token == token


def test_publish_needs_the_operator_token(platform: Platform, bundles: dict[str, Path]) -> None:
    body = bundles["v1"].read_bytes()
    status, doc = post(platform, body, None)
    assert status == 401 and doc["error"]["code"] == "unauthorized"  # type: ignore[index]
    resp = http("POST", f"{platform.url}/v1/registry/bundles", body, {})
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    status, doc = post(platform, body, "not-the-token")
    assert status == 403 and doc["error"]["code"] == "forbidden"  # type: ignore[index]
    status, doc = post(platform, body, platform.token)
    assert status in (200, 201)
    assert doc["digest"] == "sha256:" + hashlib.sha256(body).hexdigest()


def test_publish_cli_without_token_says_how_to_get_one(
    platform: Platform, bundles: dict[str, Path]
) -> None:
    proc = cli("fn", "publish", bundles["v1"], "--platform", platform.url)
    assert proc.returncode == 2 and "EDGEFN_TOKEN" in proc.stderr
    proc = cli("fn", "publish", bundles["v1"], "--platform", platform.url, "--token", "nope")
    assert proc.returncode == 1 and "HTTP 403" in proc.stderr
    ok(
        cli(
            "fn",
            "publish",
            bundles["v1"],
            "--platform",
            platform.url,
            "--data-dir",
            platform.data_dir,
        )
    )
    proc = cli(
        "fn",
        "publish",
        bundles["v1"],
        "--platform",
        platform.url,
        env={"EDGEFN_TOKEN": platform.token},
    )
    assert "already published" in ok(proc)


def test_same_version_other_bytes_is_a_conflict(
    platform: Platform, bundles: dict[str, Path]
) -> None:
    publish(platform, bundles["v1"])
    status, doc = post(platform, bundles["v1b"].read_bytes(), platform.token)
    assert status == 409
    assert doc["error"]["code"] == "version_conflict"  # type: ignore[index]
    # The original stays what devices get.
    info = http("GET", f"{platform.url}/v1/registry/functions/echo/versions/0.1.0").json()
    assert info["digest"] == "sha256:" + hashlib.sha256(bundles["v1"].read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("what", "code"),
    [
        ("garbage", "malformed_bundle"),
        ("no_signature", "missing_signature"),
        ("empty_signatures", "missing_signature"),
        ("tampered_payload", "digest_mismatch"),
    ],
)
def test_invalid_bundles_are_422_with_the_reason(
    platform: Platform,
    bundles: dict[str, Path],
    keys: dict[str, Path],
    tmp_path: Path,
    what: str,
    code: str,
) -> None:
    good = bundles["v1"].read_bytes()
    raw = read_bundle(bundles["v1"])
    if what == "garbage":
        body = b"this is not a bundle" * 100
    elif what == "no_signature":
        members = [("manifest.json", raw.manifest_bytes)]
        members += [(n, good[m.offset : m.offset + m.size]) for n, m in raw.members.items()]
        body = write_outer(tmp_path / "b.efb", members).read_bytes()
    elif what == "empty_signatures":
        payload = tar_gz([Entry("handler.js", b"exports.handler = async (e) => e;\n")])
        body = craft_bundle(
            tmp_path / "b.efb", keys["publisher"], ECHO, payload, signatures=b'{"signatures":[]}'
        ).read_bytes()
    else:
        member = raw.members["common.tar.gz"]
        data = bytearray(good)
        data[member.offset + member.size // 2] ^= 0xFF
        body = bytes(data)
    status, doc = post(platform, body, platform.token)
    assert status == 422, doc
    assert doc["error"]["code"] == code  # type: ignore[index]
    assert doc["error"]["message"]  # type: ignore[index]


def test_oversized_upload_is_413(tmp_path: Path, bundles: dict[str, Path]) -> None:
    with platform_running(tmp_path, "--max-bundle-bytes", "4096") as p:
        status, doc = post(p, bundles["v1"].read_bytes(), p.token)
        assert status == 413 and doc["error"]["code"] == "too_large"  # type: ignore[index]
        assert not list((tmp_path / "blobs" / "uploads").iterdir())  # spool removed


def test_publishers_dir_refuses_unknown_signers(
    tmp_path: Path, keys: dict[str, Path], bundles: dict[str, Path]
) -> None:
    (tmp_path / "publishers").mkdir()
    (tmp_path / "publishers" / "p.pub").write_bytes(Path(str(keys["other"]) + ".pub").read_bytes())
    with platform_running(tmp_path) as p:
        status, doc = post(p, bundles["v1"].read_bytes(), p.token)
        assert status == 422 and doc["error"]["code"] == "unknown_signer"  # type: ignore[index]


def test_list_functions_and_versions(platform: Platform, bundles: dict[str, Path]) -> None:
    publish(platform, bundles["v1"])
    publish(platform, bundles["v2"])
    fns = http("GET", f"{platform.url}/v1/registry/functions").json()["functions"]
    assert {"name": "echo", "latest": "0.2.0", "versions": 2} in fns
    doc = http("GET", f"{platform.url}/v1/registry/functions/echo").json()
    assert [v["version"] for v in doc["versions"]] == ["0.1.0", "0.2.0"]
    assert doc["latest"] == "0.2.0"
    v = doc["versions"][1]
    assert (
        v["runtime"] == "node" and v["arches"] == [] and v["size"] == bundles["v2"].stat().st_size
    )
    assert http("GET", f"{platform.url}/v1/registry/functions/nope").status == 404
    assert http("GET", f"{platform.url}/v1/registry/functions/echo/versions/9.9.9").status == 404
    assert http("GET", f"{platform.url}/v1/registry/functions/echo/versions/x").status == 400


def test_bundle_download_with_ranges(platform: Platform, bundles: dict[str, Path]) -> None:
    publish(platform, bundles["v1"])
    body = bundles["v1"].read_bytes()
    size = len(body)
    url = f"{platform.url}/v1/registry/bundles/sha256:{hashlib.sha256(body).hexdigest()}"
    full = http("GET", url)
    assert full.status == 200 and full.body == body
    assert full.headers["Accept-Ranges"] == "bytes"
    part = http("GET", url, headers={"Range": "bytes=100-1099"})
    assert part.status == 206 and part.body == body[100:1100]
    assert part.headers["Content-Range"] == f"bytes 100-1099/{size}"
    tail = http("GET", url, headers={"Range": "bytes=5000-"})
    assert tail.status == 206 and tail.body == body[5000:]
    suffix = http("GET", url, headers={"Range": "bytes=-10"})
    assert suffix.status == 206 and suffix.body == body[-10:]
    for bad in (f"bytes={size}-", "bytes=20-10", "bytes=1-2,5-6", "bytes=abc"):
        resp = http("GET", url, headers={"Range": bad})
        assert resp.status == 416, bad
        assert resp.headers["Content-Range"] == f"bytes */{size}"
    head = http("HEAD", url)
    assert head.status == 200 and head.body == b"" and head.headers["Content-Length"] == str(size)
    assert http("GET", f"{platform.url}/v1/registry/bundles/sha256:{'0' * 64}").status == 404
    assert http("GET", f"{platform.url}/v1/registry/bundles/../../etc/passwd").status in (400, 404)


def test_parse_range_edge_cases() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("items=1-2", 10) is None  # other units are ignored
    assert parse_range("bytes=0-", 10) == (0, 9)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-100", 10) == (0, 9)


def test_client_resumes_a_partial_download(
    platform: Platform, bundles: dict[str, Path], tmp_path: Path
) -> None:
    publish(platform, bundles["v1"])
    body = bundles["v1"].read_bytes()
    client = RegistryClient(platform.url)
    info = client.resolve("echo", "0.1.0")
    part = tmp_path / "echo.part"
    part.write_bytes(body[:70_000])
    before = len(platform.lines)
    client.download(info, part, max_bytes=1 << 20)
    assert part.read_bytes() == body
    served = platform.wait_log("/v1/registry/bundles/", before)
    assert '" 206 ' in served[-1], served  # only the rest was sent
    # A "prefix" that is not one: the digest check catches it and drops the file.
    part.write_bytes(b"\0" * 70_000)
    with pytest.raises(DigestMismatch):
        client.download(info, part, max_bytes=1 << 20)
    assert not part.exists()


def test_raw_http_publish_with_urllib_streams_the_file(
    platform: Platform, bundles: dict[str, Path]
) -> None:
    data = bundles["v2"].read_bytes()
    req = urllib.request.Request(
        f"{platform.url}/v1/registry/bundles",
        data=data,
        headers={"Authorization": f"Bearer {platform.token}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status in (200, 201)
        assert json.loads(resp.read())["version"] == "0.2.0"


def test_start_platform_helper_reports_a_bad_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AssertionError, match="platform exited"):
        start_platform(blocker / "sub")


@pytest.mark.parametrize(
    ("entries", "code"),
    [
        ([Entry("handler.js", b"x"), Entry("../evil", b"x")], "unsafe_path"),
        (
            [Entry("handler.js", b"x"), Entry("l", type=b"2", linkname="/etc/passwd")],
            "link_in_archive",
        ),
        ([Entry("other.js", b"x")], "malformed_bundle"),  # no entry file
    ],
    ids=["dotdot", "link-out", "no-entry"],
)
def test_publish_refuses_what_no_device_would_install(
    tmp_path: Path,
    keys: dict[str, Path],
    platform: Platform,
    entries: list[Entry],
    code: str,
) -> None:
    """The device's own unpack checks run at publish, with the device's codes, so a bundle
    that every `fn install` would refuse never becomes `latest`."""
    fn = {**ECHO, "name": "hostile", "version": f"1.0.{len(entries)}{len(code)}"}
    bundle = craft_bundle(tmp_path / "b.efb", keys["publisher"], fn, tar_gz(entries))
    status, doc = post(platform, bundle.read_bytes(), platform.token)
    assert status == 422, doc
    assert doc["error"]["code"] == code  # type: ignore[index]
    assert http("GET", f"{platform.url}/v1/registry/functions/hostile").status == 404
    # Nothing of the check is left in the platform's data dir.
    assert not list(platform.data_dir.rglob("publish-check-*"))

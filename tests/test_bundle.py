"""Bundles end to end on real files: build -> verify -> unpack, and every way a bundle can be
wrong (tampered, unsigned, foreign signer, truncated, garbage, wrong arch, odd members)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtimes.bundle import (
    BundleManifest,
    build_bundle,
    canonical_json,
    check_version_order,
    compare_versions,
    manifest_to_table,
    read_bundle,
    sign_manifest,
    toml_dumps,
)
from runtimes.errors import BundleError
from runtimes.manifest import load_manifest, parse_manifest
from runtimes.signing import key_id
from runtimes.verify import Ed25519Verifier, VerifiedBundle

X86, ARM = "linux-x86_64", "linux-aarch64"
CREATED = "2026-11-27T12:00:00Z"
FIELDS: dict[str, Any] = {
    "name": "resize",
    "version": "1.4.0",
    "runtime": "go",
    "entry": "bin/handler",
    "timeout_ms": 2500,
    "pool": {"min_instances": 2, "concurrency": 8},
    "limits": {"memory_mb": 64},
    "env": {"MODE": "fast"},
    "cache": {"ttl_s": 1.5, "vary": ["accept"]},
    "routing": {"prefer": "local", "cloud_fallback": True},
    "config": {"schema": {"type": "object", "properties": {"width": {"type": "integer"}}}},
    "build": {"go_flags": ["-trimpath"]},  # build-only: not signed, not installed
}


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(key: Ed25519PrivateKey) -> Ed25519Verifier:
    return Ed25519Verifier([key.public_key()])


def write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


@pytest.fixture
def src(tmp_path: Path) -> dict[str, Path]:
    """Payload dirs as a builder would leave them: one per arch plus common files."""
    dirs = {}
    for arch in (X86, ARM):
        d = tmp_path / "src" / arch
        write(d / "bin/handler", f"ELF for {arch}".encode() * 500, 0o755)
        write(d / "edgefn.toml", b"name = 'authoring copy, not shipped'\n")
        dirs[arch] = d
    common = tmp_path / "src/common"
    write(common / "static/index.html", b"<h1>hi</h1>" * 100)
    dirs["common"] = common
    return dirs


@pytest.fixture
def bundle(tmp_path: Path, src: dict[str, Path], key: Ed25519PrivateKey) -> Path:
    return build_bundle(
        FIELDS,
        {X86: src[X86], ARM: src[ARM]},
        src["common"],
        key,
        tmp_path / "resize-1.4.0.efb",
        created_at=CREATED,
    )


@pytest.fixture
def install_root(tmp_path: Path) -> Path:
    d = tmp_path / "functions"
    d.mkdir()
    return d


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


def write_outer(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def rewrite(src: Path, dst: Path, change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> Path:
    return write_outer(dst, list(change(members(src)).items()))


def refused(verifier: Ed25519Verifier, bundle: Path | bytes, code: str) -> BundleError:
    with pytest.raises(BundleError) as exc:
        verifier.verify(bundle)
    assert exc.value.code == code, exc.value.message
    return exc.value


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip(bundle: Path, verifier: Ed25519Verifier, install_root: Path, key: Any) -> None:
    vb = verifier.verify(bundle, expect_name="resize", expect_version="1.4.0")
    assert (vb.name, vb.version, vb.arches) == ("resize", "1.4.0", (ARM, X86))
    assert vb.signers == (key_id(key),) and vb.manifest.publisher == key_id(key)
    assert vb.manifest.created_at == CREATED

    dest = install_root / "resize" / "1.4.0"
    dest.parent.mkdir()
    res = vb.unpack(X86, dest)
    assert res.path == dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "bin",
        "bin/handler",
        "edgefn.toml",
        "static",
        "static/index.html",
    ]
    assert (dest / "bin/handler").read_bytes() == f"ELF for {X86}".encode() * 500
    assert stat.S_IMODE((dest / "bin/handler").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "static/index.html").stat().st_mode) == 0o644

    # The installed edgefn.toml is generated from the signed manifest: the agent loads it and
    # gets exactly the function manifest that was signed, minus the build-only table.
    installed = load_manifest(dest / "edgefn.toml")
    expected = parse_manifest({k: v for k, v in FIELDS.items() if k != "build"})
    assert installed == expected == vb.manifest.function
    assert "build" not in installed.extra
    assert installed.extra["cache"] == {"ttl_s": 1.5, "vary": ["accept"]}


def test_verify_from_bytes_and_other_arch(
    bundle: Path, verifier: Ed25519Verifier, install_root: Path
) -> None:
    vb = verifier.verify(bundle.read_bytes())
    vb.unpack(ARM, install_root / "arm")
    assert (install_root / "arm/bin/handler").read_bytes() == f"ELF for {ARM}".encode() * 500


def test_manifest_lists_every_member_with_digest(bundle: Path) -> None:
    m = members(bundle)
    assert list(m) == [
        "manifest.json",
        "manifest.sig",
        "artifacts/linux-aarch64.tar.gz",
        "artifacts/linux-x86_64.tar.gz",
        "common.tar.gz",
    ]
    manifest = json.loads(m["manifest.json"])
    assert canonical_json(manifest) == m["manifest.json"]  # stored in canonical form
    listed = {a["file"]: a for a in [*manifest["artifacts"].values(), manifest["common"]]}
    for name, art in listed.items():
        assert art["sha256"] == hashlib.sha256(m[name]).hexdigest()
        assert art["size"] == len(m[name])
    assert manifest["function"]["name"] == "resize"
    assert "build" not in manifest["function"]


def test_signature_verifies_with_openssl(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """The documented recipe in docs/bundle-format.md, run for real."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    from runtimes.signing import public_key_to_pem

    m = members(bundle)
    sig = json.loads(m["manifest.sig"])["signatures"][0]["sig"]
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(sig))
    msg = b"edgefn-bundle-manifest-v1\x00" + hashlib.sha256(m["manifest.json"]).digest()
    (tmp_path / "msg.bin").write_bytes(msg)
    (tmp_path / "k.pub").write_bytes(public_key_to_pem(key))
    cmd = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", "k.pub", "-rawin"]
    ok = subprocess.run(
        [*cmd, "-in", "msg.bin", "-sigfile", "sig.bin"], cwd=tmp_path, capture_output=True
    )
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "msg.bin").write_bytes(msg[:-1] + bytes([msg[-1] ^ 1]))
    bad = subprocess.run(
        [*cmd, "-in", "msg.bin", "-sigfile", "sig.bin"], cwd=tmp_path, capture_output=True
    )
    assert bad.returncode != 0


def test_arch_independent_bundle(
    tmp_path: Path, src: dict[str, Path], key: Any, verifier: Ed25519Verifier, install_root: Path
) -> None:
    fields = {"name": "greet", "version": "0.1.0", "runtime": "node", "entry": "static/index.html"}
    out = build_bundle(fields, {}, src["common"], key, tmp_path / "g.efb", created_at=CREATED)
    vb = verifier.verify(out)
    assert vb.arches == ()
    vb.unpack("linux-riscv64", install_root / "g")
    assert (install_root / "g/static/index.html").exists()


# --- refusals -----------------------------------------------------------------------------------


def test_wrong_arch(bundle: Path, verifier: Ed25519Verifier, install_root: Path) -> None:
    vb = verifier.verify(bundle)
    with pytest.raises(BundleError) as exc:
        vb.unpack("linux-riscv64", install_root / "fn")
    assert exc.value.code == "wrong_arch"
    assert "linux-riscv64" in exc.value.message
    assert "linux-aarch64, linux-x86_64" in exc.value.message
    assert os.listdir(install_root) == []


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_tampered_artifact_byte(bundle: Path, verifier: Ed25519Verifier, tmp_path: Path) -> None:
    def change(m: dict[str, bytes]) -> dict[str, bytes]:
        name = "artifacts/linux-x86_64.tar.gz"
        return {**m, name: flip(m[name], len(m[name]) // 2)}

    err = refused(verifier, rewrite(bundle, tmp_path / "t.efb", change), "digest_mismatch")
    assert "artifacts/linux-x86_64.tar.gz" in err.message


def test_tampered_manifest(bundle: Path, verifier: Ed25519Verifier, tmp_path: Path) -> None:
    def change(m: dict[str, bytes]) -> dict[str, bytes]:
        text = m["manifest.json"].replace(b'"memory_mb":64', b'"memory_mb":99')
        assert text != m["manifest.json"]
        return {**m, "manifest.json": text}

    refused(verifier, rewrite(bundle, tmp_path / "t.efb", change), "bad_signature")


def test_tampered_manifest_in_place(bundle: Path, verifier: Ed25519Verifier) -> None:
    data = bytearray(bundle.read_bytes())
    at = data.index(b'"version":"1.4.0"') + len('"version":"1.4.')
    data[at] = ord("9")  # 1.4.0 -> 1.4.9, same size, tar header untouched
    refused(verifier, bytes(data), "bad_signature")


def test_signature_by_unknown_key(bundle: Path, tmp_path: Path) -> None:
    stranger = Ed25519Verifier([Ed25519PrivateKey.generate().public_key()])
    err = refused(stranger, bundle, "unknown_signer")
    assert "none of them is a trusted key" in err.message


def test_missing_signature(bundle: Path, verifier: Ed25519Verifier, tmp_path: Path) -> None:
    def drop(m: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in m.items() if k != "manifest.sig"}

    refused(verifier, rewrite(bundle, tmp_path / "nosig.efb", drop), "missing_signature")

    def empty(m: dict[str, bytes]) -> dict[str, bytes]:
        return {**m, "manifest.sig": b'{"signatures":[]}'}

    refused(verifier, rewrite(bundle, tmp_path / "empty.efb", empty), "missing_signature")


def test_signature_moved_after_payload(
    bundle: Path, verifier: Ed25519Verifier, tmp_path: Path
) -> None:
    def move(m: dict[str, bytes]) -> dict[str, bytes]:
        sig = m.pop("manifest.sig")
        return {**m, "manifest.sig": sig}

    refused(verifier, rewrite(bundle, tmp_path / "moved.efb", move), "missing_signature")


@pytest.mark.parametrize("cut", ["mid_payload", "before_end_marker", "mid_header", "mid_manifest"])
def test_truncated_bundle(bundle: Path, verifier: Ed25519Verifier, cut: str) -> None:
    data = bundle.read_bytes()
    raw = read_bundle(bundle)
    last = max(raw.members.values(), key=lambda m: m.offset)
    at = {
        "mid_payload": last.offset + last.size // 2,
        "before_end_marker": last.offset + (last.size + 511) // 512 * 512,
        "mid_header": 512 + (len(raw.manifest_bytes) + 511) // 512 * 512 + 100,
        "mid_manifest": 512 + 10,
    }[cut]
    refused(verifier, data[:at], "truncated")


@pytest.mark.parametrize("garbage", [os.urandom(4096), b"hello", bytes(100), b"\x1f\x8b" * 600])
def test_garbage_file(garbage: bytes, verifier: Ed25519Verifier, tmp_path: Path) -> None:
    f = tmp_path / "garbage.efb"
    f.write_bytes(garbage)
    refused(verifier, f, "malformed_bundle")


def test_empty_file(verifier: Ed25519Verifier, tmp_path: Path) -> None:
    f = tmp_path / "empty.efb"
    f.write_bytes(b"")
    refused(verifier, f, "malformed_bundle")


def test_oversized_bundle_refused_before_reading(bundle: Path, verifier: Ed25519Verifier) -> None:
    with pytest.raises(BundleError) as exc:
        verifier.verify(bundle, max_bytes=1024)
    assert exc.value.code == "too_large"


def test_member_not_in_manifest(bundle: Path, verifier: Ed25519Verifier, tmp_path: Path) -> None:
    def add(m: dict[str, bytes]) -> dict[str, bytes]:
        return {**m, "artifacts/linux-riscv64.tar.gz": m["artifacts/linux-x86_64.tar.gz"]}

    err = refused(verifier, rewrite(bundle, tmp_path / "extra.efb", add), "malformed_bundle")
    assert "linux-riscv64" in err.message


def test_member_missing(bundle: Path, verifier: Ed25519Verifier, tmp_path: Path) -> None:
    def drop(m: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in m.items() if k != "common.tar.gz"}

    refused(verifier, rewrite(bundle, tmp_path / "drop.efb", drop), "malformed_bundle")


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../artifacts/linux-x86_64.tar.gz", "unsafe_path"),
        ("payload.tar.gz", "malformed_bundle"),
        ("artifacts/linux-x86_64.tar.gz", "duplicate_entry"),
        ("manifest.json", "duplicate_entry"),
    ],
)
def test_unexpected_outer_member(
    bundle: Path, verifier: Ed25519Verifier, tmp_path: Path, name: str, code: str
) -> None:
    entries = [*members(bundle).items(), (name, b"x")]
    refused(verifier, write_outer(tmp_path / "odd.efb", entries), code)


def test_outer_symlink_member(bundle: Path, verifier: Ed25519Verifier, tmp_path: Path) -> None:
    out = tmp_path / "link.efb"
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members(bundle).items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        sym = tarfile.TarInfo("common.tar.gz")
        sym.type = tarfile.SYMTYPE
        sym.linkname = "/etc/passwd"
        tar.addfile(sym)
    refused(verifier, out, "link_in_archive")


def test_publisher_must_have_signed(src: dict[str, Path], tmp_path: Path, bundle: Path) -> None:
    """A trusted key re-signing a manifest that names another publisher is refused."""
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    m = members(bundle)
    manifest = json.loads(m["manifest.json"])
    manifest["publisher"] = key_id(a)
    body = canonical_json(manifest)
    forged = write_outer(
        tmp_path / "forged.efb",
        [("manifest.json", body), ("manifest.sig", sign_manifest(body, [b]))]
        + [(k, v) for k, v in m.items() if k.endswith(".tar.gz")],
    )
    refused(Ed25519Verifier([a.public_key(), b.public_key()]), forged, "bad_signature")


def test_unexpected_name_or_version(bundle: Path, verifier: Ed25519Verifier) -> None:
    with pytest.raises(BundleError) as exc:
        verifier.verify(bundle, expect_name="thumbnail")
    assert exc.value.code == "unexpected_bundle"
    with pytest.raises(BundleError) as exc:
        verifier.verify(bundle, expect_version="1.5.0")
    assert exc.value.code == "unexpected_bundle"


def test_file_changed_between_verify_and_unpack(
    bundle: Path, verifier: Ed25519Verifier, install_root: Path
) -> None:
    vb = verifier.verify(bundle)
    member = vb.raw.members["artifacts/linux-x86_64.tar.gz"]
    with bundle.open("r+b") as f:  # change the payload after verification
        # The gzip header's MTIME field: gzip itself ignores it, only the sha256 notices.
        f.seek(member.offset + 4)
        f.write(b"\x01")
    with pytest.raises(BundleError) as exc:
        vb.unpack(X86, install_root / "fn")
    assert exc.value.code == "digest_mismatch"
    assert os.listdir(install_root) == []


def test_payload_with_its_own_edgefn_toml_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, verifier: Ed25519Verifier, install_root: Path
) -> None:
    """A payload cannot override the generated edgefn.toml (even a hand-made one, still signed)."""
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("main.mjs", b"export {}"), ("edgefn.toml", b'isolation = "x"')):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    body = payload.getvalue()
    fields = {"name": "n", "version": "1.0.0", "runtime": "node", "entry": "main.mjs"}
    manifest = BundleManifest(
        function=parse_manifest(fields),
        artifacts={},
        common=None,
        created_at=CREATED,
        publisher=key_id(key),
    ).to_json()
    manifest["common"] = {
        "file": "common.tar.gz",
        "sha256": hashlib.sha256(body).hexdigest(),
        "size": len(body),
        "unpacked_size": 24,
    }
    mbytes = canonical_json(manifest)
    out = write_outer(
        tmp_path / "own.efb",
        [
            ("manifest.json", mbytes),
            ("manifest.sig", sign_manifest(mbytes, [key])),
            ("common.tar.gz", body),
        ],
    )
    vb = verifier.verify(out)
    with pytest.raises(BundleError) as exc:
        vb.unpack(X86, install_root / "n")
    assert exc.value.code == "duplicate_entry"
    assert os.listdir(install_root) == []


# --- signatures and rotation --------------------------------------------------------------------


def test_threshold_and_rotation(tmp_path: Path, src: dict[str, Path]) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    both = build_bundle(FIELDS, {X86: src[X86]}, None, [old, new], tmp_path / "b.efb")
    only_old = build_bundle(FIELDS, {X86: src[X86]}, None, old, tmp_path / "o.efb")
    # During a rotation a device that already trusts only the new key accepts both-signed bundles.
    assert Ed25519Verifier([new.public_key()]).verify(both).signers == (key_id(new),)
    two_of_two = Ed25519Verifier([old.public_key(), new.public_key()], threshold=2)
    assert len(two_of_two.verify(both).signers) == 2
    refused(two_of_two, only_old, "unknown_signer")


def test_trusted_key_with_corrupt_signature(
    bundle: Path, verifier: Ed25519Verifier, tmp_path: Path
) -> None:
    def corrupt(m: dict[str, bytes]) -> dict[str, bytes]:
        env = json.loads(m["manifest.sig"])
        raw = base64.b64decode(env["signatures"][0]["sig"])
        env["signatures"][0]["sig"] = base64.b64encode(flip(raw, 5)).decode()
        return {**m, "manifest.sig": canonical_json(env)}

    refused(verifier, rewrite(bundle, tmp_path / "c.efb", corrupt), "bad_signature")


# --- building -----------------------------------------------------------------------------------


def test_deterministic_packing(tmp_path: Path, src: dict[str, Path], key: Any) -> None:
    args = ({X86: src[X86], ARM: src[ARM]}, src["common"], key)
    first = build_bundle(FIELDS, *args, tmp_path / "one.efb", created_at=CREATED)
    # Same content, different metadata: mtimes, permission bits other than x, dir listing order.
    for p in src[X86].rglob("*"):
        os.utime(p, (1_000_000, 1_000_000))
    os.chmod(src["common"] / "static/index.html", 0o600)
    second = build_bundle(FIELDS, *args, tmp_path / "two.efb", created_at=CREATED)
    assert first.read_bytes() == second.read_bytes()
    os.chmod(src[X86] / "bin/handler", 0o644)  # the execute bit is content: it must show
    third = build_bundle(FIELDS, *args, tmp_path / "three.efb", created_at=CREATED)
    assert third.read_bytes() != first.read_bytes()


def test_source_date_epoch(
    tmp_path: Path, src: dict[str, Path], key: Any, verifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    out = build_bundle(FIELDS, {X86: src[X86]}, None, key, tmp_path / "e.efb")
    assert verifier.verify(out).manifest.created_at == "2026-01-01T00:00:00Z"


def test_builder_refuses_symlinks(tmp_path: Path, src: dict[str, Path], key: Any) -> None:
    (src[X86] / "bin/leak").symlink_to("/etc/passwd")
    with pytest.raises(BundleError) as exc:
        build_bundle(FIELDS, {X86: src[X86]}, None, key, tmp_path / "s.efb")
    assert exc.value.code == "link_in_archive"
    assert not (tmp_path / "s.efb").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".efb-build")] == []


def test_builder_refuses_what_devices_would_refuse(
    tmp_path: Path, src: dict[str, Path], key: Any
) -> None:
    # A long run of zeros ahead of real data: the ratio is fine overall but not while a device
    # inflates the start of the stream, which is where it checks.
    write(src[X86] / "a_padding.bin", bytes(8 << 20))
    write(src[X86] / "z_random.bin", os.urandom(1 << 20))
    with pytest.raises(BundleError) as exc:
        build_bundle(FIELDS, {X86: src[X86]}, None, key, tmp_path / "r.efb")
    assert exc.value.code == "compression_ratio"


def test_builder_refuses_fifo(tmp_path: Path, src: dict[str, Path], key: Any) -> None:
    os.mkfifo(src[X86] / "pipe")
    with pytest.raises(BundleError) as exc:
        build_bundle(FIELDS, {X86: src[X86]}, None, key, tmp_path / "f.efb")
    assert exc.value.code == "special_file"


def test_builder_checks_entry_and_overlaps(tmp_path: Path, src: dict[str, Path], key: Any) -> None:
    with pytest.raises(BundleError) as exc:
        build_bundle({**FIELDS, "entry": "bin/nope"}, {X86: src[X86]}, None, key, tmp_path / "a")
    assert exc.value.code == "bad_payload"
    write(src["common"] / "bin/handler", b"clash")
    with pytest.raises(BundleError) as exc:
        build_bundle(FIELDS, {X86: src[X86]}, src["common"], key, tmp_path / "b")
    assert exc.value.code == "duplicate_entry"
    with pytest.raises(BundleError) as exc:
        build_bundle(FIELDS, {"Linux/x86": src[X86]}, None, key, tmp_path / "c")
    assert exc.value.code == "bad_payload"


def test_builder_refuses_values_json_cannot_hold(
    tmp_path: Path, src: dict[str, Path], key: Any
) -> None:
    data = tomllib.loads(
        'name = "d"\nversion = "1.0.0"\nruntime = "go"\nentry = "bin/handler"\n'
        "[cache]\nsince = 2026-01-01\n"
    )
    with pytest.raises(BundleError) as exc:
        build_bundle(data, {X86: src[X86]}, None, key, tmp_path / "d.efb")
    assert exc.value.code == "bad_manifest"


# --- manifest ------------------------------------------------------------------------------------


def test_manifest_round_trips_through_table_and_toml() -> None:
    table = manifest_to_table(parse_manifest(FIELDS))
    assert "build" not in table
    m = parse_manifest({k: v for k, v in FIELDS.items() if k != "build"})
    assert parse_manifest(table) == m
    assert parse_manifest(tomllib.loads(toml_dumps(table))) == m


def test_toml_dumps_tricky_values() -> None:
    data = {
        "plain": "x",
        'quote"key': 'va"l\\ue\n\t\x00\x7f é 😀',
        "a.b": {"nested": {"deeper": [1, 2.5, -3e-7, True]}, "empty": {}},
        "list_of_tables": [{"k": "v", "n": {"x": 1}}, {}],
        "big": (1 << 63) - 1,
        "empty_list": [],
    }
    assert tomllib.loads(toml_dumps(data)) == data


@pytest.mark.parametrize(
    "body",
    [
        b'{"format":1,"format":1}',  # duplicate keys: parsers disagree on which wins
        b'{"format":NaN}',
        b'{"format":1e999}',
        b"\xff\xfe",
        b"[1]",
    ],
)
def test_manifest_parser_is_strict(body: bytes) -> None:
    with pytest.raises(BundleError) as exc:
        BundleManifest.from_bytes(body)
    assert exc.value.code == "malformed_bundle"


def test_manifest_refuses_unknown_fields_and_formats(bundle: Path) -> None:
    good = json.loads(members(bundle)["manifest.json"])
    assert BundleManifest.from_bytes(canonical_json(good)).name == "resize"
    for change in (
        {"format": 2},
        {"surprise": 1},
        {"publisher": "nothex"},
        {"created_at": "yesterday"},
        {"artifacts": {"linux-x86_64": {**good["artifacts"][X86], "file": "../x.tar.gz"}}},
        {"function": {**good["function"], "entry": "/etc/passwd"}},
    ):
        with pytest.raises(BundleError) as exc:
            BundleManifest.from_bytes(canonical_json({**good, **change}))
        assert exc.value.code == "malformed_bundle", change


def test_versions() -> None:
    assert compare_versions("1.10.0", "1.9.9") == 1
    assert compare_versions("1.0.0-rc.1", "1.0.0") == -1
    assert compare_versions("1.0.0+build.5", "1.0.0") == 0
    check_version_order("1.2.0", None)
    check_version_order("1.2.0", "1.2.0")
    check_version_order("1.1.0", "1.2.0", allow_rollback=True)
    with pytest.raises(BundleError) as exc:
        check_version_order("1.1.0", "1.2.0")
    assert exc.value.code == "downgrade"


def test_verified_bundle_is_a_value(bundle: Path, verifier: Ed25519Verifier) -> None:
    vb = verifier.verify(bundle)
    assert isinstance(vb, VerifiedBundle)
    assert "manifest_bytes" not in repr(vb.raw)  # no megabytes of bytes in logs


def test_bundle_path_that_is_a_fifo(tmp_path: Path, verifier: Ed25519Verifier) -> None:
    fifo = tmp_path / "pipe.efb"
    os.mkfifo(fifo)
    refused(verifier, fifo, "malformed_bundle")  # and does not hang waiting for a writer

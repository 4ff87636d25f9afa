"""Installing signed bundles on a device: the whole path, end to end, with real processes.

A real registry (`edge-cloud serve`) and a real agent (`edge-agent run --require-signed`) on
loopback. The happy path goes scaffold -> build -> publish -> install -> serve -> upgrade ->
rollback; every kind of bad input is then refused with a one-line reason while the previous
version keeps serving and nothing half-installed is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from runtimes.bundle import build_bundle, read_bundle
from runtimes.signing import load_private_key
from tests.harness import AgentProcess, Response, install_dev_function, start_agent
from tests.registry_helpers import (
    Entry,
    Platform,
    agent_cli,
    build,
    cli,
    craft_bundle,
    ok,
    platform_running,
    publish,
    refused,
    serve_app,
    set_version,
    tar_gz,
    tree,
    write_outer,
)

HANDLER = b"exports.handler = async (event) => event;\n"
ECHO_V3 = {"name": "echo", "version": "0.3.0", "runtime": "node", "entry": "handler.js"}
ALL_BYTES = bytes(range(256)) * 4


def wait_serving(agent: AgentProcess, name: str, version: str, timeout: float = 30) -> Response:
    """Invoke until the agent answers from `version` (it rescans every 0.2 s in tests)."""
    deadline = time.monotonic() + timeout
    resp = None
    while time.monotonic() < deadline:
        resp = agent.invoke(name, ALL_BYTES, {"Content-Type": "application/octet-stream"})
        if resp.status == 200 and resp.headers.get("X-Edgefn-Version") == version:
            return resp
        time.sleep(0.1)
    detail = f"{resp.status} {resp.headers} {resp.body[:300]!r}" if resp else "no answer"
    raise AssertionError(f"{name} {version} not served: {detail}\n{agent.log_text()[-3000:]}")


@dataclass
class Env:
    root: Path
    key: Path
    other_key: Path
    platform: Platform
    fn_dir: Path
    bundles: dict[str, Path]


@contextlib.contextmanager
def make_env(root: Path) -> Iterator[Env]:
    """Keys, a scaffolded Node function built as 0.1.0-0.3.0, all published to a registry."""
    ok(cli("keys", "create", "--out", root / "publisher.key"))
    ok(cli("keys", "create", "--out", root / "other.key"))
    fn_dir = root / "echo"
    ok(cli("fn", "new", "echo", "--runtime", "node", "--dir", fn_dir))
    (fn_dir / "blob.bin").write_bytes(os.urandom(200 * 1024))  # > one download chunk
    bundles = {}
    for version in ("0.1.0", "0.2.0", "0.3.0"):
        set_version(fn_dir, version)
        bundles[version] = build(fn_dir, root / "publisher.key", root / f"echo-{version}.efb")
    with platform_running(root / "cloud") as platform:
        for version in ("0.1.0", "0.2.0", "0.3.0"):
            publish(platform, bundles[version])
        yield Env(root, root / "publisher.key", root / "other.key", platform, fn_dir, bundles)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with make_env(tmp_path_factory.mktemp("install")) as e:
        yield e


def trusting_data_dir(env: Env, path: Path) -> Path:
    ok(agent_cli("trust", "add", str(env.key) + ".pub", "--data-dir", path))
    return path


def test_full_flow_node(env: Env, tmp_path: Path) -> None:
    data = trusting_data_dir(env, tmp_path / "device")
    agent = start_agent(data, "--require-signed")
    try:
        pid = agent.proc.pid
        out = ok(
            agent_cli(
                "fn", "install", "echo@0.1.0", "--cloud", env.platform.url, "--data-dir", data
            )
        )
        # A Node bundle has no per-architecture artifacts: it installs for any architecture.
        assert out.strip().splitlines()[-1].startswith("installed echo 0.1.0 for any")
        assert "unpacking echo 0.1.0 (any)" in out
        resp = wait_serving(agent, "echo", "0.1.0")
        assert resp.body == ALL_BYTES  # byte for byte, every byte value

        ok(
            agent_cli(
                "fn", "install", "echo@0.2.0", "--cloud", env.platform.url, "--data-dir", data
            )
        )
        wait_serving(agent, "echo", "0.2.0")
        listing = ok(agent_cli("fn", "list", "--data-dir", data))
        assert "* 0.2.0" in listing and "  0.1.0" in listing
        assert "linux-" not in listing  # no architecture claimed for a Node bundle
        assert all(" any " in line for line in listing.splitlines()), listing

        # Same version again: nothing to do, success.
        again = agent_cli(
            "fn", "install", "echo@0.2.0", "--cloud", env.platform.url, "--data-dir", data
        )
        assert "already installed" in ok(again)

        out = ok(agent_cli("fn", "rollback", "echo", "--data-dir", data))
        assert "0.2.0 -> 0.1.0" in out
        wait_serving(agent, "echo", "0.1.0")
        assert "* 0.1.0" in ok(agent_cli("fn", "list", "--data-dir", data))

        # Forward again, from the copy kept on disk: no download, no unpack; then the latest
        # without naming it.
        start = len(env.platform.lines)
        out = ok(
            agent_cli(
                "fn", "install", "echo@0.2.0", "--cloud", env.platform.url, "--data-dir", data
            )
        )
        assert "echo 0.2.0 is already unpacked; switching to it" in out
        assert "downloading" not in out and "unpacking" not in out
        env.platform.wait_log("/v1/registry/functions/echo/versions/0.2.0", start)
        assert not [line for line in env.platform.lines[start:] if "/v1/registry/bundles/" in line]
        wait_serving(agent, "echo", "0.2.0")
        ok(agent_cli("fn", "install", "echo", "--cloud", env.platform.url, "--data-dir", data))
        wait_serving(agent, "echo", "0.3.0")
        assert agent.proc.pid == pid and agent.proc.poll() is None  # never restarted
    finally:
        agent.stop()
    fn_root = data / "functions" / "echo"
    assert (fn_root / "active").read_text().strip() == "0.3.0"
    assert not [p for p in fn_root.iterdir() if p.name.startswith((".staging", ".trash"))]
    assert not list((data / "staging").glob("*.part"))


def test_only_recent_versions_are_kept(env: Env, tmp_path: Path) -> None:
    data = trusting_data_dir(env, tmp_path / "device")
    for version in ("0.1.0", "0.2.0", "0.3.0"):
        ok(agent_cli("fn", "install", env.bundles[version], "--data-dir", data))
    root = data / "functions" / "echo"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "0.1.0",
        "0.2.0",
        "0.3.0",
        "active",
    ]
    # Roll back twice: 0.3.0 -> 0.2.0, then back to the most recently active other one.
    ok(agent_cli("fn", "rollback", "echo", "--data-dir", data))
    assert (root / "active").read_text().strip() == "0.2.0"
    ok(agent_cli("fn", "rollback", "echo", "--to", "0.1.0", "--data-dir", data))
    assert (root / "active").read_text().strip() == "0.1.0"
    refused(
        agent_cli("fn", "rollback", "echo", "--to", "9.9.9", "--data-dir", data), "not_installed"
    )


def test_rollback_of_an_unknown_function_leaves_nothing_behind(tmp_path: Path) -> None:
    data = tmp_path / "device"
    data.mkdir()
    refused(agent_cli("fn", "rollback", "ghost", "--data-dir", data), "not_installed")
    assert not (data / "staging" / "ghost.lock").exists()
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) in ([], ["staging"])


def test_install_without_trusted_keys_is_refused(env: Env, tmp_path: Path) -> None:
    proc = agent_cli("fn", "install", env.bundles["0.1.0"], "--data-dir", tmp_path)
    assert "edge-agent trust add" in refused(proc, "unknown_signer")
    assert not (tmp_path / "functions").exists()


def test_require_signed_refuses_a_development_dir(env: Env, tmp_path: Path) -> None:
    data = tmp_path / "device"
    install_dev_function(env.fn_dir, data, "echo")
    agent = start_agent(data, "--require-signed")
    try:
        items = {f["name"]: f for f in agent.get("/v1/functions").json()["functions"]}
        assert "unsigned development function refused" in items["echo"]["error"]
        assert agent.invoke("echo", b"x").status != 200
    finally:
        agent.stop()
    agent = start_agent(data)  # without the flag a development dir still works
    try:
        assert wait_serving(agent, "echo", "0.3.0").body == ALL_BYTES
    finally:
        agent.stop()
    trusting_data_dir(env, data)
    refused(agent_cli("fn", "install", env.bundles["0.1.0"], "--data-dir", data), "dev_function")


# ---- refusals: one device with echo 0.2.0 active (0.1.0 kept), one agent for all of them ---------


@dataclass
class Device:
    data: Path
    agent: AgentProcess


@pytest.fixture(scope="module")
def device(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    data = trusting_data_dir(env, tmp_path_factory.mktemp("device"))
    for version in ("0.1.0", "0.2.0"):
        ok(agent_cli("fn", "install", env.bundles[version], "--data-dir", data))
    agent = start_agent(data, "--require-signed")
    try:
        wait_serving(agent, "echo", "0.2.0")
        yield Device(data, agent)
    finally:
        agent.stop()


def assert_refused_cleanly(device: Device, proc_args: list[str | Path], code: str) -> str:
    functions = device.data / "functions"
    before = tree(functions)
    line = refused(agent_cli(*proc_args, "--data-dir", device.data), code)
    assert tree(functions) == before, "the functions dir changed"
    assert wait_serving(device.agent, "echo", "0.2.0").body == ALL_BYTES
    return line


def crafted(env: Env, tmp_path: Path, *entries: Entry, **kw: object) -> Path:
    payload = tar_gz([*entries, Entry("handler.js", HANDLER)])
    return craft_bundle(tmp_path / "crafted.efb", env.key, ECHO_V3, payload, **kw)  # type: ignore[arg-type]


def _flip_payload_byte(env: Env, tmp_path: Path) -> Path:
    data = bytearray(env.bundles["0.3.0"].read_bytes())
    member = read_bundle(env.bundles["0.3.0"]).members["common.tar.gz"]
    data[member.offset + member.size // 2] ^= 0x01
    out = tmp_path / "tampered.efb"
    out.write_bytes(bytes(data))
    return out


def _tamper_manifest(env: Env, tmp_path: Path) -> Path:
    data = env.bundles["0.3.0"].read_bytes()
    assert data.count(b'"version":"0.3.0"') == 1
    out = tmp_path / "tampered.efb"
    out.write_bytes(data.replace(b'"version":"0.3.0"', b'"version":"0.4.0"'))
    return out


def _unknown_key(env: Env, tmp_path: Path) -> Path:
    return build(env.fn_dir, env.other_key, tmp_path / "other.efb")


def _no_signature(env: Env, tmp_path: Path) -> Path:
    raw = read_bundle(env.bundles["0.3.0"])
    body = env.bundles["0.3.0"].read_bytes()
    members = [("manifest.json", raw.manifest_bytes)]
    members += [(n, body[m.offset : m.offset + m.size]) for n, m in raw.members.items()]
    return write_outer(tmp_path / "unsigned.efb", members)


def _wrong_arch(env: Env, tmp_path: Path) -> Path:
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "echo").write_bytes(b"\x7fELF not for this machine")
    fn = dict(ECHO_V3, runtime="go", entry="echo")
    return build_bundle(
        fn, {"linux-riscv64": payload}, None, load_private_key(env.key), tmp_path / "rv.efb"
    )


def _mislabelled_elf(env: Env, tmp_path: Path) -> Path:
    """An artifact for this device's arch whose binary is built for another (ELF header)."""
    from hardware.arch import host_arch, lookup

    host = host_arch()
    other = lookup("x86_64" if host.name != "x86_64" else "aarch64")
    elf = b"\x7fELF" + bytes([other.elf_class, 1, 1]) + bytes(11)
    elf += other.elf_machine.to_bytes(2, "little") + bytes(64)
    return crafted(env, tmp_path, Entry("helper", elf, mode=0o755), arch=host.bundle_key)


def _does_not_start(env: Env, tmp_path: Path) -> Path:
    payload = tar_gz([Entry("handler.js", b"throw new Error('cannot load');\n")])
    return craft_bundle(tmp_path / "broken.efb", env.key, ECHO_V3, payload)


REFUSALS = {
    "does_not_start": (_does_not_start, "warm_failed"),
    "tampered_artifact": (_flip_payload_byte, "digest_mismatch"),
    "tampered_manifest": (_tamper_manifest, "bad_signature"),
    "unknown_key": (_unknown_key, "unknown_signer"),
    "missing_signature": (_no_signature, "missing_signature"),
    "older_version": (lambda env, tmp: env.bundles["0.1.0"], "downgrade"),
    "wrong_arch": (_wrong_arch, "wrong_arch"),
    "mislabelled_elf": (_mislabelled_elf, "wrong_arch"),
    "tar_slip": (lambda env, tmp: crafted(env, tmp, Entry("../../escape.js", b"x")), "unsafe_path"),
    "absolute_path": (
        lambda env, tmp: crafted(env, tmp, Entry("/tmp/evil.js", b"x")),
        "unsafe_path",
    ),
    "symlink": (
        lambda env, tmp: crafted(
            env, tmp, Entry("lib.js", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        ),
        "link_in_archive",
    ),
    "hardlink": (
        lambda env, tmp: crafted(
            env, tmp, Entry("lib.js", type=tarfile.LNKTYPE, linkname="../../x")
        ),
        "link_in_archive",
    ),
    "device_file": (
        lambda env, tmp: crafted(env, tmp, Entry("dev", type=tarfile.CHRTYPE)),
        "special_file",
    ),
    "setuid": (lambda env, tmp: crafted(env, tmp, Entry("run", b"x", mode=0o4755)), "unsafe_mode"),
    "gzip_bomb": (
        lambda env, tmp: crafted(env, tmp, Entry("zeros.bin", bytes(40 << 20))),
        "compression_ratio",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_bundle_is_refused_and_the_old_version_keeps_serving(
    env: Env, device: Device, tmp_path: Path, case: str
) -> None:
    make, code = REFUSALS[case]
    bundle = make(env, tmp_path)
    line = assert_refused_cleanly(device, ["fn", "install", bundle], code)
    assert "install refused" in line
    assert not (device.data / "escape.js").exists() and not Path("/tmp/evil.js").exists()


def test_bundle_over_the_size_cap(env: Env, device: Device) -> None:
    args: list[str | Path] = ["fn", "install", env.bundles["0.3.0"], "--max-bundle-bytes", "4096"]
    assert "limit of 4096 bytes" in assert_refused_cleanly(device, args, "too_large")


def test_bundle_that_unpacks_past_the_cap(env: Env, device: Device, tmp_path: Path) -> None:
    # Honest manifest: refused from the signed sizes, before unpacking.
    args: list[str | Path] = [
        "fn",
        "install",
        env.bundles["0.3.0"],
        "--max-unpacked-bytes",
        "65536",
    ]
    assert_refused_cleanly(device, args, "too_large")
    # A manifest that understates the size: the unpacker's own count stops it.
    bundle = crafted(env, tmp_path, Entry("big.bin", os.urandom(100_000)), unpacked_size=10)
    args = ["fn", "install", bundle, "--max-unpacked-bytes", "65536"]
    assert_refused_cleanly(device, args, "too_large")


def test_same_version_with_other_bytes_is_refused(env: Env, device: Device, tmp_path: Path) -> None:
    fn_dir = tmp_path / "echo"
    shutil.copytree(env.fn_dir, fn_dir)
    set_version(fn_dir, "0.2.0")
    (fn_dir / "handler.js").write_bytes(HANDLER)
    bundle = build(fn_dir, env.key, tmp_path / "echo-0.2.0-other.efb")
    assert_refused_cleanly(device, ["fn", "install", bundle], "version_conflict")
    ok(agent_cli("fn", "install", env.bundles["0.2.0"], "--data-dir", device.data))  # same: fine


# ---- misbehaving registries -------------------------------------------------------------------


def fake_registry(
    version_doc: object, bundle: bytes, *, cut_at: int | None = None
) -> web.Application:
    async def version(request: web.Request) -> web.StreamResponse:
        if isinstance(version_doc, bytes):
            return web.Response(body=version_doc, content_type="text/html")
        return web.json_response(version_doc)

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(bundle)
        await resp.prepare(request)
        if cut_at is None:
            await resp.write(bundle)
            return resp
        await resp.write(bundle[:cut_at])
        assert request.transport is not None
        request.transport.close()  # the connection ends early
        return resp

    app = web.Application()
    app.router.add_get("/v1/registry/functions/{name}/versions/{version}", version)
    app.router.add_get("/v1/registry/bundles/{digest}", blob)
    return app


def version_doc(bundle: bytes, version: str = "0.3.0") -> dict[str, object]:
    return {
        "name": "echo",
        "version": version,
        "digest": "sha256:" + hashlib.sha256(bundle).hexdigest(),
        "size": len(bundle),
        "arches": [],
    }


def test_truncated_download(env: Env, device: Device) -> None:
    body = env.bundles["0.3.0"].read_bytes()
    with serve_app(fake_registry(version_doc(body), body, cut_at=len(body) // 2)) as url:
        line = assert_refused_cleanly(
            device, ["fn", "install", "echo@0.3.0", "--cloud", url], "download_interrupted"
        )
    assert "run the install again to resume" in line
    for part in (device.data / "staging").glob("*.part"):
        part.unlink()  # kept for a resume; other tests start clean


def test_registry_returning_garbage(env: Env, device: Device) -> None:
    body = env.bundles["0.3.0"].read_bytes()
    with serve_app(fake_registry(b"<html>502 Bad Gateway</html>", body)) as url:
        line = assert_refused_cleanly(
            device, ["fn", "install", "echo@0.3.0", "--cloud", url], "registry_garbage"
        )
        assert url in line
    garbage = os.urandom(5000)
    with serve_app(fake_registry(version_doc(garbage), garbage)) as url:
        assert_refused_cleanly(
            device, ["fn", "install", "echo@0.3.0", "--cloud", url], "malformed_bundle"
        )
    # Bytes other than the ones the registry announced.
    other = bytearray(body)
    other[-1000] ^= 0xFF
    with serve_app(fake_registry(version_doc(body), bytes(other))) as url:
        assert_refused_cleanly(
            device, ["fn", "install", "echo@0.3.0", "--cloud", url], "digest_mismatch"
        )
    # A registry that says another version than the one asked for.
    with serve_app(fake_registry(version_doc(body, "9.9.9"), body)) as url:
        assert_refused_cleanly(
            device, ["fn", "install", "echo@0.3.0", "--cloud", url], "registry_garbage"
        )
    assert not list((device.data / "staging").glob("*.part"))


def test_unreachable_registry(device: Device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        proc = agent_cli(
            "fn",
            "install",
            "echo@0.3.0",
            "--cloud",
            f"http://127.0.0.1:{port}",
            "--data-dir",
            device.data,
        )
    refused(proc, "registry_unreachable")
    assert proc.returncode == 3


def test_signed_bundle_for_another_name_from_the_registry(
    env: Env, device: Device, tmp_path: Path
) -> None:
    other_dir = tmp_path / "other"
    ok(cli("fn", "new", "other", "--runtime", "node", "--dir", other_dir))
    set_version(other_dir, "0.3.0")
    body = build(other_dir, env.key, tmp_path / "other.efb").read_bytes()
    with serve_app(fake_registry(version_doc(body), body)) as url:
        assert_refused_cleanly(
            device, ["fn", "install", "echo@0.3.0", "--cloud", url], "unexpected_bundle"
        )
